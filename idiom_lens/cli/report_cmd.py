"""`idiom-lens report --results DIR [--out FILE]`: one self-contained HTML page of a results directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of a results directory (opens offline)")
    p.add_argument("--results", type=Path, default=Path("results"), help="results directory (default: results/)")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RESULTS/report.html)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.report import build_report

    path = build_report(args.results, out_path=args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
