"""`idiom-lens knockout`: MLP neuron knockouts and layer skipping over a probe set.

Writes (each as soon as its step completes, atomically) knockouts*.parquet, skipping*.parquet,
heatmaps and skip curves (HTML + PNG) and summary.json with the settings and timings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import add_model_options, load_from_args
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "knockout",
        help="MLP neuron knockouts (top-k per layer, layer windows, random control) and layer skipping",
        description="Zero the top-k MLP neurons (|activation| x ||value vector||) of every layer in windows of "
        "consecutive layers (or all but the top-k), next to a seeded random control, and skip layers; "
        "metrics per set: share of predictions changed, mean probability drop, share still on target.",
    )
    p.add_argument("--dataset", required=True, nargs="+", metavar="NAME|PATH",
                   help="bundled set (idioms, text, facts) or probe file; several are concatenated")
    add_model_options(p)
    p.add_argument("--limit", type=int, default=None, help="first N probes of each dataset")
    p.add_argument("--sample", type=int, default=None, help="seeded random sample of N probes of each dataset")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample and the random control (default 0)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 10, 100, 1000], help="neurons per layer (default 1 10 100 1000)")
    p.add_argument("--max-window", type=int, default=5, help="longest window of consecutive layers (default 5)")
    p.add_argument("--modes", nargs="+", choices=("zero_top", "keep_top"), default=["zero_top", "keep_top"])
    p.add_argument("--keep-top-k", type=int, nargs="+", default=[100],
                   help="k values for keep_top (default 100); --full-grid uses every --k")
    p.add_argument("--full-grid", action="store_true", help="keep_top for every k too")
    p.add_argument("--no-control", action="store_true", help="skip the random-neuron control")
    p.add_argument("--rank-by", choices=("magnitude", "dla"), default="magnitude",
                   help="magnitude: |act| x ||W_out row||; dla: direct attribution to the prediction (approximate in raw mode)")
    p.add_argument("--positions", choices=("last", "all"), default="last",
                   help="knock out at the last prompt position (default) or at every position")
    p.add_argument("--no-skip", action="store_true", help="do not run layer skipping")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-png", action="store_true", help="HTML figures only")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.set_defaults(handler=_run)


def load_probe_list(specs: list[str], *, limit: int | None, sample: int | None, seed: int) -> list:
    """Probes of every dataset spec, limited or sampled per dataset."""
    from idiom_lens.datasets import load_probes
    from idiom_lens.interventions import sample_probes

    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    if sample is not None and sample < 1:
        raise InputError(f"--sample must be >= 1, got {sample}")
    out = []
    for spec in specs:
        probes = list(load_probes(spec))
        if limit is not None:
            probes = probes[:limit]
        out += sample_probes(probes, sample, seed=seed)
    if not out:
        raise InputError(f"dataset {' '.join(specs)} has no probes")
    return out


def _run(args: argparse.Namespace) -> int:
    from idiom_lens.pipeline import run_knockouts

    if args.max_window < 1:
        raise InputError(f"--max-window must be >= 1, got {args.max_window}")
    if any(k < 0 for k in args.k):
        raise InputError(f"--k values must be >= 0, got {args.k}")
    probes = load_probe_list(args.dataset, limit=args.limit, sample=args.sample, seed=args.seed)
    model = load_from_args(args)
    if args.max_window > model.n_layers:
        raise InputError(f"--max-window {args.max_window} exceeds the model's {model.n_layers} layers")
    summary = run_knockouts(
        model, probes, args.out, ks=args.k, windows=tuple(range(1, args.max_window + 1)), modes=args.modes,
        keep_top_ks=None if args.full_grid else args.keep_top_k, control=None if args.no_control else "random",
        rank_by=args.rank_by, positions=args.positions, seed=args.seed, batch_size=args.batch_size,
        skip=not args.no_skip, png=not args.no_png,
    )
    summary["datasets"] = args.dataset
    print(f"total {summary['total_seconds']:.1f} s; results in {args.out}")
    return 0
