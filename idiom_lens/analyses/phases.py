"""The two phases of recall (method.md section 3): candidate promotion, then confidence boosting.

Per probe, from the `resid_post` trajectory of the model's final predicted token:
- `promotion_layer`: the first layer from which the token stays top-1 to the end;
- `top10_layer`: the first layer at which the token enters the top-10;
- `confidence_gain`: its probability at the last layer minus at the promotion layer;
- `final_prob`: its probability at the last layer (the model's own confidence).
Per set: mean rank, probability, entropy and top-1 share per layer with seeded bootstrap 95%
intervals. The model's phase boundary is the first layer from which at least `top1_share` (half)
of the memorized idioms have their final prediction at top-1 through the last layer, i.e. their
median rank reaches and holds 0 (a mean rank is dominated by a few probes ranked in the
thousands, so it would put the boundary at the last layer on most models). Its relative depth
is (boundary + 1) / n_layers, the share of the model's layers done at the boundary (as in
`compare.py`), and the boundary is also given for top-1 shares from 0.3 to 0.8.

Evidence for "memorized idioms are promoted earlier": a two-sided permutation test on promotion
layers (difference of means) against each comparison set, with effect sizes and bootstrap
intervals; and the same test after matching every memorized probe to a comparison probe of the
same final probability (greedy nearest neighbour within a caliper), since memorized predictions
are more confident at the end, and confident predictions may settle earlier for that reason alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
from jaxtyping import Int

from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.analyses.stats import bootstrap_mean_ci, compare_samples, match_nearest
from idiom_lens.analyses.trajectory import TrajectoryResult
from idiom_lens.groups import GROUPS, ordered
from idiom_lens.metrics import TRAJECTORY_METRICS

CURVE_METRICS = tuple(TRAJECTORY_METRICS)  # pred_rank, pred_prob, pred_top1, target_rank, target_prob, entropy
# (memorized set, comparison set): promotion layers are compared for each pair present.
COMPARISONS = (
    ("memorized idioms", "non-memorized idioms"),
    ("memorized idioms", "ordinary text"),
    ("memorized facts", "non-memorized facts"),
)
VERDICT_SETS = ("non-memorized idioms", "ordinary text")  # memorized idioms must beat each one present
BOUNDARY_SHARES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
CONTROLS = ("all probes", "confidence-matched")
TEST_RULE = ("two-sided Monte Carlo permutation test of the difference of mean promotion layers; "
             "differences are comparison set minus memorized set (positive: memorized promoted earlier)")
MATCHING_RULE = ("greedy 1:1 nearest-neighbour matching on the final-layer probability of the predicted "
                 "token, without replacement, within the caliper, memorized probes in seeded random order")


def first_holding(ok: np.ndarray) -> np.ndarray:
    """Per row, the first index from which `ok` is true through the end (row length if never)."""
    holds = np.flip(np.logical_and.accumulate(np.flip(ok, axis=-1), axis=-1), axis=-1)
    return np.where(holds.any(axis=-1), holds.argmax(axis=-1), ok.shape[-1])


def promotion_layers(ranks: Int[np.ndarray, "probe layer"], *, top: int = 1) -> Int[np.ndarray, " probe"]:
    """First layer from which rank < `top` holds through the last layer (n_layers if never)."""
    return first_holding(ranks < top)


def first_entry_layers(ranks: Int[np.ndarray, "probe layer"], *, top: int = 10) -> Int[np.ndarray, " probe"]:
    """First layer at which rank < `top` (n_layers if never)."""
    ok = ranks < top
    return np.where(ok.any(axis=1), ok.argmax(axis=1), ranks.shape[1])


def relative_depth(layer: int | None, n_layers: int) -> float | None:
    """(layer + 1) / n_layers: the share of the model's layers done once `layer` (0-based) has run."""
    return None if layer is None else (layer + 1) / n_layers


