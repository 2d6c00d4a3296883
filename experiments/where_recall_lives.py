"""Where recall lives (issues 14, 29): every causal method and the direct logit attribution on the
same seeded sets, per layer, compared fairly between sets, in one table and one figure.

    python experiments/where_recall_lives.py --out out/recall [--per-set 50] [--seeds 0 1] [--window 5]

Sets, per seed (`idiom_lens.study.sets.comparison_sets`): `--per-set` memorized idioms,
non-memorized idioms and text windows, seeded, and the non-memorized idioms matched to the
memorized sample on the final probability of their prediction (confidence-matched, paired). Each
seed draws its own sample and its own noise; the seeds are pooled (distinct probes) for the
published table and compared for replication. Per seed, on the union of its sets:
1. MLP knockouts: the top-100 neurons of one layer (`--rank-by`, default effective) zeroed at
   every position, post-MLP norm frozen (primary) and live (secondary), beside a random control
   matched on the norm of the vector it removes;
2. causal tracing: noise on every prompt token but the BOS and the last (3x the embeddings' std,
   `--samples` draws), MLP and attention outputs restored in windows of `--window` layers at the
   last noised and the last token; normalized by each probe's total effect (floor
   `--min-total-effect`);
3. noise designs (no restoration): one word noised at a time, every word but the last, every
   word but the last two;
4. attention knockout: the last position cut from the earlier words in windows of `--window`
   layers and of 1 layer; change in log-probability;
5. direct logit attribution (compatibility mode): the share of the logit each MLP layer writes.

Writes under --out: seed<s>/<method>/ (each a resumable stage: a killed run resumes), seed<s>/
sets.json, recall_profile.parquet and recall_per_probe.parquet (pooled), recall_comparisons
.parquet (reference: memorized idioms; per layer max-T adjusted, per band Holm),
recall_replication.parquet (the comparisons per seed), recall_peaks.md, recall_comparisons.md,
noise_effects.md, the figure where_recall_lives (HTML + PNG) and settings.json with timings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--per-set", type=int, default=50, help="probes per sampled set and seed (default 50)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="sample and noise seeds (default 0 1)")
    parser.add_argument("--window", type=int, default=5, help="tracing and attention-knockout window (default 5)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per probe (default 10)")
    parser.add_argument("--min-total-effect", type=float, default=0.05,
                        help="tracing floor: probes whose noise removes less probability are not normalized")
    parser.add_argument("--rank-by", default="effective", help="knockout neuron ranking (default effective)")
    parser.add_argument("--no-live", action="store_true", help="skip the live-norm knockouts (secondary)")
    parser.add_argument("--patching", action="store_true",
                        help="also attribution patching of the MLP and attention outputs (a secondary measure)")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--redraw", action="store_true",
                        help="no model: read the results saved under --out and redraw the tables and figure")
    args = parser.parse_args()
    if args.redraw:
        return _draw(args.out, png=not args.no_png)

    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_json
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.localizers import LocalizerOptions, run_localizers
    from idiom_lens.study.sets import comparison_sets

    started, seconds = time.perf_counter(), {}
    model = load_model(args.model)
    compat = []  # the compatibility-mode model, loaded once when a stage first needs it

    def compat_model():
        if not compat:
            compat.append(load_model(args.model, mode="compat"))
        return compat[0]

    pool = list(load_probes("idioms")) + list(load_probes("text"))
    memo = score_memorization(model, pool, batch_size=32)
    n = {}
    for seed in args.seeds:
        sets = comparison_sets(memo, pool, per_set=args.per_set, seed=seed)
        folder = args.out / f"seed{seed}"
        write_json(folder / "sets.json", {"sets": {k: list(v) for k, v in sets.sets.items()},
                                          "matching": sets.matching})
        n[f"seed{seed}"] = sets.sizes() | {"union": len(sets.probes)}
        options = LocalizerOptions(norms=("frozen",) if args.no_live else ("frozen", "live"), rank_by=args.rank_by,
                                   window=args.window, noise_samples=args.samples, patching=args.patching,
                                   seed=seed)
        spent = run_localizers(model, list(sets.probes), folder, options, compat=compat_model)
        seconds |= {f"seed{seed}/{name}": s for name, s in spent.items()}
    write_json(args.out / "settings.json", {
        "model": model.settings(), "per_set": args.per_set, "seeds": args.seeds, "window": args.window,
        "samples": args.samples, "min_total_effect": args.min_total_effect, "rank_by": args.rank_by,
        "live": not args.no_live, "patching": args.patching, "seconds": seconds, "n": n,
        "total_seconds": round(time.perf_counter() - started, 1)})
    _draw(args.out, png=not args.no_png)
    print(f"total {time.perf_counter() - started:.0f} s -> {args.out}")


# --------------------------------------------------------------------------------------
# Tables and figure from the saved results
# --------------------------------------------------------------------------------------


def _profiles(out: Path) -> tuple[list, dict]:
    """Per seed: (seed, its `RecallProfile` over its sets, its matched pairs); and the pooled pairs."""
    from idiom_lens.study.localizers import localizer_profile

    settings = json.loads((out / "settings.json").read_text())
    profiles, pairs = [], {}
    for seed in settings["seeds"]:
        folder = out / f"seed{seed}"
        sets = json.loads((folder / "sets.json").read_text())
        profile = localizer_profile(folder, sets=sets["sets"], window=settings["window"],
                                    min_total_effect=settings["min_total_effect"], seed=seed)
        seed_pairs = sets["matching"].get("pairs", {})
        profiles.append((seed, profile, seed_pairs))
        for a, b in seed_pairs.items():  # pooled: a memorized idiom drawn twice keeps its first seed's pair
            pairs.setdefault(a, b)
    return profiles, pairs


def _draw(out: Path, *, png: bool) -> None:
    """The pooled profile, its comparisons, the replication per seed, the noise designs and the
    figure, from the results saved under `out`."""
    import pandas as pd

    from idiom_lens.analyses.recall import PER_PROBE_COLUMNS, RecallProfile, compare_sets, profile_from_per_probe
    from idiom_lens.io import write_parquet, write_text
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.recall import where_recall_lives
    from idiom_lens.study.sets import MATCHED_NON_MEMORIZED
    from idiom_lens.study.text import markdown_table

    settings = json.loads((out / "settings.json").read_text())
    profiles, pairs = _profiles(out)
    per_probe = (pd.concat([p.per_probe for _, p, _ in profiles], ignore_index=True)
                 .drop_duplicates(["measure", "group", "probe_id", "layer"], keep="first"))[PER_PROBE_COLUMNS]
    pooled = RecallProfile(profile_from_per_probe(per_probe), profiles[0][1].settings | {"seeds": settings["seeds"]},
                           per_probe.reset_index(drop=True))
    pooled.save(out)
    comparisons = compare_sets(pooled, pairs={MATCHED_NON_MEMORIZED: pairs})
    write_parquet(out / "recall_comparisons.parquet", comparisons)
    replication = pd.concat([compare_sets(p, pairs={MATCHED_NON_MEMORIZED: own}, seed=seed).assign(seed=seed)
                             for seed, p, own in profiles], ignore_index=True)
    write_parquet(out / "recall_replication.parquet", replication)
    write_text(out / "recall_peaks.md", markdown_table(pooled.peaks()) + "\n")
    bands = comparisons[comparisons["scope"] == "band"].drop(columns=["layer", "scope"])
    write_text(out / "recall_comparisons.md", markdown_table(bands) + "\n")
    effects = _noise_summary(out, settings)
    if effects is not None:
        write_parquet(out / "noise_effects_summary.parquet", effects)
        write_text(out / "noise_effects.md", markdown_table(effects) + "\n")
    model_name = settings["model"]["model_name"]
    save_figure(where_recall_lives(pooled, title=f"Where recall lives, {model_name}"), out / "where_recall_lives",
                png=png, width=1100, height=1400)
    save_figure(_distributions(pooled, title=f"Per-probe distributions by depth band, {model_name}"),
                out / "recall_distributions", png=png, width=1200, height=1300)
    print(markdown_table(bands))


def _distributions(profile, *, title: str):
    """Per probe, each primary measure's value per depth band (thirds): num / den averaged over
    the band's layers (the restored share IE / TE for tracing), as box plots per set."""
    import numpy as np
    import plotly.express as px

    from idiom_lens.analyses.recall import measure_info
    from idiom_lens.analyses.stats import depth_bands
    from idiom_lens.groups import group_color

    per = profile.per_probe
    per = per[[measure_info(m).primary for m in per["measure"]]]
    bands = depth_bands(int(per["layer"].max()) + 1)
    band_of = {layer: f"{name} ({span[0]}-{span[-1]})" for name, span in bands.items() for layer in span}
    per = per.assign(band=per["layer"].map(band_of))
    values = (per.groupby(["measure", "group", "probe_id", "band"], sort=False)[["num", "den"]].mean()
              .reset_index())
    values["value"] = values["num"] / values["den"].where(values["den"] != 0, np.nan)
    fig = px.box(values, x="band", y="value", color="group", facet_col="measure", facet_col_wrap=2,
                 facet_row_spacing=0.08, points="all", title=title,
                 color_discrete_map={g: group_color(g) for g in values["group"].unique()},
                 category_orders={"band": list(dict.fromkeys(band_of.values()))})
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1]))
    return fig.update_yaxes(matches=None, showticklabels=True).update_xaxes(showticklabels=True)


def _noise_summary(out: Path, settings: dict):
    """The noise designs' summary over the pooled sets (distinct probes), or None without results."""
    import pandas as pd

    from idiom_lens.analyses.interventions.noise_designs import NoiseEffectsResult

    results = []
    for seed in settings["seeds"]:
        folder = out / f"seed{seed}"
        if not (folder / "noise_effects").is_dir():
            return None
        sets = json.loads((folder / "sets.json").read_text())["sets"]
        results.append(NoiseEffectsResult.load(folder / "noise_effects").in_sets(sets))
    probes = pd.concat([r.probes for r in results], ignore_index=True).drop_duplicates(["probe_id", "group"])
    first: dict[str, int] = {}  # a probe drawn by several seeds counts once, with its first seed's noise
    for i, r in enumerate(results):
        for pid in r.probes["probe_id"]:
            first.setdefault(pid, i)
    rows = pd.concat([r.rows[r.rows["probe_id"].map(first) == i] for i, r in enumerate(results)], ignore_index=True)
    return NoiseEffectsResult(rows=rows, probes=probes, settings=results[0].settings).summary()


if __name__ == "__main__":
    main()
