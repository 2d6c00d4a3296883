"""`idiom-lens trajectory`: memorization and the logit-lens trajectory of a probe set."""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import add_model_options, load_from_args
from idiom_lens.analyses.trajectory import SITES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trajectory", help="memorization + layer trajectory of a probe set")
    p.add_argument("--dataset", required=True, help="bundled set name (idioms, text, facts) or a file path")
    p.add_argument("--limit", type=int, default=None, help="only the first N probes")
    p.add_argument("--sites", nargs="+", default=list(SITES), choices=SITES,
                   help="which reads per layer (default: all four)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--no-png", action="store_true", help="skip static PNG figures")
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.datasets import load_probes
    from idiom_lens.errors import InputError
    from idiom_lens.study.pipeline import resumable_trajectory, write_trajectory_outputs

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    probes = load_probes(args.dataset)
    selected = probes.probes[: args.limit] if args.limit else probes.probes
    model = load_from_args(args)
    print(f"trajectory: {len(selected)} probes from {args.dataset!r} on {model.spec} -> {args.out}")
    result = resumable_trajectory(model, selected, args.out, sites=args.sites, batch_size=args.batch_size)
    outputs = write_trajectory_outputs(result, args.out, title=f"{model.spec}: {args.dataset}", png=not args.no_png)
    print(outputs.phases.summary_text)
    print(f"wrote {len(outputs.files)} files to {args.out}")
    return 0
