"""Where recall lives (issue 14): every causal method and the direct logit attribution on the same
memorized and non-memorized idioms, per layer, in one figure.

    python experiments/where_recall_lives.py --out out/recall [--per-group 15] [--window 5]

Probes: the bundled idioms scored for memorization, then a seeded sample of `--per-group` memorized
and as many non-memorized idioms. On that one sample:
1. MLP knockouts: top-100 neurons of one layer at every position (the authors'), beside the
   magnitude-matched control;
2. causal tracing: noise on every prompt token but the BOS and the last (3x the embeddings' std),
   the residual stream restored at one layer, MLP and attention outputs in windows of `--window`
   layers, `--samples` noise draws;
3. attention knockout: the last position cut from the idiom's earlier words in windows of
   `--window` layers;
4. direct logit attribution (compatibility mode): the share of the logit each MLP layer writes.

Writes under --out: each result in its own folder (knockouts/, tracing/, attention_knockout/,
attribution/), recall_profile.parquet (measure x set x layer with n and 95% intervals),
recall_peaks.md, the figure where_recall_lives (HTML + PNG), and settings.json with timings.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    from idiom_lens.analyses.attribution import attribute_probes
    from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions, TracingOptions, knockout_grid
    from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutOptions, attention_knockout
    from idiom_lens.analyses.interventions.tracing import causal_trace
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.groups import MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS
    from idiom_lens.io import write_json
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.run import sample_by_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", default="idioms")
    parser.add_argument("--per-group", type=int, default=15,
                        help="memorized and non-memorized idioms each (default 15)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=5, help="tracing and attention-knockout window (default 5)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per probe (default 10)")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--redraw", action="store_true",
                        help="no model: read the four results saved under --out and redraw the table and figure")
    args = parser.parse_args()
    if args.redraw:
        return _draw(args.out, png=not args.no_png)

    started, seconds = time.perf_counter(), {}
    model = load_model(args.model)
    pool = list(load_probes(args.dataset))
    memo = score_memorization(model, pool, batch_size=32)
    group_of = {r.probe_id: r.group for r in memo.records}
    probes = [p for p in sample_by_group(memo, pool, per_group=args.per_group, seed=args.seed)
              if group_of[p.id] in (MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS)]
    png = not args.no_png

    def timed(name, fn):
        t = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t, 1)
        result.save(args.out / name)
        print(f"{name}: {seconds[name]:.0f} s")
        return result

    knockouts = KnockoutOptions(grid=KnockoutGrid.STUDY, controls=("matched",), positions="all", seed=args.seed)
    timed("knockouts", lambda: knockout_grid(model, probes, knockouts, progress=True))
    timed("attention_knockout", lambda: attention_knockout(
        model, probes, AttentionKnockoutOptions(window=args.window), progress=True))
    tracing = TracingOptions(windows=(args.window,), noise_samples=args.samples, seed=args.seed)
    trace = timed("tracing", lambda: causal_trace(model, probes, tracing, progress=True))
    compat = load_model(args.model, mode="compat")
    timed("attribution", lambda: attribute_probes(compat, probes, progress=True))

    write_json(args.out / "settings.json", {"model": model.settings(), "per_group": args.per_group, "seed": args.seed,
                                            "window": args.window, "samples": args.samples, "seconds": seconds,
                                            "n": {g: int(n) for g, n in trace.probes["group"].value_counts().items()}})
    _draw(args.out, png=png)
    print(f"total {time.perf_counter() - started:.0f} s -> {args.out}")


def _draw(out: Path, *, png: bool) -> None:
    """The profile table, its peaks and the figure, from the results saved under `out`."""
    import json

    from idiom_lens.analyses.attribution import AttributionResult
    from idiom_lens.analyses.interventions import AttentionKnockoutResult, KnockoutResult, TracingResult
    from idiom_lens.analyses.recall import recall_profile
    from idiom_lens.io import write_text
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.recall import where_recall_lives
    from idiom_lens.study.text import markdown_table

    profile = recall_profile(knockouts=KnockoutResult.load(out / "knockouts"),
                             tracing=TracingResult.load(out / "tracing"),
                             attention=AttentionKnockoutResult.load(out / "attention_knockout"),
                             attribution=AttributionResult.load(out / "attribution"))
    profile.save(out)
    write_text(out / "recall_peaks.md", markdown_table(profile.peaks()) + "\n")
    model_name = json.loads((out / "settings.json").read_text())["model"]["model_name"]
    save_figure(where_recall_lives(profile, title=f"Where recall lives, {model_name}"), out / "where_recall_lives",
                png=png, width=1100, height=1160)
    print(markdown_table(profile.peaks()))


if __name__ == "__main__":
    main()
