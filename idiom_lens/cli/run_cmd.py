"""`idiom-lens run`: the main job, the whole study on one model, resumable.

Stages, each written under OUT/<model>/ as it completes and skipped on a rerun when finished
with the same settings:
1. trajectory: memorization and the logit-lens trajectory of every bundled probe;
2. attribution: direct logit attribution (compatibility mode) of a seeded sample per set;
3. interventions: neuron knockouts at every position (the authors'), top-100 neurons of each layer
   (windows of one layer) beside a random, a magnitude-matched and a whole-MLP control, the
   value-vector statistic (top-1), and layer skipping, on a smaller seeded sample per set;
4. patching: activation patching of a sample of memorized and non-memorized idioms;
5. report: one HTML page over everything under OUT.

A stage is reused only when its completion marker verifies: same key (the model's settings, the
sampled probes and every argument of the stage function, see `pipeline.stage_key`) and intact
files. Changing any setting that changes a stage's numbers or files (seed, sample sizes,
`KNOCKOUT_OPTIONS`, `--no-png`, the model...) redoes that stage and only the stages that depend
on it; `--batch-size` changes speed, not results, and redoes nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

from idiom_lens.cli.common import add_model_options, load_from_args

# Options of the stage functions fixed by the study design; the command adds seed, png and batch
# sizes. Every entry is part of its stage's key, so editing one here redoes that stage.
# Knockouts: the authors' positions (every position), k = 100 in windows of one layer, with the random,
# magnitude-matched and whole-MLP controls (4 x 18 configurations per probe on Gemma 3 270M, ~1 min for
# 30 probes on one core); `idiom-lens knockout --full-grid` runs the paper's whole grid.
KNOCKOUT_OPTIONS: dict[str, Any] = {
    "ks": (100,), "windows": (1,), "modes": ("zero_top",), "keep_top_ks": None, "keep_top_windows": None,
    "positions": "all", "controls": ("random", "matched", "whole_mlp"), "rank_by": "effective", "norm": "live",
    "value_vector_ks": (1,),
}
PATCHING_OPTIONS: dict[str, Any] = {}
ATTRIBUTION_OPTIONS: dict[str, Any] = {}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: the whole study on one model (resumable)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    p.add_argument("--dataset", nargs="+", default=["idioms", "text", "facts"], metavar="NAME|PATH",
                   help="probe sets of the study: bundled names or files, e.g. the authors' idiomem.jsonl "
                        "with its own flags (default: idioms text facts)")
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
    p.add_argument("--part-size", type=int, default=256, metavar="N",
                   help="probes per resumable trajectory part (default 256); a crash loses at most one part")
    p.add_argument("--no-png", action="store_true", help="skip static PNG figures")
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.errors import InputError
    from idiom_lens.study.report import build_report
    from idiom_lens.study.pipeline import (
        resumable_trajectory,
        run_attribution,
        run_knockouts,
        run_patching,
        run_stage,
        sample_by_group,
        study_probes,
        write_trajectory_outputs,
    )

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.part_size < 1:
        raise InputError(f"--part-size must be >= 1, got {args.part_size}")
    for option in ("attribution_sample", "knockout_sample", "patching_sample"):
        if getattr(args, option) < 0:
            raise InputError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    started = time.perf_counter()
    probes = study_probes(args.dataset, limit=args.limit)
    model = load_from_args(args)
    out = args.out / model.name.replace("/", "_")
    png = not args.no_png
    print(f"[run] {len(probes)} probes ({', '.join(args.dataset)}) on {model.spec} -> {out}")

    print("[run] trajectory")
    result = resumable_trajectory(model, probes.probes, out / "trajectory", sites=args.sites,
                                  batch_size=args.batch_size, part_size=args.part_size)
    outputs = write_trajectory_outputs(result, out / "trajectory", title=model.spec, png=png)
    print(outputs.phases.summary_text)
    print(result.memorization.summary().to_string(index=False))

    def stage(name: str, fn: Callable[..., Any], stage_model: Any, per_group: int, options: dict[str, Any],
              groups: tuple[str, ...] | None = None) -> Any:
        """`run_stage` on a seeded sample of `per_group` probes per set (of `groups` only, if given)."""
        sample = sample_by_group(result.memorization, probes.probes, per_group=per_group, seed=args.seed)
        if groups is not None:
            group_of = {r.probe_id: r.group for r in result.memorization.records}
            sample = [p for p in sample if group_of[p.id] in groups]
        if not sample:
            print(f"[run] {name}: no probes in the sample, skipped")
            return None
        return run_stage(name, fn, stage_model, sample, out / name, options)

    if args.knockout_sample:
        stage("interventions", run_knockouts, model, args.knockout_sample,
              KNOCKOUT_OPTIONS | {"seed": args.seed, "png": png})
    if args.patching_sample:
        stage("patching", run_patching, model, args.patching_sample,
              PATCHING_OPTIONS | {"seed": args.seed, "png": png},
              groups=("memorized idioms", "non-memorized idioms"))
    if args.attribution_sample:
        compat = load_from_args(args, mode="compat")  # its settings are part of the stage's key
        digest = stage("attribution", run_attribution, compat, args.attribution_sample,
                       ATTRIBUTION_OPTIONS | {"batch_size": args.batch_size, "png": png})
        if digest is not None:
            print(f"  invariant max abs error: {digest['invariant_max_abs_error']}")
    print("[run] report")
    report = build_report(args.out)
    print(f"  {report}")
    print(f"[run] done in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0