@dataclass(frozen=True)
class PhaseAnalysis(Saved):
    """Per-probe phase measures, per-set curves with 95% bands, the model's boundary and the tests.

    `holds`: memorized idioms are promoted significantly earlier (permutation p < `alpha`, mean
    difference > 0) than non-memorized idioms and than ordinary text, where present, and their
    probability rises after the boundary. `holds_confidence_matched`: `holds`, and the same
    comparisons stay significant after matching on final probability (every matched comparison
    with at least `min_matched` pairs); None when `holds` but no matched comparison has enough pairs.
    """

    probes: pd.DataFrame  # probe_id, kind, group, memorized, promotion_layer, top10_layer, confidence_gain, final_prob
    curves: pd.DataFrame  # group, layer, metric, mean, mean_low, mean_high, n
    boundary_layer: int | None
    n_layers: int
    top1_share: float
    summary_text: str
    holds: bool
    boundary_depth: float | None = None  # (boundary_layer + 1) / n_layers
    boundary_sensitivity: pd.DataFrame | None = None  # top1_share, boundary_layer, boundary_depth
    promotion_tests: pd.DataFrame | None = None  # control, group, versus, SampleComparison fields, significant
    matching: pd.DataFrame | None = None  # group, versus, caliper, n_group, n_candidates, n_matched, tested, ...
    matched_pairs: pd.DataFrame | None = None  # versus, probe_id, matched_probe_id, final probs, promotion layers
    holds_confidence_matched: bool | None = None
    alpha: float = 0.05
    caliper: float = 0.05
    lens: str = "logit"  # the lens the trajectory was read through (`TrajectoryResult.lens`)

    def to_dataframe(self) -> pd.DataFrame:
        return self.group_table()

    # Saved as phases_per_probe.parquet, phases_curves.parquet, phases_<table>.parquet for each
    # optional table present, and phases.result.json with the scalars.
    default_name: ClassVar[str] = "phases"
    OPTIONAL_TABLES: ClassVar[tuple[str, ...]] = ("promotion_tests", "boundary_sensitivity", "matching",
                                                  "matched_pairs")

    @property
    def settings(self) -> dict[str, Any]:
        """What the phases were computed with (the rest is in the trajectory's settings)."""
        return {"lens": self.lens, "alpha": self.alpha, "caliper": self.caliper, "top1_share": self.top1_share}

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        tables = {"per_probe": self.probes, "curves": self.curves}
        return tables | {name: getattr(self, name) for name in self.OPTIONAL_TABLES if getattr(self, name) is not None}

    def saved_meta(self) -> dict[str, Any]:
        scalars = {f.name for f in fields(self)} - {"probes", "curves", *self.OPTIONAL_TABLES}
        return {name: getattr(self, name) for name in sorted(scalars)}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        optional = {name: saved.tables.get(name) for name in cls.OPTIONAL_TABLES}
        return cls(probes=saved.tables["per_probe"], curves=saved.tables["curves"], **optional, **saved.meta)

    def group_table(self) -> pd.DataFrame:
        """One row per set: size, median/mean promotion layer, top-10 entry, confidence gain."""
        return _group_table(self.probes)

    def to_dict(self) -> dict:
        return {
            "lens": self.lens,
            "boundary_layer": self.boundary_layer,
            "n_layers": self.n_layers,
            "boundary_rule": f"first layer from which >= {self.top1_share:g} of memorized idioms stay top-1",
            "boundary_depth": self.boundary_depth,
            "boundary_depth_rule": "(boundary_layer + 1) / n_layers",
            "boundary_sensitivity": _records(self.boundary_sensitivity),
            "two_phase_pattern_holds": self.holds,
            "two_phase_pattern_holds_confidence_matched": self.holds_confidence_matched,
            "alpha": self.alpha,
            "test_rule": TEST_RULE,
            "promotion_tests": _records(self.promotion_tests),
            "matching_rule": MATCHING_RULE,
            "caliper": self.caliper,
            "confidence_matching": _records(self.matching),
            "summary": self.summary_text,
            "groups": self.group_table().to_dict("records"),
        }


