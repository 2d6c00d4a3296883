"""`idiom-lens trace`: causal tracing (ROME) of a probe set or of one sequence.

`idiom-lens trace --dataset idioms --sample 20 --out DIR` traces a set in resumable parts and
writes tracing*.parquet (rows, probes, summary per set with 95% intervals), heatmaps per set,
layer curves and summary.json (noise scale and settings); `idiom-lens trace "once in a blue moon"`
traces one sequence (its last word is the target) and prints where restoring helps most.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_old_spelling,
    add_output_options,
    add_part_size_option,
    add_probe_options,
    add_worker_options,
    default_of,
    executor,
    load_from_args,
    named_options,
    text_or_dataset_probes,
)

if TYPE_CHECKING:
    from idiom_lens.analyses.interventions.tracing import TracingOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.analyses.interventions.tracing import TRACE_SITES, TracingOptions
    from idiom_lens.study.stages import run_tracing

    defaults = TracingOptions()
    p = subparsers.add_parser(
        "trace",
        help="causal tracing: noise the prompt's embeddings, restore one clean activation, see the prediction return",
        description="Add Gaussian noise (3x the std of the input embeddings on the bundled text set, after the "
        "model's embedding scale) to every prompt token but the BOS and the last, then restore the clean residual "
        "stream, MLP output or attention output at one position, in one layer or a window of layers, and measure "
        "the probability of the clean prediction (ROME's causal tracing). Reports the indirect effect per layer and "
        "position, and its average per set with 95%% bootstrap intervals.",
    )
    p.add_argument("text", nargs="?", default=None, help="one sequence to trace; its last word is the target")
    add_probe_options(p, required=False)
    add_model_options(p)
    p.add_argument("--sites", nargs="+", choices=TRACE_SITES, default=list(defaults.sites),
                   help=f"what is restored (default {' '.join(defaults.sites)})")
    p.add_argument("--windows", type=int, nargs="+", default=list(defaults.windows), metavar="W",
                   help="window sizes for mlp and attn, centered and clipped (default "
                        f"{' '.join(map(str, defaults.windows))}; resid is one layer)")
    p.add_argument("--noise-samples", type=int, default=defaults.noise_samples, metavar="N",
                   help=f"noise samples per probe (default {defaults.noise_samples})")
    add_old_spelling(p, "--samples", "--noise-samples", dest="noise_samples", type=int, metavar="N")
    p.add_argument("--noise-multiplier", type=float, default=defaults.multiplier,
                   help=f"noise std in units of the input embeddings' std (default {defaults.multiplier:g}, ROME's)")
    p.add_argument("--noise-words", type=int, nargs=2, default=None, metavar=("FIRST", "STOP"),
                   help="noise the prompt words FIRST..STOP-1 (Python slice, negative from the end) instead of "
                        "every token but the BOS and the last")
    add_part_size_option(p, default=default_of(run_tracing, "part_size"))
    add_batch_size_option(p, default=128)
    add_output_options(p, required=False, note="required with --dataset; with TEXT, figures are written only if given")
    add_worker_options(p)
    p.set_defaults(handler=_run)


def tracing_options(args: argparse.Namespace) -> TracingOptions:
    """The `TracingOptions` of the command line (`InputError` for a bad value)."""
    from idiom_lens.analyses.interventions.tracing import TracingOptions

    return named_options(
        lambda: TracingOptions(sites=tuple(args.sites), windows=tuple(args.windows), noise_samples=args.noise_samples,
                               multiplier=args.noise_multiplier,
                               noise_words=tuple(args.noise_words) if args.noise_words else None, seed=args.seed),
        {"sites": "--sites", "windows": "--windows", "noise_samples": "--noise-samples",
         "multiplier": "--noise-multiplier", "noise_words": "--noise-words"})


def _run(args: argparse.Namespace) -> int:
    options = tracing_options(args)  # InputError before the model loads
    probes = text_or_dataset_probes(args, min_words=3)  # noise needs a token between the BOS and the last
    model = load_from_args(args)
    if args.text is None:
        from idiom_lens.study.stages import run_tracing

        with executor(args, model) as where:
            result = run_tracing(model, probes, args.out, options=options, batch_size=args.batch_size,
                                 part_size=args.part_size, png=not args.no_png, executor=where)
        _print_summary(result.summary())
        print(f"{len(probes)} probes in {result.settings['seconds']:.1f} s; results in {args.out}")
        return 0
    return _run_text(args, model, probes[0], options)


def _run_text(args: argparse.Namespace, model, probe, options: TracingOptions) -> int:
    from idiom_lens.analyses.interventions.tracing import causal_trace

    result = causal_trace(model, [probe], options, batch_size=args.batch_size)
    info = result.probes.iloc[0]
    print(f"{probe.prompt!r} -> {info['clean_pred_token']!r} (p = {info['clean_prob']:.3f}; target {probe.target!r}); "
          f"noised: p = {info['corrupted_prob']:.3f}")
    rows = result.rows
    for (site, window), part in rows.groupby(["site", "window"], sort=False):
        best = part.loc[part["ie"].idxmax()]
        label = site if window == 1 else f"{site} (window {window})"
        print(f"  {label:<22} largest indirect effect {best['ie']:+.3f} at layer {int(best['layer'])}, "
              f"token {best['token']!r} ({best['position']})")
    if args.out is not None:
        from idiom_lens.plots import save_figure
        from idiom_lens.plots.tracing import tracing_heatmaps

        result.save(args.out)
        group = str(info["group"])
        save_figure(tracing_heatmaps(result, group=group), args.out / "tracing", png=not args.no_png, height=420)
        print(f"results in {args.out}")
    return 0


def _print_summary(summary) -> None:
    """Per set and site: the layer with the largest average indirect effect at the last noised
    token and at the last token."""
    for (group, site, window), part in summary.groupby(["group", "site", "window"], sort=False):
        cells = []
        for position in ("last noised", "last"):
            at = part[part["position"] == position]
            if at.empty:
                continue
            best = at.loc[at["aie"].idxmax()]
            cells.append(f"{position}: {best['aie']:+.3f} [{best['aie_low']:+.3f}, {best['aie_high']:+.3f}] "
                         f"at layer {int(best['layer'])}")
        label = site if window == 1 else f"{site} w{window}"
        print(f"  {group:<22} {label:<9} n = {int(part['n'].max()):<4} " + "; ".join(cells))
