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

Evidence for "memorized idioms are promoted earlier", against each comparison set, in three
controls: on all probes (two-sided permutation test of the difference of mean promotion layers,
effect sizes, bootstrap intervals); on confidence-matched pairs (every memorized probe matched to
a comparison probe of nearly the same final probability, greedy nearest neighbour within a
caliper; a paired sign-flip test); and on all probes stratified by final probability (the
difference within quintiles of the final probability, a stratified permutation test). Memorized
predictions are more confident at the end, and confident predictions may settle earlier for that
reason alone, so the two confidence controls decide the verdict (`two_phase_verdict`). Every test
of one analysis (one model, one lens) is one family: its p-values are Holm-adjusted together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
from jaxtyping import Int

from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.analyses.stats import (
    bootstrap_mean_ci,
    cliffs_delta,
    compare_samples,
    holm,
    match_nearest,
    paired_comparison,
    stratified_difference,
)
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
CONTROLS = ("all probes", "confidence-matched", "confidence-stratified")
CONFIDENCE_CONTROLS = CONTROLS[1:]  # the controls the verdict reads
N_STRATA = 5  # quantile strata of the final probability in the stratified control
TESTS = {  # control -> the test of its rows (the `test` column)
    "all probes": "permutation of set labels (unpaired)",
    "confidence-matched": "sign flips of matched-pair differences (paired)",
    "confidence-stratified": f"set labels permuted within {N_STRATA} quantile strata of the final probability",
}
CORRECTION = "holm"
FAMILY_RULE = "every promotion test of one analysis (one model, one lens): all controls, groups and comparison sets"
TEST_RULE = ("two-sided permutation tests of the difference of mean promotion layers: on all probes unpaired "
             "(relabelling), on confidence-matched pairs paired (sign flips, exact when all patterns fit; "
             "median_diff is then the median paired difference), on all probes stratified by final probability "
             "(relabelling within strata; mean_diff is the size-weighted mean of the within-stratum differences); "
             "differences are comparison set minus memorized set (positive: memorized promoted earlier); "
             "p_adjusted: Holm over " + FAMILY_RULE + "; significant and earlier use p_adjusted")
MATCHING_RULE = ("greedy 1:1 nearest-neighbour matching on the final-layer probability of the predicted "
                 "token, without replacement, within the caliper, memorized probes in seeded random order")
VERDICT_HOLDS = "The two-phase pattern holds on this model."
VERDICT_FAILS = "The two-phase pattern does not clearly hold on this model."
VERDICT_RULE = ("holds when the memorized idioms' mean probability of their predicted token rises from the "
                "boundary layer to the last layer, and against each of non-memorized idioms and ordinary text "
                "that is present (at least one) every confidence control that was tested (confidence-matched, "
                "confidence-stratified; at least one) has memorized idioms promoted earlier: mean difference > 0 "
                "with Holm-adjusted p < alpha. The comparison on all probes does not enter the verdict.")


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

    `holds`: the verdict of `two_phase_verdict` (its rule: `VERDICT_RULE`), i.e. memorized idioms
    are promoted earlier than non-memorized idioms and than ordinary text beyond what their final
    confidence explains (confidence-matched and stratified controls, Holm-adjusted p < `alpha`),
    and their probability rises after the boundary. `holds_confidence_matched`: the
    confidence-matched (paired) comparisons alone have memorized idioms promoted earlier at
    adjusted p < `alpha`; None when no such comparison has `min_matched` pairs.
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
    # control, group, versus, test, n_a, n_b, n_a_total, n_b_total, n_pairs, n_strata, effect sizes, p_value,
    # p_adjusted, correction, family, family_size, significant, earlier (`_promotion_tests`)
    promotion_tests: pd.DataFrame | None = None
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
        return {"lens": self.lens, "alpha": self.alpha, "caliper": self.caliper, "top1_share": self.top1_share,
                "correction": CORRECTION, "family": FAMILY_RULE, "n_strata": N_STRATA}

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
            "verdict_rule": VERDICT_RULE,
            "alpha": self.alpha,
            "test_rule": TEST_RULE,
            "correction": CORRECTION,
            "family": FAMILY_RULE,
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

    `n_boot` resamples for every interval; `n_permutations` relabellings (or sign flips) per
    permutation test; `alpha` the significance level, applied to Holm-adjusted p-values (the
    `significant` / `earlier` columns and the verdict); `caliper` the largest final-probability gap
    of a matched pair; `min_matched` the fewest pairs a matched comparison is tested with, and the
    fewest probes of each set a stratified comparison is tested with.
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
        n_layers=n_layers, top1_share=top1_share, caliper=caliper, min_matched=min_matched, alpha=alpha,
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


