"""`idiom-lens run`: the main job, the whole study on one model, resumable.

Argument parsing only: the study itself (stages, layout, resume) is `idiom_lens.study.run_study`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import add_model_options, add_worker_options, load_from_args

# `StudyOptions` field -> the help of its --option (the default is read from `StudyOptions()`)
_SAMPLES = {
    "attribution_sample": "probes per comparison set (memorized idioms, non-memorized idioms, text, facts) for the "
                          "attribution stage, seeded by --seed",
    "knockout_sample": "probes per comparison set for knockouts and layer skipping, seeded by --seed",
    "patching_sample": "idioms per comparison set (memorized, non-memorized) for activation patching, seeded by --seed",
    "tracing_sample": "idioms per comparison set (memorized, non-memorized) for causal tracing, seeded by --seed "
                      "(about 35 s each on 2 cores)",
    "attn_knockout_sample": "probes per comparison set for the attention knockout, seeded by --seed",
}


def register(sub: argparse._SubParsersAction) -> None:
    """`run`'s parser: the shared probe, output and batch options (`idiom_lens.cli.common`) plus the
    stage samples, every default read from `StudyOptions()`. `--sample` is not an option of `run`:
    each stage takes its own seeded sample per comparison set (memorized idioms, non-memorized
    idioms, text, facts), known after the trajectory."""
    from idiom_lens.analyses.trajectory import TRAJECTORY_SITES
    from idiom_lens.cli.common import (
        add_batch_size_option,
        add_output_options,
        add_part_size_option,
        add_probe_options,
    )
    from idiom_lens.study.run import StudyOptions

    defaults = StudyOptions()
    p = sub.add_parser("run", help="the main job: the whole study on one model (resumable)")
    add_output_options(p, required=False, default=Path("results"), note="the model's results go to DIR/<model>/")
    add_probe_options(p, required=False, default=defaults.datasets, sample=False)
    p.add_argument("--sites", nargs="+", choices=TRAJECTORY_SITES, default=list(defaults.sites),
                   help=f"trajectory reads per layer (default: {' '.join(defaults.sites)}, the paper's figure; "
                        "resid_mid attn_out mlp_out add as much time again each)")
    p.add_argument("--lens", nargs="+", default=["logit"], choices=("logit", "tuned", "jacobian"),
                   help="lenses to read the trajectory through: the logit lens always (the paper's); tuned and/or "
                        "jacobian add the lenses stage (each trained once into the cache when missing, about 10 "
                        "minutes on 2 cores) comparing the phases under each lens")
    for field, help_ in _SAMPLES.items():
        default = getattr(defaults, field)
        p.add_argument(f"--{field.replace('_', '-')}", type=int, default=default, metavar="N",
                       help=f"{help_} (default {default}; 0 skips)")
    p.add_argument("--ground-truth", action="store_true",
                   help="also the ground truth for the localizers (off by default; `idiom-lens localize` alone runs "
                        "it with every option): implants new idioms into an early, a middle and a late MLP layer "
                        "and scores every localizer on finding them, about 90 minutes on 2 cores")
    add_batch_size_option(p, default=defaults.batch_size)
    add_part_size_option(p, default=defaults.part_size, note=" (trajectory parts)")
    add_model_options(p)
    add_worker_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.ground_truth import GroundTruthOptions
    from idiom_lens.study.run import StudyOptions, run_study

    options = StudyOptions(
        datasets=tuple(args.dataset), limit=args.limit, sites=tuple(args.sites), lenses=tuple(args.lens),
        attribution_sample=args.attribution_sample, knockout_sample=args.knockout_sample,
        patching_sample=args.patching_sample, tracing_sample=args.tracing_sample,
        attn_knockout_sample=args.attn_knockout_sample, seed=args.seed, batch_size=args.batch_size,
        part_size=args.part_size, png=not args.no_png, workers=args.workers, ray_address=args.ray_address,
        worker_threads=args.worker_threads, probes_per_task=args.probes_per_task,
        ground_truth=GroundTruthOptions() if args.ground_truth else None,
    )
    run_study(load_from_args(args), args.out, options, device=args.device, n_devices=args.n_devices)
    return 0
