"""`idiom-lens compare --results DIR`: the models under DIR side by side on normalized depth."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the models of a results directory on normalized depth")
    p.add_argument("--results", type=Path, default=Path("results"), help="results directory (default: results/)")
    p.add_argument("--no-png", action="store_true", help="skip static PNG figures")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.compare import compare_models, write_comparison

    files = write_comparison(args.results, png=not args.no_png)
    table = compare_models(args.results).table
    print(table.set_index("model").T.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {len(files)} files to {args.results / 'comparison'}")
    return 0
