"""`idiom-lens run`: the main job, the whole study on one model, resumable."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from idiom_lens.cli.common import add_model_options, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job: memorization and trajectories of all bundled sets")
    p.add_argument("--out", type=Path, default=Path("results"), help="output directory (default: results/)")
    p.add_argument("--limit", type=int, default=None, help="only the first N probes of each set (quick look)")
    p.add_argument("--sites", nargs="+", default=["resid_post"],
                   help="trajectory reads per layer (default: resid_post, the paper's figure; "
                        "add resid_mid attn_out mlp_out for more, at ~1 s/probe extra each on 2 cores)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-png", action="store_true", help="skip static PNG figures")
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.errors import InputError
    from idiom_lens.pipeline import resumable_trajectory, study_probes, write_trajectory_outputs

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    started = time.perf_counter()
    probes = study_probes(limit=args.limit)
    model = load_from_args(args)
    out = args.out / model.spec.replace("/", "_")
    print(f"[run] {len(probes)} probes (idioms, ordinary text, facts) on {model.spec} -> {out}")
    result = resumable_trajectory(model, probes.probes, out / "trajectory", sites=args.sites,
                                  batch_size=args.batch_size)
    outputs = write_trajectory_outputs(result, out / "trajectory", title=model.spec, png=not args.no_png)
    print(outputs.phases.summary_text)
    print(result.memorization.summary().to_string(index=False))
    print(f"[run] done in {time.perf_counter() - started:.0f} s; results in {out}")
    return 0
