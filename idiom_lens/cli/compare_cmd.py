"""`idiom-lens compare --results DIR`: the models under DIR side by side on normalized depth (written to
DIR/comparison/)."""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import add_png_option, add_results_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare the models of a results directory on normalized depth "
                                       "(writes RESULTS/comparison/)")
    add_results_option(p)
    add_png_option(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.compare import compare_models, write_comparison

    files = write_comparison(args.results, png=not args.no_png)
    table = compare_models(args.results).table
    print(table.set_index("model").T.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {len(files)} files to {args.results / 'comparison'}")
    return 0