def _records(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Rows as plain Python values for JSON: numpy scalars unwrapped, NaN as None."""
    if frame is None:
        return []

    def plain(v: Any) -> Any:
        v = v.item() if isinstance(v, np.generic) else v
        return None if isinstance(v, float) and math.isnan(v) else v
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _group_table(per_probe: pd.DataFrame) -> pd.DataFrame:
    g = per_probe.groupby("group", sort=False)
    table = pd.DataFrame(
        {
            "n": g.size(),
            "median_promotion_layer": g["promotion_layer"].median(),
            "mean_promotion_layer": g["promotion_layer"].mean(),
            "median_top10_layer": g["top10_layer"].median(),
            "mean_confidence_gain": g["confidence_gain"].mean(),
        }
    ).reset_index()
    order = {name: i for i, name in enumerate(GROUPS)}
    return table.sort_values("group", key=lambda s: s.map(order).fillna(99)).reset_index(drop=True)


def analyse_phases(
    result: TrajectoryResult,
    *,
    top1_share: float = 0.5,
    n_boot: int = 1000,
    n_permutations: int = 10_000,
    alpha: float = 0.05,
    caliper: float = 0.05,
    min_matched: int = 5,
    seed: int = 0,
) -> PhaseAnalysis:
    """Promotion and confidence per probe and per set, from the `resid_post` trajectory.

    `n_boot` resamples for every interval; `n_permutations` relabellings per permutation test;
    `alpha` the significance level of the verdict; `caliper` the largest final-probability gap
    of a matched pair; `min_matched` the fewest pairs a matched comparison is tested with.
    """
    s = result.site("resid_post")
    mem = result.memorization.to_dataframe()
    ranks = result.pred_rank[:, s, :]
    probs = result.pred_prob[:, s, :]
    n_layers = result.n_layers
    promo = promotion_layers(ranks, top=1)
    top10 = first_entry_layers(ranks, top=10)
    last = n_layers - 1
    gain = probs[:, last] - probs[np.arange(len(promo)), np.minimum(promo, last)]
    gain = np.where(promo <= last, gain, np.nan)
    per_probe = mem[["probe_id", "kind", "group", "memorized", "hard_to_guess"]].assign(
        promotion_layer=promo, top10_layer=top10, confidence_gain=gain,
        final_prob=probs[:, last].astype(np.float64),
    )

    curve_rows = []
    for group in ordered(mem["group"]):
        rows = (mem["group"] == group).to_numpy()
        for metric in CURVE_METRICS:
            if metric == "pred_top1":
                values = (result.pred_rank[rows, s, :] == 0).astype(np.float64)
            else:
                values = getattr(result, metric)[rows, s, :]
            mean, low, high = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
            for layer in range(n_layers):
                curve_rows.append(
                    {"group": group, "layer": layer, "metric": metric, "mean": mean[layer],
                     "mean_low": low[layer], "mean_high": high[layer], "n": int(rows.sum())}
                )
    curves = pd.DataFrame(curve_rows)

    boundary = _boundary(curves, top1_share=top1_share, n_layers=n_layers)
    sensitivity = pd.DataFrame(
        [{"top1_share": share, "boundary_layer": b, "boundary_depth": relative_depth(b, n_layers)}
         for share in BOUNDARY_SHARES
         for b in [_boundary(curves, top1_share=share, n_layers=n_layers)]],
        dtype=object,
    )
    tests, matching, pairs = _promotion_tests(
        per_probe, n_permutations=n_permutations, n_boot=n_boot, alpha=alpha, caliper=caliper,
        min_matched=min_matched, seed=seed,
    )
    holds, holds_matched, text = _summarize(
        _group_table(per_probe), curves, tests, matching, sensitivity, boundary=boundary,
        n_layers=n_layers, top1_share=top1_share, caliper=caliper, min_matched=min_matched,
        model_name=result.settings.get("model_spec", "this model"),
    )
    return PhaseAnalysis(
        probes=per_probe, curves=curves, boundary_layer=boundary, n_layers=n_layers,
        top1_share=top1_share, summary_text=text, holds=holds,
        boundary_depth=relative_depth(boundary, n_layers), boundary_sensitivity=sensitivity,
        promotion_tests=tests, matching=matching, matched_pairs=pairs,
        holds_confidence_matched=holds_matched, alpha=alpha, caliper=caliper, lens=result.lens_kind,
    )


def _boundary(curves: pd.DataFrame, *, top1_share: float, n_layers: int) -> int | None:
    sel = curves[(curves["group"] == "memorized idioms") & (curves["metric"] == "pred_top1")]
    if sel.empty:
        return None
    share = sel.sort_values("layer")["mean"].to_numpy()
    layer = int(first_holding(share >= top1_share - 1e-9))  # k of n probes: 0.4 of 5 is a tie, not a miss
    return layer if layer < n_layers else None


def _promotion_tests(
    per_probe: pd.DataFrame, *, n_permutations: int, n_boot: int, alpha: float, caliper: float,
    min_matched: int, seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Permutation tests of promotion layers, on all probes and on confidence-matched pairs.

    Returns (tests, matching, pairs): one test row per (control, group, versus) that could be
    tested, one matching row per (group, versus) present, one row per matched pair.
    """
    def layers(group: str) -> pd.DataFrame:
        return per_probe[per_probe["group"] == group]

    def test_row(control: str, group: str, versus: str, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        c = compare_samples(a, b, n_permutations=n_permutations, n_boot=n_boot, seed=seed)
        return {"control": control, "group": group, "versus": versus, **c.to_dict(),
                "significant": bool(c.p_value < alpha), "earlier": bool(c.p_value < alpha and c.mean_diff > 0)}

    tests, matching, pairs = [], [], []
    for group, versus in COMPARISONS:
        g, v = layers(group), layers(versus)
        if g.empty or v.empty:
            continue
        tests.append(test_row("all probes", group, versus,
                              g["promotion_layer"].to_numpy(), v["promotion_layer"].to_numpy()))
        match = match_nearest(g["final_prob"].to_numpy(), v["final_prob"].to_numpy(), caliper=caliper, seed=seed)
        ok = match >= 0
        gm, vm = g[ok], v.iloc[match[ok]]
        tested = len(gm) >= min_matched
        matching.append({
            "group": group, "versus": versus, "caliper": caliper, "n_group": len(g), "n_candidates": len(v),
            "n_matched": len(gm), "tested": tested,
            "final_prob_group": float(g["final_prob"].mean()), "final_prob_versus": float(v["final_prob"].mean()),
            "final_prob_group_matched": float(gm["final_prob"].mean()) if len(gm) else np.nan,
            "final_prob_versus_matched": float(vm["final_prob"].mean()) if len(gm) else np.nan,
        })
        pairs.append(pd.DataFrame({
            "group": group, "versus": versus, "probe_id": gm["probe_id"].to_numpy(),
            "matched_probe_id": vm["probe_id"].to_numpy(), "final_prob": gm["final_prob"].to_numpy(),
            "matched_final_prob": vm["final_prob"].to_numpy(),
            "promotion_layer": gm["promotion_layer"].to_numpy(),
            "matched_promotion_layer": vm["promotion_layer"].to_numpy(),
        }))
        if tested:
            tests.append(test_row("confidence-matched", group, versus,
                                  gm["promotion_layer"].to_numpy(), vm["promotion_layer"].to_numpy()))
    pair_columns = ["group", "versus", "probe_id", "matched_probe_id", "final_prob", "matched_final_prob",
                    "promotion_layer", "matched_promotion_layer"]
    return (
        pd.DataFrame(tests),
        pd.DataFrame(matching),
        pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(columns=pair_columns),
    )


def _test_lookup(tests: pd.DataFrame, control: str, group: str, versus: str) -> pd.Series | None:
    if tests.empty:
        return None
    sel = tests[(tests["control"] == control) & (tests["group"] == group) & (tests["versus"] == versus)]
    return None if sel.empty else sel.iloc[0]


def _test_sentence(t: pd.Series) -> str:
    floor = t["p_value"] * (t["n_permutations"] + 1) < 1.5  # no relabelling as extreme as observed
    p = f"p = {t['p_value']:.2g}" + (", the smallest this number of relabellings can give" if floor else "")
    return (f"Permutation test ({t['alternative']}, {t['n_permutations']} relabellings): mean "
            f"{t['mean_diff']:+.1f} layers (95% CI {t['mean_diff_low']:+.1f} to {t['mean_diff_high']:+.1f}), "
            f"Cliff's delta {t['cliffs_delta']:+.2f}, {p}.")


def _summarize(
    table: pd.DataFrame, curves: pd.DataFrame, tests: pd.DataFrame, matching: pd.DataFrame,
    sensitivity: pd.DataFrame, *, boundary: int | None, n_layers: int, top1_share: float, caliper: float,
    min_matched: int, model_name: str,
) -> tuple[bool, bool | None, str]:
    """(holds, holds_confidence_matched, summary text)."""
    table = table.set_index("group")
    n, b = n_layers, boundary
    lines = []
    med = lambda g: table.loc[g, "median_promotion_layer"] if g in table.index else None  # noqa: E731
    # every model's last layer is top-1: b is None only without memorized idioms
    if b is None or med("memorized idioms") is None:
        return False, False, f"On {model_name}, no idiom is memorized; no phase boundary found."
    prob = curves[(curves["group"] == "memorized idioms") & (curves["metric"] == "pred_prob")]
    prob = prob.set_index("layer")["mean"]
    p_b, p_last = float(prob.loc[b]), float(prob.loc[n - 1])
    depth = relative_depth(b, n)
    if b == n - 1:
        lines.append(
            f"On {model_name} ({n} layers), fewer than {top1_share:.0%} of the memorized idioms settle "
            "at top-1 before the last layer; no phase boundary before the output."
        )
    else:
        lines.append(
            f"On {model_name} ({n} layers), at least {top1_share:.0%} of the memorized idioms have "
            f"their predicted token at top-1 from layer {b} (0-based) on: candidate promotion ends "
            f"there, after {b + 1} of {n} layers ({depth:.2f} of depth). Confidence boosting follows: "
            f"its mean probability rises from {p_b:.2f} at layer {b} to {p_last:.2f} at the last layer."
        )
        lines.append(
            "The boundary lies in the first half of the network: promotion of memorized idioms "
            "happens in early layers." if depth <= 0.5 else
            f"The boundary lies in the upper part of the network ({depth:.2f} of depth), so this does "
            "not show that recall happens in early layers."
        )
    shown = ", ".join(
        f"{r.top1_share:.0%}: {'none' if r.boundary_layer is None else r.boundary_layer}"
        for r in sensitivity.itertuples()
    )
    lines.append(f"Boundary layer by the share of memorized idioms required at top-1: {shown}.")

    earlier = []
    for group, versus in COMPARISONS:
        t = _test_lookup(tests, "all probes", group, versus)
        if t is None:
            continue
        lines.append(
            f"Median promotion layer: {group} {t['median_a']:.1f} vs {versus} {t['median_b']:.1f} "
            f"({t['median_diff']:+.1f} layers). " + _test_sentence(t)
        )
        if group == "memorized idioms" and versus in VERDICT_SETS:
            earlier.append(bool(t["earlier"]))
    holds = bool(earlier) and all(earlier) and p_last > p_b

    matched_earlier = []
    if not matching.empty:
        lines.append(f"Confidence-matched control (each memorized probe paired with the unused probe of nearest "
                     f"final probability, within {caliper:g}):")
    for m in matching.itertuples() if not matching.empty else ():
        head = f"{m.n_matched} of {m.n_group} {m.group} matched with {m.versus}"
        if not m.tested:
            lines.append(f"{head}, fewer than {min_matched}: not tested.")
            continue
        t = _test_lookup(tests, "confidence-matched", m.group, m.versus)
        lines.append(
            f"{head} (mean final probability {m.final_prob_group_matched:.2f} vs "
            f"{m.final_prob_versus_matched:.2f}; before matching {m.final_prob_group:.2f} vs "
            f"{m.final_prob_versus:.2f}): median promotion layer {t['median_a']:.1f} vs {t['median_b']:.1f} "
            f"({t['median_diff']:+.1f} layers). " + _test_sentence(t)
        )
        if m.group == "memorized idioms" and m.versus in VERDICT_SETS:
            matched_earlier.append(bool(t["earlier"]))
    if not holds:
        holds_matched: bool | None = False
    elif not matched_earlier:
        holds_matched = None
        lines.append("Too few confidence-matched pairs to test whether earlier promotion is more than confidence.")
    else:
        holds_matched = all(matched_earlier)
        lines.append(
            "Earlier promotion survives the confidence-matched control." if holds_matched else
            "Earlier promotion does not survive the confidence-matched control: it may reflect the "
            "higher final confidence of memorized predictions."
        )
    lines.append(
        "The two-phase pattern holds on this model." if holds
        else "The two-phase pattern does not clearly hold on this model."
    )
    return holds, holds_matched, " ".join(lines)
