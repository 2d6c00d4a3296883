"""`idiom-lens run`: the main job, the whole study on one model, resumable.

Stages, each written under OUT/<model>/ as it completes and skipped on a rerun when finished
with the same settings:
1. trajectory: memorization and the logit-lens trajectory of every bundled probe;
2. attribution: direct logit attribution (compatibility mode) of a seeded sample per set;
3. interventions: neuron knockouts (targeted vs random, k = 10 and 100, windows of 1-3 layers)
   and layer skipping on a smaller seeded sample per set;
4. patching: activation patching of a sample of memorized and non-memorized idioms;
5. report: one HTML page over everything under OUT.
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
    p.add_argument("--attribution-sample", type=int, default=30, metavar="N",
                   help="probes per set for the attribution stage (default 30; 0 skips it)")
    p.add_argument("--knockout-sample", type=int, default=6, metavar="N",
                   help="probes per set for knockouts and layer skipping (default 6; 0 skips them)")
    p.add_argument("--patching-sample", type=int, default=4, metavar="N",
                   help="idioms per set (memorized, non-memorized) for activation patching (default 4; 0 skips)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-set samples and random controls")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-png", action="store_true", help="skip static PNG figures")
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.errors import InputError
    from idiom_lens.report import build_report
    from idiom_lens.pipeline import (
        mark_stage_done,
        resumable_trajectory,
        run_attribution,
        run_knockouts,
        run_patching,
        sample_by_group,
        stage_is_done,
        study_probes,
        write_trajectory_outputs,
    )

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    for option in ("attribution_sample", "knockout_sample", "patching_sample"):
        if getattr(args, option) < 0:
            raise InputError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    started = time.perf_counter()
    probes = study_probes(limit=args.limit)
    model = load_from_args(args)
    out = args.out / model.name.replace("/", "_")
    png = not args.no_png
    print(f"[run] {len(probes)} probes (idioms, ordinary text, facts) on {model.spec} -> {out}")

    print("[run] trajectory")
    result = resumable_trajectory(model, probes.probes, out / "trajectory", sites=args.sites,
                                  batch_size=args.batch_size)
    outputs = write_trajectory_outputs(result, out / "trajectory", title=model.spec, png=png)
    print(outputs.phases.summary_text)
    print(result.memorization.summary().to_string(index=False))

    def stage(name: str, per_group: int, groups: tuple[str, ...] | None, work) -> None:
        """Run `work(sample, stage_dir)` unless already done with the same sample and settings."""
        sample = sample_by_group(result.memorization, probes.probes, per_group=per_group, seed=args.seed)
        if groups is not None:
            group_of = {r.probe_id: r.group for r in result.memorization.records}
            sample = [p for p in sample if group_of[p.id] in groups]
        key = {"model": model.spec, "probes": [p.id for p in sample], "png": png, "seed": args.seed}
        stage_dir = out / name
        if not sample:
            print(f"[run] {name}: no probes in the sample, skipped")
        elif stage_is_done(stage_dir, key):
            print(f"[run] {name}: already done, reusing {stage_dir}")
        else:
            print(f"[run] {name}: {len(sample)} probes")
            work(sample, stage_dir)
            mark_stage_done(stage_dir, key)

    if args.knockout_sample:
        stage("interventions", args.knockout_sample, None, lambda sample, d: run_knockouts(
            model, sample, d, ks=(10, 100), windows=(1, 2, 3), modes=("zero_top",), keep_top_ks=None,
            seed=args.seed, png=png))
    if args.patching_sample:
        stage("patching", args.patching_sample, ("memorized idioms", "non-memorized idioms"),
              lambda sample, d: run_patching(model, sample, d, seed=args.seed, png=png))
    if args.attribution_sample:
        def attribute(sample, stage_dir):
            compat = load_from_args(args, mode="compat")
            digest = run_attribution(compat, sample, stage_dir, batch_size=args.batch_size, png=png)
            print(f"  invariant max abs error: {digest['invariant_max_abs_error']}")

        stage("attribution", args.attribution_sample, None, attribute)
    print("[run] report")
    report = build_report(args.out)
    print(f"  {report}")
    print(f"[run] done in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0
