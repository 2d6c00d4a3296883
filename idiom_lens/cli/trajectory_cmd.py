"""`idiom-lens trajectory`: memorization and the logit-lens trajectory of a probe set."""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_output_options,
    add_probe_options,
    load_from_args,
    select_probes,
)
from idiom_lens.analyses.trajectory import SITES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trajectory", help="memorization + layer trajectory of a probe set")
    add_probe_options(p)
    p.add_argument("--sites", nargs="+", default=list(SITES), choices=SITES,
                   help="which reads per layer (default: all four)")
    add_batch_size_option(p, default=16)
    add_output_options(p)
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.stages import resumable_trajectory, write_trajectory_outputs

    selected = select_probes(args)
    datasets = " ".join(map(str, args.dataset))
    model = load_from_args(args)
    print(f"trajectory: {len(selected)} probes from {datasets} on {model.spec} -> {args.out}")
    result = resumable_trajectory(model, selected, args.out, sites=args.sites, batch_size=args.batch_size)
    outputs = write_trajectory_outputs(result, args.out, title=f"{model.spec}: {datasets}", png=not args.no_png)
    print(outputs.phases.summary_text)
    print(f"wrote {len(outputs.files)} files to {args.out}")
    return 0
