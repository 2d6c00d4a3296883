"""`idiom-lens knockout`: MLP neuron knockouts and layer skipping over a probe set.

Writes (each as soon as its step completes, atomically) knockouts*.parquet (rows, probes, summary
with n and 95% intervals per set), knockout_layers.parquet (share changed per set x control x
layer), value_vectors*.parquet, skipping*.parquet, heatmaps, layer curves and skip curves
(HTML + PNG) and summary.json with the settings (positions, ranking, norm handling, controls,
masked tokens) and timings.
"""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_output_options,
    add_probe_options,
    add_worker_options,
    load_from_args,
    select_probes,
    executor,
)
from idiom_lens.errors import InputError

_GRID_DEFAULTS = {"k": [1, 10, 100, 1000], "max_window": 5, "modes": ["zero_top", "keep_top"], "keep_top_k": [100],
                  "keep_top_max_window": 3}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "knockout",
        help="MLP neuron knockouts (top-k per layer, layer windows, matched controls, whole-MLP ceiling) and layer skipping",
        description="Zero the top-k MLP neurons of every layer in windows of consecutive layers (or all but the "
        "top-k), at every prompt position (the authors') or the last one (ours), next to seeded controls: k random "
        "neurons, random neurons matching the top-k's summed score, and the whole MLP (ceiling); and skip layers. "
        "Metrics per set (memorized idioms, non-memorized idioms, ordinary text, ...): share of predictions changed "
        "with n and a 95% interval, mean probability drop, share still on target. Predictions range over real "
        "vocabulary tokens (special, placeholder and control tokens masked).",
    )
    add_probe_options(p)
    add_model_options(p)
    p.add_argument("--full-grid", action="store_true",
                   help="the paper's grid: top-k for k in 1 10 100 1000 in windows of 1-5 layers, all-but-top-k for "
                        "k in 10 100 1000 in windows of 1-3 (replaces --k, --max-window, --modes, --keep-top-k, "
                        "--keep-top-max-window)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="zero_top: neurons per layer (default 1 10 100 1000)")
    p.add_argument("--max-window", type=int, default=None, help="zero_top: longest window of consecutive layers (default 5)")
    p.add_argument("--modes", nargs="+", choices=("zero_top", "keep_top"), default=None,
                   help="zero_top (knock out the top-k) and/or keep_top (knock out all but the top-k); default both")
    p.add_argument("--keep-top-k", type=int, nargs="+", default=None, help="keep_top: k values (default 100)")
    p.add_argument("--keep-top-max-window", type=int, default=None, help="keep_top: longest window (default 3)")
    p.add_argument("--positions", choices=("all", "last"), default="all",
                   help="knock out at every prompt position (default, the authors') or at the last one only (ours)")
    p.add_argument("--compare-positions", action="store_true",
                   help="also run the other --positions and draw both side by side")
    p.add_argument("--controls", nargs="+", choices=("random", "matched", "whole_mlp", "none"),
                   default=["random", "matched", "whole_mlp"],
                   help="random: k random neurons; matched: random neurons matching the top-k's summed effective "
                        "score (zero_top); whole_mlp: the whole MLP of the window (ceiling); none (default: all three)")
    p.add_argument("--no-control", action="store_true", help="same as --controls none")
    p.add_argument("--rank-by", choices=("effective", "magnitude", "dla"), default="effective",
                   help="effective (default): |act| x ||W_out row x post-MLP norm gain|| / clean post-norm RMS, the "
                        "neuron's actual contribution (= magnitude without a post-MLP norm); magnitude: |act| x "
                        "||W_out row||; dla: direct push on the prediction (final norm ignored: approximate)")
    p.add_argument("--norm", choices=("live", "frozen"), default="live",
                   help="post-MLP norm (Gemma's ln2_post): live (default) renormalises the knocked-out output; frozen "
                        "keeps its clean scale so zeroing removes exactly the neurons' contributions")
    p.add_argument("--value-vector-k", type=int, nargs="*", default=[1, 10],
                   help="the authors' value-vector statistic for these k (default 1 10; none to skip)")
    p.add_argument("--no-skip", action="store_true", help="do not run layer skipping")
    add_batch_size_option(p, default=128)
    add_output_options(p)
    add_worker_options(p)
    p.set_defaults(handler=_run)


def _grid_options(args: argparse.Namespace, n_layers: int | None = None) -> dict:
    """The grid arguments of `run_knockouts` (checked before the model loads when n_layers is None)."""
    given = [f"--{name.replace('_', '-')}" for name in _GRID_DEFAULTS if getattr(args, name) is not None]
    if args.full_grid:
        if given:
            raise InputError(f"--full-grid is the paper's grid: do not also give {', '.join(given)}")
        return {"full_grid": True}
    opts = {name: getattr(args, name) if getattr(args, name) is not None else default
            for name, default in _GRID_DEFAULTS.items()}
    for name in ("max_window", "keep_top_max_window"):
        if opts[name] < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {opts[name]}")
        if n_layers is not None and opts[name] > n_layers:
            raise InputError(f"--{name.replace('_', '-')} {opts[name]} exceeds the model's {n_layers} layers")
    for name in ("k", "keep_top_k"):
        if any(k < 0 for k in opts[name]):
            raise InputError(f"--{name.replace('_', '-')} values must be >= 0, got {opts[name]}")
    return {"ks": opts["k"], "windows": tuple(range(1, opts["max_window"] + 1)), "modes": opts["modes"],
            "keep_top_ks": opts["keep_top_k"], "keep_top_windows": tuple(range(1, opts["keep_top_max_window"] + 1))}


def _run(args: argparse.Namespace) -> int:
    from idiom_lens.study.stages import run_knockouts

    _grid_options(args)
    if any(k < 1 for k in args.value_vector_k):
        raise InputError(f"--value-vector-k values must be >= 1, got {args.value_vector_k}")
    controls = () if args.no_control or "none" in args.controls else tuple(args.controls)
    probes = select_probes(args)
    model = load_from_args(args)
    grid = _grid_options(args, model.n_layers)
    with executor(args, model) as where:
        summary = run_knockouts(
            model, probes, args.out, **grid, controls=controls, rank_by=args.rank_by, positions=args.positions,
            norm=args.norm, compare_positions=args.compare_positions, value_vector_ks=tuple(args.value_vector_k),
            seed=args.seed, batch_size=args.batch_size, skip=not args.no_skip, png=not args.no_png, executor=where,
        )
    summary["datasets"] = args.dataset
    print(f"total {summary['total_seconds']:.1f} s; results in {args.out}")
    return 0
