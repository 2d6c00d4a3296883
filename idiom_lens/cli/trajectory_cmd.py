"""`idiom-lens trajectory`: memorization and the logit-lens trajectory of a probe set."""

from __future__ import annotations

import argparse

from idiom_lens.analyses.trajectory import TRAJECTORY_SITES
from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_output_options,
    add_part_size_option,
    add_probe_options,
    add_worker_options,
    default_of,
    executor,
    load_from_args,
    select_probes,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trajectory", help="memorization + layer trajectory of a probe set")
    add_probe_options(p)
    p.add_argument("--sites", nargs="+", default=None, choices=TRAJECTORY_SITES,
                   help="which reads per layer (default: all four with the logit lens, resid_post with a learned one)")
    p.add_argument("--lens", default="logit", metavar="KIND|FILE",
                   help="read each layer through: logit (default, the paper's), tuned or jacobian (from the cache, "
                        "trained first when missing: `idiom-lens lens train`), or a lens file (.pt)")
    add_batch_size_option(p, default=16)
    from idiom_lens.study.stages import resumable_trajectory

    add_part_size_option(p, default=default_of(resumable_trajectory, "part_size"),
                         note=", and with --workers each part is one worker's task")
    add_output_options(p)
    add_model_options(p)
    add_worker_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.stages import resumable_trajectory, write_trajectory_outputs

    selected = select_probes(args)
    datasets = " ".join(map(str, args.dataset))
    from idiom_lens.lenses.cache import bundled_prompts, resolve_lens

    model = load_from_args(args)
    lens = resolve_lens(model, args.lens, prompts=sorted(set(bundled_prompts()) | {p.prompt for p in selected}))
    sites = args.sites or (list(TRAJECTORY_SITES) if lens.kind == "logit" else ["resid_post"])
    print(f"trajectory: {len(selected)} probes from {datasets} on {model.spec}, {lens.kind} lens -> {args.out}")
    with executor(args, model) as where:
        result = resumable_trajectory(model, selected, args.out, sites=sites, batch_size=args.batch_size, lens=lens,
                                      part_size=args.part_size, executor=where)
    outputs = write_trajectory_outputs(result, args.out, title=f"{model.spec}: {datasets}", png=not args.no_png)
    print(outputs.phases.summary_text)
    print(f"wrote {len(outputs.files)} files to {args.out}")
    return 0
