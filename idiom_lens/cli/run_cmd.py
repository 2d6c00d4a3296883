"""`idiom-lens run`: the main job, the whole study on one model, resumable.

Stages, each written under OUT/<model>/ as it completes and skipped on a rerun when finished
with the same settings:
1. trajectory: memorization and the logit-lens trajectory of every bundled probe;
2. attribution: direct logit attribution (compatibility mode) of a seeded sample per set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from idiom_lens.cli.common import add_model_options, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: the whole study on one model (resumable)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    p.add_argument("--limit", type=int, default=None, help="only the first N probes of each set (quick look)")
    p.add_argument("--sites", nargs="+", default=["resid_post"],
                   help="trajectory reads per layer (default: resid_post, the paper's figure; "
                        "resid_mid attn_out mlp_out add as much time again each)")
    p.add_argument("--attribution-sample", type=int, default=40, metavar="N",
                   help="probes per set for the attribution stage (default 40; 0 skips it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-set samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-png", action="store_true", help="skip static PNG figures")
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.errors import InputError
    from idiom_lens.pipeline import (
        mark_stage_done,
        resumable_trajectory,
        run_attribution,
        sample_by_group,
        stage_is_done,
        study_probes,
        write_trajectory_outputs,
    )

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.attribution_sample < 0:
        raise InputError(f"--attribution-sample must be >= 0, got {args.attribution_sample}")
    started = time.perf_counter()
    probes = study_probes(limit=args.limit)
    model = load_from_args(args)
    out = args.out / model.name.replace("/", "_")
    png = not args.no_png
    print(f"[run] {len(probes)} probes (idioms, ordinary text, facts) on {model.spec} -> {out}")

    print("[run] 1/2 trajectory")
    result = resumable_trajectory(model, probes.probes, out / "trajectory", sites=args.sites,
                                  batch_size=args.batch_size)
    outputs = write_trajectory_outputs(result, out / "trajectory", title=model.spec, png=png)
    print(outputs.phases.summary_text)
    print(result.memorization.summary().to_string(index=False))

    if args.attribution_sample:
        sample = sample_by_group(result.memorization, probes.probes, per_group=args.attribution_sample,
                                 seed=args.seed)
        key = {"model": model.spec, "probes": [p.id for p in sample], "png": png}
        stage = out / "attribution"
        if stage_is_done(stage, key):
            print("[run] 2/2 attribution: already done, reusing")
        else:
            print(f"[run] 2/2 attribution of {len(sample)} probes (compatibility mode)")
            del model  # one model in memory at a time
            compat = load_from_args(args, mode="compat")
            digest = run_attribution(compat, sample, stage, batch_size=args.batch_size, png=png)
            mark_stage_done(stage, key)
            print(f"  invariant max abs error: {digest['invariant_max_abs_error']}")
    print(f"[run] done in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0