TEST_COLUMNS = [
    "control", "group", "versus", "test", "n_a", "n_b", "n_a_total", "n_b_total", "n_pairs", "n_strata",
    "median_a", "median_b", "median_diff", "median_diff_low", "median_diff_high",
    "mean_a", "mean_b", "mean_diff", "mean_diff_low", "mean_diff_high", "cliffs_delta",
    "p_value", "alternative", "n_permutations", "exact", "p_adjusted", "correction", "family", "family_size",
    "significant", "earlier",
]


def _promotion_tests(
    per_probe: pd.DataFrame, *, n_permutations: int, n_boot: int, alpha: float, caliper: float,
    min_matched: int, seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tests of promotion layers per (group, versus) in `COMPARISONS`, in each of `CONTROLS`.

    - "all probes": `compare_samples` (unpaired permutation test) on every probe of both sets;
    - "confidence-matched": `paired_comparison` (sign-flip test) on the pairs `match_nearest`
      forms on final probability; tested with at least `min_matched` pairs;
    - "confidence-stratified": `stratified_difference` on every probe, in `N_STRATA` quantile
      strata of the final probability; tested with at least `min_matched` probes of each set in
      strata holding both.
    n_a / n_b count the probes a test used, n_a_total / n_b_total the probes of each set (so the
    share the matching or the strata kept is in the table). All rows are one family: `p_adjusted`
    is Holm's over them, and `significant` / `earlier` read it.

    Returns (tests, matching, pairs): one test row per comparison and control that could be
    tested, one matching row per (group, versus) present, one row per matched pair.
    """
    def layers(group: str) -> pd.DataFrame:
        return per_probe[per_probe["group"] == group]

    def test_row(control: str, group: str, versus: str, n_a_total: int, n_b_total: int, **values: Any) -> dict:
        return {"control": control, "group": group, "versus": versus, "test": TESTS[control],
                "n_a_total": n_a_total, "n_b_total": n_b_total, "exact": False, **values}

    options = {"n_permutations": n_permutations, "n_boot": n_boot, "seed": seed}
    tests, matching, pairs = [], [], []
    for group, versus in COMPARISONS:
        g, v = layers(group), layers(versus)
        if g.empty or v.empty:
            continue
        g_layers, v_layers = g["promotion_layer"].to_numpy(), v["promotion_layer"].to_numpy()
        tests.append(test_row("all probes", group, versus, len(g), len(v),
                              **compare_samples(g_layers, v_layers, **options).to_dict()))
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
            a, b = gm["promotion_layer"].to_numpy(), vm["promotion_layer"].to_numpy()
            paired = paired_comparison(a, b, **options).to_dict()
            n_pairs = paired.pop("n_pairs")
            tests.append(test_row("confidence-matched", group, versus, len(g), len(v), n_a=n_pairs, n_b=n_pairs,
                                  n_pairs=n_pairs, cliffs_delta=cliffs_delta(a, b), **paired))
        strat = stratified_difference(
            np.concatenate([g_layers, v_layers]), np.arange(len(g) + len(v)) < len(g),
            np.concatenate([g["final_prob"].to_numpy(), v["final_prob"].to_numpy()]), n_strata=N_STRATA, **options,
        )
        if min(strat.n_a, strat.n_b) >= min_matched:
            tests.append(test_row(
                "confidence-stratified", group, versus, len(g), len(v), n_a=strat.n_a, n_b=strat.n_b,
                n_strata=strat.n_strata, mean_diff=strat.difference, mean_diff_low=strat.difference_low,
                mean_diff_high=strat.difference_high, p_value=strat.p_value, alternative=strat.alternative,
                n_permutations=strat.n_permutations,
            ))
    table = pd.DataFrame(tests, columns=TEST_COLUMNS)
    table["p_adjusted"] = holm(table["p_value"].to_numpy(dtype=np.float64))
    table["correction"] = CORRECTION
    table["family"] = f"the {len(table)} promotion tests of this analysis (one model, one lens)"
    table["family_size"] = len(table)
    table["significant"] = (table["p_adjusted"] < alpha).astype(bool)
    table["earlier"] = (table["significant"] & (table["mean_diff"] > 0)).astype(bool)
    pair_columns = ["group", "versus", "probe_id", "matched_probe_id", "final_prob", "matched_final_prob",
                    "promotion_layer", "matched_promotion_layer"]
    return (
        table,
        pd.DataFrame(matching),
        pd.concat(pairs, ignore_index=True) if pairs else pd.DataFrame(columns=pair_columns),
    )


def _test_lookup(tests: pd.DataFrame, control: str, group: str, versus: str) -> pd.Series | None:
    if tests.empty:
        return None
    sel = tests[(tests["control"] == control) & (tests["group"] == group) & (tests["versus"] == versus)]
    return None if sel.empty else sel.iloc[0]


def _earlier(t: pd.Series, *, alpha: float) -> bool:
    """Memorized promoted earlier in this test: mean difference > 0 with Holm-adjusted p < alpha."""
    return bool(t["mean_diff"] > 0 and t["p_adjusted"] < alpha)


def two_phase_verdict(tests: pd.DataFrame, *, boosted: bool, alpha: float) -> str:
    """`VERDICT_HOLDS` or `VERDICT_FAILS`: the one rule that decides "the two-phase pattern holds".

    The rule (`VERDICT_RULE`): the pattern holds when `boosted` (the memorized idioms' mean
    probability of their predicted token is higher at the last layer than at the boundary layer),
    and for each of `VERDICT_SETS` present in `tests` (at least one), every confidence control
    that was tested for "memorized idioms vs that set" (`CONFIDENCE_CONTROLS`: the paired
    confidence-matched test and the test stratified by final probability; at least one of them)
    has memorized idioms promoted earlier: mean difference > 0 and Holm-adjusted p (over the whole
    family of promotion tests) < `alpha`. The unmatched comparison on all probes does not count:
    memorized predictions are more confident, and confidence alone may make a token settle earlier.
    """
    if not boosted:
        return VERDICT_FAILS
    present = [v for v in VERDICT_SETS if _test_lookup(tests, "all probes", "memorized idioms", v) is not None]
    if not present:
        return VERDICT_FAILS
    for versus in present:
        controlled = [t for c in CONFIDENCE_CONTROLS
                      if (t := _test_lookup(tests, c, "memorized idioms", versus)) is not None]
        if not controlled or not all(_earlier(t, alpha=alpha) for t in controlled):
            return VERDICT_FAILS
    return VERDICT_HOLDS


def _test_sentence(t: pd.Series) -> str:
    """The test of one row, its effect with interval, and its p-value unadjusted and adjusted."""
    n = int(t["n_permutations"])
    if t["control"] == "confidence-matched":
        name = "Sign-flip test (paired, "
        draws = f"all {n} sign patterns" if bool(t["exact"]) else f"{n} sign flips"
        floor = t["p_value"] * n < 2.5 if bool(t["exact"]) else t["p_value"] * (n + 1) < 1.5
        smallest = f"the smallest {int(t['n_pairs'])} pairs can give" if bool(t["exact"]) else \
            "the smallest this number of sign flips can give"
    else:
        name = "Stratified permutation test (" if t["control"] == "confidence-stratified" else "Permutation test ("
        draws, floor = f"{n} relabellings", t["p_value"] * (n + 1) < 1.5  # no relabelling as extreme as observed
        smallest = "the smallest this number of relabellings can give"
    p = f"p = {t['p_value']:.2g}" + (f", {smallest}" if floor else "")
    cliff = "" if pd.isna(t["cliffs_delta"]) else f"Cliff's delta {t['cliffs_delta']:+.2f}, "
    sentence = (f"{name}{t['alternative']}, {draws}): mean "
                f"{t['mean_diff']:+.1f} layers (95% CI {t['mean_diff_low']:+.1f} to {t['mean_diff_high']:+.1f}), "
                f"{cliff}{p}")
    if "p_adjusted" in t and not pd.isna(t["p_adjusted"]):
        sentence += f"; Holm-adjusted over the {int(t['family_size'])} promotion tests: p = {t['p_adjusted']:.2g}"
    return sentence + "."


def _summarize(
    table: pd.DataFrame, curves: pd.DataFrame, tests: pd.DataFrame, matching: pd.DataFrame,
    sensitivity: pd.DataFrame, *, boundary: int | None, n_layers: int, top1_share: float, caliper: float,
    min_matched: int, alpha: float, model_name: str,
) -> tuple[bool, bool | None, str]:
    """(holds, holds_confidence_matched, summary text); the verdict is `two_phase_verdict`'s."""
    table = table.set_index("group")
    n, b = n_layers, boundary
    lines = []
    med = lambda g: table.loc[g, "median_promotion_layer"] if g in table.index else None  # noqa: E731
    # every model's last layer is top-1: b is None only without memorized idioms
    if b is None or med("memorized idioms") is None:
        return False, None, f"On {model_name}, no idiom is memorized; no phase boundary found."
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

    compared, earlier = [], []
    for group, versus in COMPARISONS:
        t = _test_lookup(tests, "all probes", group, versus)
        if t is None:
            continue
        compared.append((group, versus))
        lines.append(
            f"Median promotion layer: {group} {t['median_a']:.1f} vs {versus} {t['median_b']:.1f} "
            f"({t['median_diff']:+.1f} layers). " + _test_sentence(t)
        )
        if group == "memorized idioms" and versus in VERDICT_SETS:
            earlier.append(_earlier(t, alpha=alpha))

    matched_earlier = []
    if not matching.empty:
        lines.append(f"Confidence-matched control (each memorized probe paired with the unused probe of nearest "
                     f"final probability, within {caliper:g}; paired tests):")
    for m in matching.itertuples() if not matching.empty else ():
        head = f"{m.n_matched} of {m.n_group} {m.group} matched with {m.n_matched} of {m.n_candidates} {m.versus}"
        if not m.tested:
            lines.append(f"{head}, fewer than {min_matched}: not tested.")
            continue
        t = _test_lookup(tests, "confidence-matched", m.group, m.versus)
        lines.append(
            f"{head} (mean final probability {m.final_prob_group_matched:.2f} vs "
            f"{m.final_prob_versus_matched:.2f}; before matching {m.final_prob_group:.2f} vs "
            f"{m.final_prob_versus:.2f}): median promotion layer {t['median_a']:.1f} vs {t['median_b']:.1f}, "
            f"median paired difference {t['median_diff']:+.1f} layers. " + _test_sentence(t)
        )
        if m.group == "memorized idioms" and m.versus in VERDICT_SETS:
            matched_earlier.append(_earlier(t, alpha=alpha))
    if compared:
        lines.append(f"Confidence-stratified control (all probes, the difference within {N_STRATA} quantile "
                     "strata of the final probability, weighted by stratum size):")
    for group, versus in compared:
        t = _test_lookup(tests, "confidence-stratified", group, versus)
        if t is None:
            lines.append(f"{group} vs {versus}: fewer than {min_matched} probes of each set share a stratum: "
                         "not tested.")
            continue
        lines.append(f"{group} vs {versus}, {int(t['n_a'])} of {int(t['n_a_total'])} and {int(t['n_b'])} of "
                     f"{int(t['n_b_total'])} probes in the {int(t['n_strata'])} strata holding both sets. "
                     + _test_sentence(t))

    holds_matched = all(matched_earlier) if matched_earlier else None
    if earlier and holds_matched is None:
        lines.append("Too few confidence-matched pairs to test whether earlier promotion is more than confidence.")
    elif holds_matched:
        lines.append("Earlier promotion survives the confidence-matched control.")
    elif holds_matched is False and earlier and all(earlier):
        lines.append("Earlier promotion does not survive the confidence-matched control: it may reflect the "
                     "higher final confidence of memorized predictions.")
    elif holds_matched is False:
        lines.append("Memorized idioms are not promoted earlier under the confidence-matched control either.")
    verdict = two_phase_verdict(tests, boosted=p_last > p_b, alpha=alpha)
    lines.append(verdict)
    return verdict == VERDICT_HOLDS, holds_matched, " ".join(lines)
