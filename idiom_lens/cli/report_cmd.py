"""`idiom-lens report --results DIR [--out DIR | --html FILE]`: one self-contained HTML page of a results directory.

`--out` is a folder, as in every command: the page is OUT/report.html. `--html FILE` names the file
instead; without either the page is RESULTS/report.html.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import OUT_HELP, add_results_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report of a results directory (opens offline)")
    add_results_option(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help=f"{OUT_HELP}: writes DIR/report.html (default: RESULTS/report.html)")
    where.add_argument("--html", type=Path, default=None, metavar="FILE", help="write the page to this file instead")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.report import build_report

    out_path = args.html if args.html is not None else (args.out / "report.html" if args.out is not None else None)
    path = build_report(args.results, out_path=out_path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
