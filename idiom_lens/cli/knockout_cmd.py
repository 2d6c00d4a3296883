"""`idiom-lens knockout`: MLP neuron knockouts and layer skipping over a probe set.

Writes (each as soon as its step completes, atomically) knockouts*.parquet (rows, probes, summary
with n and 95% intervals per set), knockout_layers.parquet (share changed per set x control x
layer, with the mean output diagnostics: neurons zeroed, removed norm, output cosine and norm
ratio, removed-norm ratio to the targeted set), value_vectors*.parquet, skipping*.parquet,
heatmaps, layer curves and skip curves (HTML + PNG) and summary.json with the settings
(positions, ranking, norm handling, ablation, controls, masked tokens) and timings.

Defaults: the post-MLP norm frozen (`--norm frozen`: a knockout removes exactly its neurons'
contributions; `--norm live` is the secondary variant), zero ablation, our effective ranking
(`--rank-by magnitude` is the authors', |m| x ||v||).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_old_spelling,
    add_output_options,
    add_probe_options,
    add_worker_options,
    executor,
    load_from_args,
    named_options,
    select_probes,
)
from idiom_lens.errors import InputError

if TYPE_CHECKING:
    from idiom_lens.analyses.interventions.knockouts import KnockoutOptions

# --option -> KnockoutGrid field, for the grid options (--full-grid replaces them all)
_GRID_OPTIONS = {"k": "ks", "windows": "windows", "modes": "modes", "keep_top_k": "keep_top_ks",
                 "keep_top_windows": "keep_top_windows"}


def _words(values: tuple) -> str:
    return " ".join(map(str, values))


def _up_to(n: str) -> list[int]:
    """An old `--max-window N`: window lengths 1..N."""
    return list(range(1, int(n) + 1))


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.analyses.interventions.knockouts import (
        ABLATIONS,
        CONTROLS,
        MODES,
        NORMS,
        POSITIONS,
        RANKINGS,
        KnockoutGrid,
        KnockoutOptions,
    )
    from idiom_lens.analyses.interventions.value_vectors import VALUE_VECTOR_KS

    grid, paper, defaults = KnockoutGrid.DEFAULT, KnockoutGrid.PAPER, KnockoutOptions()
    p = subparsers.add_parser(
        "knockout",
        help="MLP neuron knockouts (top-k per layer, layer windows, matched controls, whole-MLP ceiling) "
        "and layer skipping",
        description="Zero the top-k MLP neurons of every layer in windows of consecutive layers (or all but the "
        "top-k), at every prompt position (the authors') or the last one (ours), next to seeded controls: k random "
        "neurons, k neurons from outside the top-k whose removed vector matches the top-k's in norm, and the whole "
        "MLP (ceiling); and skip layers. "
        "Metrics per set (memorized idioms, non-memorized idioms, ordinary text, ...): share of predictions changed "
        "with n and a 95% interval, mean probability drop, share still on target. Predictions range over real "
        "vocabulary tokens (special, placeholder and control tokens masked).",
    )
    add_probe_options(p)
    add_model_options(p)
    p.add_argument("--full-grid", action="store_true",
                   help=f"the paper's grid: top-k for k in {_words(paper.ks)} in windows of {_words(paper.windows)} "
                        f"layers, all-but-top-k for k in {_words(paper.keep_top_ks)} in windows of "
                        f"{_words(paper.keep_top_windows)} (replaces --k, --windows, --modes, --keep-top-k, "
                        "--keep-top-windows)")
    p.add_argument("--k", type=int, nargs="+", default=None, metavar="K",
                   help=f"zero_top: neurons per layer (default {_words(grid.ks)})")
    p.add_argument("--windows", type=int, nargs="+", default=None, metavar="W",
                   help=f"zero_top: lengths of the windows of consecutive layers, each at every start layer "
                        f"(default {_words(grid.windows)}, as many as the model holds)")
    add_old_spelling(p, "--max-window", "--windows", dest="windows", convert=_up_to, metavar="N")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="zero_top (knock out the top-k) and/or keep_top (knock out all but the top-k); default "
                        f"{_words(grid.modes)}")
    p.add_argument("--keep-top-k", type=int, nargs="+", default=None, metavar="K",
                   help=f"keep_top: k values (default {_words(grid.keep_top_ks)})")
    p.add_argument("--keep-top-windows", type=int, nargs="+", default=None, metavar="W",
                   help=f"keep_top: window lengths (default {_words(grid.keep_top_windows)})")
    add_old_spelling(p, "--keep-top-max-window", "--keep-top-windows", dest="keep_top_windows", convert=_up_to,
                     metavar="N")
    p.add_argument("--positions", choices=POSITIONS, default=defaults.positions,
                   help=f"knock out at every prompt position (all, the authors') or at the last one only (last, "
                        f"ours); default {defaults.positions}")
    p.add_argument("--compare-positions", action="store_true",
                   help="also run the other --positions and draw both side by side")
    p.add_argument("--controls", nargs="+", choices=(*CONTROLS, "none"), default=list(defaults.controls),
                   help="random: k random neurons; matched: k neurons from outside the top-k whose removed vector "
                        "(last position, through the clean post-MLP norm scale) matches the top-k's in norm "
                        "(zero_top; rows report matched_norm_ratio); matched_score: random neurons matching the "
                        "top-k's summed effective score (zero_top; the earlier control, to compare); whole_mlp: the "
                        f"whole MLP of the window (ceiling); none (default: {_words(defaults.controls)})")
    p.add_argument("--no-control", action="store_true", help="same as --controls none")
    p.add_argument("--rank-by", choices=RANKINGS, default=defaults.rank_by,
                   help="effective (ours): |act| x ||W_out row x post-MLP norm gain|| / clean post-norm RMS, the "
                        "neuron's actual contribution (= magnitude without a post-MLP norm); magnitude (the "
                        "authors', Haviv et al. 2023): |m| x ||v||, activation x ||W_out row||; dla: direct push on "
                        f"the prediction (final norm ignored: approximate); default {defaults.rank_by}")
    p.add_argument("--norm", choices=NORMS, default=defaults.norm,
                   help="post-MLP norm (Gemma's ln2_post): frozen (the primary result) keeps its clean scale so a "
                        "knockout removes exactly the neurons' contributions; live renormalises the knocked-out "
                        f"output, scaling what remains back up (secondary); default {defaults.norm}")
    p.add_argument("--ablation", choices=ABLATIONS, default=defaults.ablation,
                   help="zero: set the knocked-out activations to 0; mean: to their mean over the bundled "
                        f"ordinary text (every position but BOS); default {defaults.ablation}")
    p.add_argument("--value-vector-k", type=int, nargs="*", default=list(VALUE_VECTOR_KS),
                   help=f"the authors' value-vector statistic for these k (default {_words(VALUE_VECTOR_KS)}; "
                        "none to skip)")
    p.add_argument("--no-skip", action="store_true", help="do not run layer skipping")
    add_batch_size_option(p, default=128)
    add_output_options(p)
    add_worker_options(p)
    p.set_defaults(handler=_run)


def knockout_options(args: argparse.Namespace) -> KnockoutOptions:
    """The `KnockoutOptions` of the command line: the grid options given over `KnockoutGrid.DEFAULT`
    (or `--full-grid`, `KnockoutGrid.PAPER`, which excludes them), the controls, ranking,
    positions, norm handling, ablation and seed."""
    from idiom_lens.analyses.interventions.knockouts import KnockoutGrid, KnockoutOptions

    given = {field: tuple(getattr(args, name)) for name, field in _GRID_OPTIONS.items()
             if getattr(args, name, None) is not None}
    if args.full_grid:
        if given:
            names = [f"--{name.replace('_', '-')}" for name in _GRID_OPTIONS if getattr(args, name, None) is not None]
            raise InputError(f"--full-grid is the paper's grid: do not also give {', '.join(names)}")
        grid = KnockoutGrid.PAPER
    else:
        grid = named_options(lambda: dataclasses.replace(KnockoutGrid.DEFAULT, **given),
                             {field: f"--{name.replace('_', '-')}" for name, field in _GRID_OPTIONS.items()})
    controls = () if args.no_control or "none" in args.controls else tuple(args.controls)
    return KnockoutOptions(grid=grid, controls=controls, rank_by=args.rank_by, positions=args.positions,
                           norm=args.norm, ablation=args.ablation, seed=args.seed)


def _run(args: argparse.Namespace) -> int:
    from idiom_lens.study.stages import run_knockouts

    options = knockout_options(args)  # InputError before the model loads
    if any(k < 1 for k in args.value_vector_k):
        raise InputError(f"--value-vector-k values must be >= 1, got {args.value_vector_k}")
    probes = select_probes(args)
    model = load_from_args(args)
    with executor(args, model) as where:
        summary = run_knockouts(
            model, probes, args.out, options=options, compare_positions=args.compare_positions,
            value_vector_ks=tuple(args.value_vector_k), batch_size=args.batch_size, skip=not args.no_skip,
            png=not args.no_png, executor=where,
        )
    summary["datasets"] = args.dataset
    print(f"total {summary['total_seconds']:.1f} s; results in {args.out}")
    return 0
