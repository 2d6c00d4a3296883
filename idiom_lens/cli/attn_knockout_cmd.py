"""`idiom-lens attn-knockout`: attention knockout (after Geva et al. 2023) over a probe set or one sequence.

`idiom-lens attn-knockout --dataset idioms --sample 20 --out DIR` writes the result
(attention_knockout*.parquet and its descriptor), the summary per set, source and layer as
attention_knockout_summary.csv (and .parquet), the same over confidence-matched memorized and
non-memorized idioms as attention_knockout_matched.csv, and the figure attention_knockout.html/.png;
`idiom-lens attn-knockout "once in a blue moon"` knocks out one sequence (its last word is the
target) and prints the effect per layer.

The effect is the change of the clean prediction's log probability (natural log; -0.69 halves
it), mean and median over probes; the relative change (p - p0) / p0 is printed beside it.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

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
    text_or_dataset_probes,
)
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.analyses.interventions.attention_knockouts import SOURCES, AttentionKnockoutOptions

    defaults = AttentionKnockoutOptions()
    p = subparsers.add_parser(
        "attn-knockout",
        help="attention knockout: cut the last position's attention to the context (or last word, BOS) layer by layer",
        description="Block the attention from the last prompt position to chosen source positions (the pre-softmax "
        "scores of those edges set to -inf, so the other weights renormalize) in a window of consecutive layers "
        "centred on each layer, and report the change of the log probability of the model's clean prediction "
        "(mean and median; the relative change beside it) and the share of changed predictions, per set "
        "(memorized idioms, non-memorized idioms, ...) with 95% intervals over probes (after Geva et al. 2023). "
        "Predictions range over real vocabulary tokens.",
    )
    p.add_argument("text", nargs="?", default=None, help="one sequence to knock out; its last word is the target")
    add_probe_options(p, required=False)
    add_model_options(p)
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(defaults.sources),
                   help="positions the last position may no longer attend to: context (the tokens of every prompt "
                        "word but the last), last_word (the last word's tokens before the last position), "
                        f"bos (the BOS token); each source is run separately (default {' '.join(defaults.sources)})")
    p.add_argument("--windows", type=int, nargs="+", default=[defaults.window], metavar="W",
                   help="consecutive layers blocked together, centred on each layer and clipped at the edges; one "
                        f"window length per run (default {defaults.window})")
    add_old_spelling(p, "--window", "--windows", dest="windows", convert=lambda w: [w], type=int, metavar="W")
    add_batch_size_option(p, default=64)
    add_output_options(p, required=False, note="required with --dataset; with TEXT, files are written only if given")
    add_worker_options(p)
    p.set_defaults(handler=_run)


def attention_knockout_options(args: argparse.Namespace) -> Any:
    """The `AttentionKnockoutOptions` of the command line: `InputError` for a bad value, or for more
    than one window (the analysis runs one window length; run the command once per length)."""
    from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutOptions

    if len(args.windows) != 1:
        raise InputError(f"--windows takes one window length for the attention knockout, got {args.windows}: "
                         "run the command once per length")
    return named_options(lambda: AttentionKnockoutOptions(sources=tuple(args.sources), window=args.windows[0]),
                         {"window": "--windows", "sources": "--sources"})


def print_strongest(summary: Any) -> None:
    """One line per set and source: the window with the largest mean drop of log p(clean
    prediction), with its interval, the median, the share changed and the relative change."""
    for (group, source), part in summary.groupby(["group", "source"], sort=False):
        if part["n"].max() == 0:
            continue
        worst = part.loc[part["logp_change"].idxmin()]
        print(f"{group} (n={int(part['n'].max())}), {source}: strongest drop at layers "
              f"{int(worst['window_first'])}-{int(worst['window_last'])}: log p {worst['logp_change']:+.2f} "
              f"[{worst['logp_change_low']:+.2f}, {worst['logp_change_high']:+.2f}], median "
              f"{worst['logp_change_median']:+.2f}; changed {worst['changed']:.0%} [{worst['changed_low']:.0%}, "
              f"{worst['changed_high']:.0%}]; relative change {worst['rel_change']:+.1%}")


def _run(args: argparse.Namespace) -> int:
    from idiom_lens.analyses.interventions.attention_knockouts import attention_knockout, confidence_matched

    options = attention_knockout_options(args)  # InputError before the model loads
    probes = text_or_dataset_probes(args)
    model = load_from_args(args)
    if args.out is not None:  # the files the study's stage writes
        from idiom_lens.study.stages import run_attention_knockout

        with executor(args, model) as where:
            result = run_attention_knockout(model, probes, args.out, options=options, batch_size=args.batch_size,
                                            png=not args.no_png, executor=where)
    else:
        result = attention_knockout(model, probes, options, batch_size=args.batch_size)
    if args.text is None:
        print_strongest(result.summary())
        matched = confidence_matched(result)
        if matched.n_group and matched.n_candidates:
            print(f"confidence-matched ({matched.group} with {matched.versus} whose clean prediction is as probable "
                  f"within a factor of {math.exp(matched.caliper):g}): {matched.n_pairs} pairs of "
                  f"{matched.n_group} {matched.group}")
            print_strongest(matched.summary)
        print(f"{len(probes)} probes in {result.settings['seconds']:.1f} s; results in {args.out}")
        return 0
    tok = model.tokenizer
    probe_row = result.probes.iloc[0]
    rows = result.rows
    print(f"{probes[0].prompt!r} -> predicts {tok.decode([int(probe_row['clean_pred_id'])])!r} "
          f"(p={probe_row['clean_prob']:.3f}; target {probes[0].target!r}, {probe_row['group']})")
    for source in options.sources:
        part = rows[rows["source"] == source]
        if part["reason"].iloc[0]:
            print(f"  {source}: nothing to block ({part['reason'].iloc[0]})")
            continue
        n_blocked = int(part["n_blocked"].iloc[0])
        print(f"  {source} ({n_blocked} position{'s' if n_blocked != 1 else ''} blocked):")
        for row in part.itertuples():
            new = "" if not row.changed else f", now predicts {tok.decode([int(row.new_pred_id)])!r}"
            print(f"    layer {row.layer:2d} (layers {row.window_first}-{row.window_last}): p={row.prob:.3f} "
                  f"(log p {row.logp_change:+.2f}, relative {row.rel_change:+.1%}){new}")
    if args.out is not None:
        print(f"results in {args.out}")
    return 0
