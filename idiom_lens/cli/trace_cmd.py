"""`idiom-lens trace`: causal tracing (ROME) of a probe set or of one sequence.

`idiom-lens trace --dataset idioms --sample 20 --out DIR` traces a set in resumable parts and
writes tracing*.parquet (rows, probes, summary per set with 95% intervals, and tracing_share: the
share of the total effect restored, over the probes whose total effect reaches
`--min-total-effect`), heatmaps per set, layer curves and summary.json (noise scale and settings);
`idiom-lens trace "once in a blue moon"` traces one sequence (its last word is the target) and
prints where restoring helps most. `--noise-design` chooses what is noised (`noise_designs` says
what each design tests), `--positions key` restores the last noised and the last token only.

`idiom-lens trace --noise-effects ...` restores nothing: it measures what the noise alone does
under every noise design (the last token alone kept clean, the last two words kept clean, one word
noised at a time) and writes noise_effects*.parquet and a figure, or prints them for one sequence.
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
from idiom_lens.errors import InputError

if TYPE_CHECKING:
    from idiom_lens.analyses.interventions.tracing import TracingOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.analyses.interventions.noise_designs import TRACE_DESIGNS
    from idiom_lens.analyses.interventions.tracing import RESTORED_POSITIONS, TRACE_SITES, TracingOptions
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
    p.add_argument("--noise-design", choices=TRACE_DESIGNS, default=None,
                   help="what is noised: every prompt token but the BOS and the last (all_but_last, ROME's; "
                        "tests whether the last token plus a restored site suffices) or every prompt word but the "
                        f"last two (all_but_last_two); default {defaults.noise_design}")
    p.add_argument("--noise-words", type=int, nargs=2, default=None, metavar=("FIRST", "STOP"),
                   help="noise the prompt words FIRST..STOP-1 (Python slice, negative from the end) instead of "
                        "a --noise-design")
    p.add_argument("--positions", choices=RESTORED_POSITIONS, default=defaults.positions,
                   help="restore at every position (all) or at the last noised token and the last token only "
                        f"(key: the two the recall profile reads, much faster); default {defaults.positions}")
    p.add_argument("--min-total-effect", type=float, default=default_of(run_tracing, "min_total_effect"),
                   metavar="X", help="the restored share (mean IE / mean TE) counts the probes whose total effect "
                                     "reaches X; the others are reported as dropped (default %(default)g)")
    p.add_argument("--noise-effects", action="store_true",
                   help="restore nothing: what the noise alone does under every noise design (all_but_last, "
                        "all_but_last_two, each_word: one word at a time, which tests each word's necessity)")
    add_part_size_option(p, default=default_of(run_tracing, "part_size"))
    add_batch_size_option(p, default=128)
    add_output_options(p, required=False, note="required with --dataset; with TEXT, figures are written only if given")
    add_worker_options(p)
    p.set_defaults(handler=_run)


def tracing_options(args: argparse.Namespace) -> TracingOptions:
    """The `TracingOptions` of the command line (`InputError` for a bad value)."""
    from idiom_lens.analyses.interventions.tracing import TracingOptions

    design = args.noise_design if args.noise_design is not None else TracingOptions().noise_design
    return named_options(
        lambda: TracingOptions(sites=tuple(args.sites), windows=tuple(args.windows), noise_samples=args.noise_samples,
                               multiplier=args.noise_multiplier, noise_design=design,
                               noise_words=tuple(args.noise_words) if args.noise_words else None,
                               positions=args.positions, seed=args.seed),
        {"sites": "--sites", "windows": "--windows", "noise_samples": "--noise-samples",
         "multiplier": "--noise-multiplier", "noise_design": "--noise-design", "noise_words": "--noise-words",
         "positions": "--positions"})


def _run(args: argparse.Namespace) -> int:
    options = tracing_options(args)  # InputError before the model loads
    if not args.min_total_effect > 0:
        raise InputError(f"--min-total-effect must be > 0, got {args.min_total_effect:g}")
    if args.noise_effects:
        if args.noise_design is not None or args.noise_words is not None:
            raise InputError("--noise-effects measures every noise design; --noise-design and --noise-words choose "
                             "what a full trace noises")
        return _run_noise_effects(args)
    # the noise needs a token between the BOS and the last; all_but_last_two, three prompt words
    min_words = 4 if options.noise_design == "all_but_last_two" else 3
    probes = text_or_dataset_probes(args, min_words=min_words)
    model = load_from_args(args)
    if args.text is None:
        from idiom_lens.study.stages import run_tracing

        with executor(args, model) as where:
            result = run_tracing(model, probes, args.out, options=options, batch_size=args.batch_size,
                                 part_size=args.part_size, min_total_effect=args.min_total_effect,
                                 png=not args.no_png, executor=where)
        _print_summary(result.summary(), result.restored_share(min_total_effect=args.min_total_effect))
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


def _print_summary(summary, share) -> None:
    """Per set and site: the layer with the largest average indirect effect at the last noised
    token and at the last token, and the share of the total effect restored there."""
    floor = share.attrs["min_total_effect"]
    print(f"largest average indirect effect per set and site; share: mean IE / mean TE over the probes with a total "
          f"effect >= {floor:g}")
    keys = ["group", "site", "window", "position", "layer"]
    shares = share.set_index(keys)
    for (group, site, window), part in summary.groupby(["group", "site", "window"], sort=False):
        cells = []
        for position in ("last noised", "last"):
            at = part[part["position"] == position]
            if at.empty:
                continue
            best = at.loc[at["aie"].idxmax()]
            s = shares.loc[tuple(best[k] for k in keys)]
            kept = (f"share {s['share']:.2f} [{s['share_low']:.2f}, {s['share_high']:.2f}] of {int(s['n'])}"
                    if s["n"] else f"no share: all {int(s['n_dropped'])} below the floor")
            cells.append(f"{position}: {best['aie']:+.3f} [{best['aie_low']:+.3f}, {best['aie_high']:+.3f}] "
                         f"at layer {int(best['layer'])}, {kept}")
        label = site if window == 1 else f"{site} w{window}"
        print(f"  {group:<22} {label:<9} n = {int(part['n'].max()):<4} " + "; ".join(cells))


def _run_noise_effects(args: argparse.Namespace) -> int:
    """`--noise-effects`: what the noise alone does, for a set (in parts, written to --out) or one sequence."""
    from idiom_lens.analyses.interventions.noise_designs import noise_effects, noise_scale

    probes = text_or_dataset_probes(args, min_words=4)  # all_but_last_two keeps two of three or more prompt words
    model = load_from_args(args)
    options = {"noise_samples": args.noise_samples, "multiplier": args.noise_multiplier, "seed": args.seed}
    if args.text is None:
        from idiom_lens.study.stages.tracing import run_noise_effects

        with executor(args, model) as where:
            result = run_noise_effects(model, probes, args.out, **options, batch_size=args.batch_size,
                                       part_size=args.part_size, png=not args.no_png, executor=where)
        _print_noise_summary(result.summary())
        print(f"{len(probes)} probes in {result.settings['seconds']:.1f} s; results in {args.out}")
        return 0
    scale = noise_scale(model, multiplier=args.noise_multiplier)
    result = noise_effects(model, probes, noise_samples=args.noise_samples, seed=args.seed, scale=scale,
                           batch_size=args.batch_size)
    info = result.probes.iloc[0]
    print(f"{info['prompt']!r} -> {info['clean_pred_token']!r} (p = {info['clean_prob']:.3f}; target "
          f"{info['target']!r}); noised:")
    for _, row in result.rows.iterrows():
        what = row["design"] if row["word"] < 0 else f"word {int(row['word_from_end'])} ({row['words']!r})"
        print(f"  {what:<26} p = {row['corrupted_prob']:.3f}  total effect {row['total_effect']:+.3f}  "
              f"log-prob change {row['logprob_change']:+.2f}  prediction changed in {row['pred_changed']:.0%}")
    if args.out is not None:
        from idiom_lens.plots import save_figure
        from idiom_lens.plots.tracing import noise_effects_figure

        result.save(args.out)
        save_figure(noise_effects_figure(result), args.out / "noise_effects", png=not args.no_png, height=420)
        print(f"results in {args.out}")
    return 0


def _print_noise_summary(summary) -> None:
    """Per set: the mean total effect of each noised span, of the most necessary single word and of
    the last word, with 95% intervals."""
    print("mean total effect of the noise alone [95% interval], per set")
    for group, part in summary.groupby("group", sort=False):
        cells = []
        for _, row in part.iterrows():
            if row["unit"] == "word" and row["word_from_end"] != -1:
                continue
            label = {"span": row["design"], "word": "last word alone",
                     "most necessary word": "most necessary word"}[row["unit"]]
            cells.append(f"{label} {row['total_effect']:+.3f} [{row['total_effect_low']:+.3f}, "
                         f"{row['total_effect_high']:+.3f}]")
        print(f"  {group:<22} n = {int(part['n'].max()):<4} " + "; ".join(cells))
