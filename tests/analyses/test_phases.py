"""The two phases: promotion layers, curves with bands, boundary, summary."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from idiom_lens.analyses.memorization import MemorizationRecord, MemorizationResult, probe_group
from idiom_lens.analyses.phases import (
    VERDICT_FAILS,
    VERDICT_HOLDS,
    VERDICT_SETS,
    analyse_phases,
    first_entry_layers,
    promotion_layers,
    two_phase_verdict,
)
from idiom_lens.analyses.stats import bootstrap_mean_ci, holm
from idiom_lens.analyses.trajectory import TrajectoryResult, layer_trajectory

N_LAYERS = 8
MODEL = "synthetic-8"
PRED_ID, OTHER_ID = 7, 9


def _ranks(promotion: int, *, n_layers: int = N_LAYERS) -> list[int]:
    """Predicted token's rank per layer: 20 (outside the top-10) before `promotion`, 0 from it on."""
    return [20 if layer < promotion else 0 for layer in range(n_layers)]


def _probs(ranks: Sequence[int], *, boost: bool, final: float | None = None) -> list[float]:
    """Predicted token's probability: 0.05 while not top-1; from the first top-1 layer, 0.3 rising by
    0.15 per layer up to 0.9 (`boost`), or staying at 0.3 (no confidence boosting). With `final` (and
    `boost`), the top-1 layers rise linearly from min(0.3, final) to `final` at the last layer instead."""
    first = next(layer for layer, rank in enumerate(ranks) if rank == 0)
    if final is not None and boost:
        start, n_top = min(0.3, final), len(ranks) - 1 - first
        return [0.05 if layer < first else (start + (final - start) * (layer - first) / n_top if n_top else final)
                for layer in range(len(ranks))]
    return [0.05 if rank > 0 else (min(0.9, 0.3 + 0.15 * (layer - first)) if boost else 0.3)
            for layer, rank in enumerate(ranks)]


def synthetic_result(probes: Sequence[tuple], *, boost: bool = True) -> TrajectoryResult:
    """The smallest valid TrajectoryResult: one `resid_post` site, one record per
    (kind, memorized, ranks) or (kind, memorized, ranks, final probability).

    `ranks` is the predicted token's rank per layer (0 at the last layer, as in a real result).
    """
    records, ranks, probs = [], [], []
    for i, (kind, memorized, rank_row, *final) in enumerate(probes):
        assert rank_row[-1] == 0  # the last layer's read-out is the model's own prediction
        prob_row = _probs(rank_row, boost=boost, final=final[0] if final else None)
        records.append(MemorizationRecord(
            probe_id=f"p{i}", kind=kind, group=probe_group(kind, memorized), hard_to_guess=True,
            prompt="one two three", target="four", target_id=PRED_ID if memorized else OTHER_ID,
            target_token=" four", n_target_tokens=1, pred_id=PRED_ID, pred_token=" four" if memorized else " five",
            memorized=memorized, pred_prob=prob_row[-1], target_rank=0 if memorized else 1,
            target_prob=prob_row[-1] if memorized else 0.01, full_target_match=memorized,
        ))
        ranks.append(rank_row)
        probs.append(prob_row)
    pred_rank = np.array(ranks, dtype=np.int64)[:, None, :]
    pred_prob = np.array(probs, dtype=np.float32)[:, None, :]
    memorized = np.array([r.memorized for r in records])[:, None, None]
    return TrajectoryResult(
        memorization=MemorizationResult(records=tuple(records), settings={"model_spec": MODEL}),
        sites=("resid_post",),
        pred_rank=pred_rank,
        pred_prob=pred_prob,
        target_rank=np.where(memorized, pred_rank, pred_rank + 1),
        target_prob=np.where(memorized, pred_prob, np.float32(0.01)),
        entropy=np.where(pred_rank == 0, 1.0, 3.0).astype(np.float32),
        top_id=np.where(pred_rank == 0, PRED_ID, 3).astype(np.int64),
    )


def _probes(
    memorized: Sequence[int], non_memorized: Sequence[int], text: Sequence[int], *, final: float | None = 0.9
) -> list[tuple]:
    """Probes promoted (top-1 through the last layer) at the given layers, per set.

    Every probe ends at the same probability `final` (0.3 at its promotion layer, rising to 0.9), so
    final confidence does not differ between sets and the confidence controls can be tested (every
    probe matches, one stratum). `final=None`: the probability rises 0.15 per layer from 0.3 (up to
    0.9), so probes promoted earlier end more confident, and the sets do not overlap in confidence."""
    end = () if final is None else (final,)
    return ([("idiom", True, _ranks(p), *end) for p in memorized]
            + [("idiom", False, _ranks(p), *end) for p in non_memorized]
            + [("text", False, _ranks(p), *end) for p in text])


def test_promotion_layer_is_where_top1_holds_to_the_end():
    ranks = np.array([
        [5, 0, 3, 0, 0],   # top-1 at 1, lost, regained at 3 -> 3
        [9, 4, 2, 1, 0],   # only the last layer -> 4; top-10 from layer 0
        [0, 0, 0, 0, 0],   # from the start
        [50, 20, 12, 3, 1],  # never top-1 -> 5 (= n_layers); top-10 from 3
    ])
    assert promotion_layers(ranks).tolist() == [3, 4, 0, 5]
    assert first_entry_layers(ranks, top=10).tolist() == [0, 0, 0, 3]


def test_bootstrap_interval_contains_mean_and_is_seeded():
    values = np.random.default_rng(1).normal(size=(200, 3))
    mean, low, high = bootstrap_mean_ci(values, seed=3)
    assert (low <= mean).all() and (mean <= high).all()
    again = bootstrap_mean_ci(values, seed=3)
    np.testing.assert_array_equal(low, again[1])
    assert not np.array_equal(low, bootstrap_mean_ci(values, seed=4)[1])
    one = bootstrap_mean_ci(values[:1])
    np.testing.assert_array_equal(one[0], one[1])


def test_analysis_tables_and_summary(tiny_model, probes):
    result = layer_trajectory(tiny_model, probes, sites=["resid_post"])
    phases = analyse_phases(result, n_boot=200)
    assert len(phases.probes) == len(probes)
    assert set(phases.curves["metric"]) >= {"pred_rank", "pred_prob", "pred_top1"}
    # the last layer's predicted token is top-1 by definition
    last = phases.curves[(phases.curves.metric == "pred_top1") & (phases.curves.layer == result.n_layers - 1)]
    assert (last["mean"] == 1.0).all()
    # the mean curve is the plain mean of the per-probe values
    sel = phases.curves[(phases.curves.metric == "pred_prob") & (phases.curves.group == "ordinary text")]
    text_rows = (result.memorization.to_dataframe()["group"] == "ordinary text").to_numpy()
    # float32 probabilities averaged in float32 here and in float64 there: float32 rounding (6e-8) of a short mean
    np.testing.assert_allclose(sel.sort_values("layer")["mean"], result.pred_prob[text_rows, 0].mean(0), rtol=1e-6)
    table = phases.group_table()
    assert table["n"].sum() == len(probes)
    # the random tiny model recalls no idiom (premise), so there is no boundary and the summary says why
    assert "memorized idioms" not in set(result.memorization.to_dataframe()["group"])
    assert phases.boundary_layer is None and phases.holds is False
    assert phases.summary_text == f"On {result.settings['model_spec']}, no idiom is memorized; no phase boundary found."
    assert phases.to_dict()["n_layers"] == result.n_layers


def test_boundary_and_verdict_when_memorized_idioms_are_promoted_early() -> None:
    """Memorized idioms top-1 from layer 3 of 8, the others only near the end: boundary 3, the pattern holds.

    A wrong boundary, verdict, per-probe promotion layer or set median means the phase analysis
    does not measure what method.md section 3 describes.
    """
    result = synthetic_result(_probes(memorized=[3] * 8, non_memorized=[5, 7, 7] * 3, text=[4, 7, 7] * 3))
    phases = analyse_phases(result, n_boot=50)
    assert phases.boundary_layer == 3
    assert phases.holds is True
    assert phases.probes["promotion_layer"].tolist() == [3] * 8 + [5, 7, 7] * 3 + [4, 7, 7] * 3
    assert phases.probes["top10_layer"].tolist() == [3] * 8 + [5, 7, 7] * 3 + [4, 7, 7] * 3
    # 0.3 -> 0.9 in float32 (6e-8)
    np.testing.assert_allclose(phases.probes["confidence_gain"].iloc[:8], 0.6, atol=1e-6)
    table = phases.group_table().set_index("group")
    assert table.loc["memorized idioms", "median_promotion_layer"] == 3
    assert table.loc["non-memorized idioms", "median_promotion_layer"] == 7
    assert table.loc["non-memorized idioms", "mean_promotion_layer"] == pytest.approx(19 / 3)  # float64: default approx
    assert table.loc["ordinary text", "median_promotion_layer"] == 7
    share = phases.curves[(phases.curves.metric == "pred_top1") & (phases.curves.group == "memorized idioms")]
    assert share.sort_values("layer")["mean"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    as_dict = phases.to_dict()
    assert (as_dict["boundary_layer"], as_dict["two_phase_pattern_holds"], as_dict["n_layers"]) == (3, True, 8)


def test_summary_states_the_boundary_the_boost_and_the_comparison() -> None:
    """The summary gives the boundary, the probabilities at it and at the end, each set's median
    promotion layer and the verdict, with the numbers of the synthetic result (not merely some text)."""
    result = synthetic_result(_probes(memorized=[3] * 8, non_memorized=[5, 7, 7] * 3, text=[4, 7, 7] * 3))
    text = analyse_phases(result, n_boot=50).summary_text
    assert text.startswith(f"On {MODEL} (8 layers), at least 50% of the memorized idioms have their predicted "
                           "token at top-1 from layer 3 (0-based) on")
    assert "its mean probability rises from 0.30 at layer 3 to 0.90 at the last layer" in text
    assert "Median promotion layer: memorized idioms 3.0 vs non-memorized idioms 7.0 (+4.0 layers)." in text
    assert "Median promotion layer: memorized idioms 3.0 vs ordinary text 7.0 (+4.0 layers)." in text
    assert text.endswith("The two-phase pattern holds on this model.")


@pytest.mark.parametrize(
    "non_memorized, text, sign",
    [
        ([2, 2, 2], [7, 7, 7], "-1.0"),  # non-memorized idioms are promoted earlier than memorized ones
        ([3, 3, 3], [7, 7, 7], "+0.0"),  # no earlier than non-memorized idioms
        ([7, 7, 7], [3, 3, 2], "+0.0"),  # no earlier than ordinary text
    ],
)
def test_verdict_fails_when_memorized_idioms_are_not_promoted_earlier(
    non_memorized: list[int], text: list[int], sign: str
) -> None:
    """Same boundary, but memorized idioms are not promoted before every other set: no two-phase verdict."""
    result = synthetic_result(_probes(memorized=[3, 3, 3, 3], non_memorized=non_memorized, text=text))
    phases = analyse_phases(result, n_boot=50)
    assert phases.boundary_layer == 3
    assert phases.holds is False
    assert f"({sign} layers)" in phases.summary_text
    assert phases.summary_text.endswith("The two-phase pattern does not clearly hold on this model.")
    assert phases.to_dict()["two_phase_pattern_holds"] is False


def test_verdict_fails_without_confidence_boosting() -> None:
    """Promoted early, significantly so under every control, but the probability never rises after
    the boundary: not the two-phase pattern."""
    result = synthetic_result(_probes(memorized=[3] * 10, non_memorized=[7] * 10, text=[7] * 10), boost=False)
    phases = analyse_phases(result, n_boot=50)
    assert phases.boundary_layer == 3 and phases.holds is False
    assert phases.promotion_tests["earlier"].all() and phases.holds_confidence_matched is True
    assert "rises from 0.30 at layer 3 to 0.30 at the last layer" in phases.summary_text
    assert phases.summary_text.endswith("does not clearly hold on this model.")


def test_verdict_needs_a_set_to_compare_with() -> None:
    """Only memorized idioms: nothing shows they are promoted earlier, so the pattern is not claimed."""
    phases = analyse_phases(synthetic_result(_probes(memorized=[3, 3], non_memorized=[], text=[])), n_boot=50)
    assert phases.boundary_layer == 3 and phases.holds is False
    assert "Median promotion layer" not in phases.summary_text


@pytest.mark.parametrize(
    "memorized, top1_share, boundary",
    [
        ([2, 2, 6, 6], 0.5, 2),  # exactly half top-1 from layer 2: "at least half" includes the tie
        ([2, 2, 2, 6, 6, 6], 0.5, 2),  # 3 of 6
        ([2, 6, 6, 6], 0.5, 6),  # a quarter is not enough
        ([2, 2, 6, 6], 0.75, 6),  # a stricter share moves the boundary to where 3 of 4 hold
        ([2, 2, 2, 6], 0.75, 2),  # 3 of 4 = 0.75 exactly
    ],
)
def test_boundary_at_ties_of_the_top1_share(memorized: list[int], top1_share: float, boundary: int) -> None:
    """The boundary is the first layer where the memorized top-1 share is >= `top1_share` (ties count)."""
    phases = analyse_phases(synthetic_result(_probes(memorized=memorized, non_memorized=[7], text=[7])),
                            top1_share=top1_share, n_boot=50)
    assert phases.boundary_layer == boundary


def test_boundary_must_hold_through_the_last_layer() -> None:
    """Top-1 from layer 1 for all, but 3 of 4 lose it at layer 4: the boundary is 5, not 1."""
    dip = [20, 0, 0, 0, 2, 0, 0, 0]
    probes = [("idiom", True, dip)] * 3 + [("idiom", True, _ranks(1))]
    probes += [("idiom", False, _ranks(7)), ("text", False, _ranks(7))]
    phases = analyse_phases(synthetic_result(probes), n_boot=50)
    assert phases.boundary_layer == 5
    assert phases.probes["promotion_layer"].tolist()[:4] == [5, 5, 5, 1]


def test_no_boundary_without_memorized_idioms() -> None:
    """Nothing memorized: no boundary, no verdict, and the summary gives that reason."""
    phases = analyse_phases(synthetic_result(_probes(memorized=[], non_memorized=[4, 7], text=[7])), n_boot=50)
    assert phases.boundary_layer is None and phases.holds is False
    assert phases.summary_text == f"On {MODEL}, no idiom is memorized; no phase boundary found."


def test_boundary_at_the_last_layer_is_no_promotion_phase() -> None:
    """Fewer than half of the memorized idioms are top-1 before the last layer: the summary says so
    and claims neither an early promotion phase nor confidence boosting."""
    phases = analyse_phases(synthetic_result(_probes(memorized=[2, 7, 7, 7], non_memorized=[7], text=[7])), n_boot=50)
    assert phases.boundary_layer == N_LAYERS - 1 and phases.holds is False
    text = phases.summary_text
    assert text.startswith(f"On {MODEL} (8 layers), fewer than 50% of the memorized idioms settle at top-1 "
                           "before the last layer; no phase boundary before the output.")
    assert "candidate promotion ends" not in text and "Confidence boosting" not in text
    assert "Median promotion layer: memorized idioms 7.0 vs non-memorized idioms 7.0 (+0.0 layers)." in text
    assert text.endswith("The two-phase pattern does not clearly hold on this model.")


# --------------------------------------------------------------------------------------
# Evidence for the verdict: permutation tests, threshold sensitivity, relative depth,
# and the confidence-matched control
# --------------------------------------------------------------------------------------


def _test_row(phases, versus: str, *, control: str = "all probes", group: str = "memorized idioms"):
    t = phases.promotion_tests
    sel = t[(t.control == control) & (t.group == group) & (t.versus == versus)]
    assert len(sel) == 1, f"no single {control} test of {group} vs {versus}"
    return sel.iloc[0]


def test_promotion_tests_report_p_value_effect_sizes_and_interval() -> None:
    """A large known shift (memorized at layer 2, the others at 6): smallest p, +4 layers, Cliff's delta 1;
    and the Holm adjustment over the family of the 6 tests (2 comparison sets x 3 controls)."""
    result = synthetic_result(_probes(memorized=[2] * 12, non_memorized=[6] * 12, text=[6, 6, 6, 5, 6, 6] * 2))
    phases = analyse_phases(result, n_boot=200, n_permutations=2000, seed=1)
    t = _test_row(phases, "non-memorized idioms")
    assert (t.n_a, t.n_b) == (12, 12)
    assert t.p_value < 0.01 and t.p_value >= 1 / 2001  # never 0: the observed labelling counts
    assert (t.median_diff, t.mean_diff, t.cliffs_delta) == (4.0, 4.0, 1.0)
    assert t.mean_diff_low == t.mean_diff_high == 4.0  # constant samples: every resample gives +4
    assert t.alternative == "two-sided" and t.n_permutations == 2000
    assert bool(t.significant) and bool(t.earlier)
    assert (t.n_a_total, t.n_b_total, t.test) == (12, 12, "permutation of set labels (unpaired)")
    # Holm: no p can be below the floor 1 / 2001, so a row at the floor is adjusted to 6 / 2001 exactly
    assert (t.family_size, t.correction) == (6, "holm")
    assert t.p_adjusted == pytest.approx(6 / 2001)  # float64: default approx
    tests = phases.promotion_tests
    np.testing.assert_allclose(tests["p_adjusted"], holm(tests["p_value"].to_numpy()))
    assert (tests["p_adjusted"] >= tests["p_value"]).all()
    assert (tests["significant"] == (tests["p_adjusted"] < 0.05)).all()
    text_row = _test_row(phases, "ordinary text")
    assert text_row.mean_diff == pytest.approx(35 / 6 - 2) and text_row.p_value < 0.01  # float64: default approx
    assert phases.holds is True
    assert t.p_value == 1 / 2001  # 2 of the C(24, 12) = 2.7M splits are as extreme: none is drawn
    assert "Permutation test (two-sided, 2000 relabellings): mean +4.0 layers (95% CI +4.0 to +4.0), " \
           "Cliff's delta +1.00, p = 0.0005, the smallest this number of relabellings can give; " \
           "Holm-adjusted over the 6 promotion tests: p = 0.003." in phases.summary_text
    # seeded: same seed, same p; the dict carries every test, as plain JSON
    again = analyse_phases(result, n_boot=200, n_permutations=2000, seed=1)
    assert _test_row(again, "non-memorized idioms").p_value == t.p_value
    as_dict = phases.to_dict()
    json.dumps(as_dict, allow_nan=False)
    assert {r["versus"] for r in as_dict["promotion_tests"]} == {"non-memorized idioms", "ordinary text"}


def test_verdict_needs_a_significant_difference() -> None:
    """Medians say "earlier" (3 vs 7) but with 2 vs 1 probes no permutation test can reach p < 0.05:
    the pattern is not claimed (before the tests, a median difference alone made it hold)."""
    result = synthetic_result(_probes(memorized=[3, 3], non_memorized=[7], text=[7]))
    phases = analyse_phases(result, n_boot=50, n_permutations=2000)
    t = _test_row(phases, "non-memorized idioms")
    assert t.median_diff == 4.0 and t.p_value > 0.3 and not t.significant
    assert phases.holds is False and phases.holds_confidence_matched is None  # 1 pair: not tested
    assert phases.summary_text.endswith("The two-phase pattern does not clearly hold on this model.")


def test_facts_are_compared_but_not_part_of_the_idiom_verdict() -> None:
    """Memorized facts vs non-memorized facts get their own test; facts promoted late do not block
    the idiom verdict."""
    probes = _probes(memorized=[2] * 12, non_memorized=[6] * 12, text=[6] * 12)
    probes += [("fact", True, _ranks(5), 0.9)] * 12 + [("fact", False, _ranks(1), 0.9)] * 12
    phases = analyse_phases(synthetic_result(probes), n_boot=50, n_permutations=2000)
    facts = _test_row(phases, "non-memorized facts", group="memorized facts")
    assert facts.mean_diff == -4.0 and facts.significant and not facts.earlier
    assert facts.family_size == 9  # 3 comparisons x 3 controls: one family
    assert phases.holds is True
    assert ("Median promotion layer: memorized facts 5.0 vs non-memorized facts 1.0 (-4.0 layers)."
            in phases.summary_text)


@pytest.mark.parametrize(
    "memorized, expected",
    [
        # top-1 shares per layer: 0.2 at 1, 0.4 at 2, 0.6 at 3, 0.8 at 4, 1.0 from 5 (ties count)
        ([1, 2, 3, 4, 5], {0.3: 2, 0.4: 2, 0.5: 3, 0.6: 3, 0.7: 4, 0.8: 4}),
        # 7 of 10 from layer 1, all from layer 6
        ([1] * 7 + [6] * 3, {0.3: 1, 0.4: 1, 0.5: 1, 0.6: 1, 0.7: 1, 0.8: 6}),
    ],
)
def test_boundary_sensitivity_to_the_top1_share(memorized: list[int], expected: dict[float, int]) -> None:
    phases = analyse_phases(synthetic_result(_probes(memorized=memorized, non_memorized=[7], text=[7])),
                            n_boot=50, n_permutations=200)
    table = phases.boundary_sensitivity
    assert table["top1_share"].tolist() == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert dict(zip(table["top1_share"], table["boundary_layer"])) == expected
    assert table["boundary_depth"].tolist() == [(expected[s] + 1) / N_LAYERS for s in table["top1_share"]]
    assert phases.boundary_layer == expected[0.5]  # the 0.5 row is the boundary itself
    shown = ", ".join(f"{share:.0%}: {layer}" for share, layer in expected.items())
    assert f"Boundary layer by the share of memorized idioms required at top-1: {shown}." in phases.summary_text
    assert phases.to_dict()["boundary_sensitivity"][2] == {
        "top1_share": 0.5, "boundary_layer": expected[0.5], "boundary_depth": (expected[0.5] + 1) / N_LAYERS}


def test_boundary_sensitivity_is_none_without_memorized_idioms() -> None:
    phases = analyse_phases(synthetic_result(_probes(memorized=[], non_memorized=[4, 7], text=[7])), n_boot=50)
    assert phases.boundary_sensitivity["boundary_layer"].tolist() == [None] * 6
    assert phases.boundary_depth is None and phases.to_dict()["boundary_depth"] is None


@pytest.mark.parametrize(
    "boundary, depth, early",
    [(3, 0.5, True), (1, 0.25, True), (5, 0.75, False)],
)
def test_relative_depth_and_the_early_layers_claim(boundary: int, depth: float, early: bool) -> None:
    """Depth is (boundary + 1) / n_layers; "early layers" is claimed only up to half the depth."""
    result = synthetic_result(_probes(memorized=[boundary] * 12, non_memorized=[7] * 12, text=[7] * 12))
    phases = analyse_phases(result, n_boot=50, n_permutations=2000)
    assert phases.boundary_layer == boundary and phases.boundary_depth == depth
    assert phases.to_dict()["boundary_depth"] == depth
    text = phases.summary_text
    assert f"after {boundary + 1} of {N_LAYERS} layers ({depth:.2f} of depth)" in text
    claim = "The boundary lies in the first half of the network: promotion of memorized idioms happens in early layers."
    assert (claim in text) is early
    assert (f"upper part of the network ({depth:.2f} of depth), so this does not show that recall happens "
            "in early layers" in text) is (not early)
    assert phases.holds is True  # depth is stated, not folded into the verdict


def _confidence_case(*, control_promoted_at: int) -> list[tuple]:
    """8 confident memorized idioms promoted at layer 2; 8 equally confident non-memorized idioms and
    8 equally confident text probes promoted at `control_promoted_at`; 16 unconfident non-memorized
    idioms and 8 unconfident text probes promoted at 6 (no partner within the caliper)."""
    probes: list[tuple] = [("idiom", True, _ranks(2), 0.85 + 0.005 * i) for i in range(8)]
    probes += [("idiom", False, _ranks(control_promoted_at), 0.852 + 0.005 * i) for i in range(8)]
    probes += [("idiom", False, _ranks(6), 0.2 + 0.005 * i) for i in range(16)]
    probes += [("text", False, _ranks(control_promoted_at), 0.851 + 0.005 * i) for i in range(8)]
    probes += [("text", False, _ranks(6), 0.25 + 0.005 * i) for i in range(16)]
    return probes


def test_confidence_matched_control_removes_a_confidence_only_difference() -> None:
    """Confident probes are promoted at layer 2 whatever their set: memorized idioms look earlier only
    because most other probes are unconfident. On all probes the difference is significant after
    Holm's adjustment, but after matching on final probability it is gone, so the pattern does not
    hold (before the verdict read the confidence controls, it held here)."""
    result = synthetic_result(_confidence_case(control_promoted_at=2))
    # the confident controls reach top-1 at 0.6 (memorized idioms at 0.3): same final probability,
    # different confidence gain, so matching on anything but the final probability finds other pairs
    result.pred_prob[8:16, 0, 2] = 0.6
    phases = analyse_phases(result, n_boot=200, n_permutations=2000)
    for versus in VERDICT_SETS:
        assert _test_row(phases, versus).earlier  # all probes: earlier, Holm-adjusted p < 0.05
        matched = _test_row(phases, versus, control="confidence-matched")
        # 8 pairs, every difference 0: all 2**8 sign patterns tie with the observed one, p = 1
        assert (matched.n_a, matched.n_b, matched.n_pairs, matched.mean_diff, matched.p_value) == (8, 8, 8, 0.0, 1.0)
        assert matched.exact and matched.n_permutations == 256 and not matched.earlier
    assert _test_row(phases, "non-memorized idioms", control="confidence-matched").n_b_total == 24
    assert phases.holds is False and phases.holds_confidence_matched is False
    m = phases.matching.set_index("versus")
    assert m.loc["non-memorized idioms", "n_matched"] == 8 and m.loc["non-memorized idioms", "caliper"] == 0.05
    assert m.loc["ordinary text", "n_matched"] == 8
    pairs = phases.matched_pairs[phases.matched_pairs.versus == "non-memorized idioms"]
    assert pairs["matched_probe_id"].is_unique  # without replacement
    assert ((pairs["final_prob"] - pairs["matched_final_prob"]).abs() <= 0.05).all()
    # each memorized idiom pairs with the control 0.002 above it (0.003 below is the next nearest)
    assert dict(zip(pairs["probe_id"], pairs["matched_probe_id"])) == {f"p{i}": f"p{i + 8}" for i in range(8)}
    text = phases.summary_text
    assert "8 of 8 memorized idioms matched with 8 of 24 non-memorized idioms (mean final probability 0.87 vs 0.87" \
        in text
    assert "median paired difference +0.0 layers. Sign-flip test (paired, two-sided, all 256 sign patterns): " \
        "mean +0.0 layers (95% CI +0.0 to +0.0), Cliff's delta +0.00, p = 1; Holm-adjusted" in text
    assert "Earlier promotion does not survive the confidence-matched control" in text
    assert text.endswith("The two-phase pattern does not clearly hold on this model.")
    assert phases.to_dict()["two_phase_pattern_holds_confidence_matched"] is False


def test_confidence_matched_control_keeps_a_real_difference() -> None:
    """Equally confident other probes are still promoted late (layer 6): the difference survives both
    confidence controls, so the pattern holds."""
    phases = analyse_phases(synthetic_result(_confidence_case(control_promoted_at=6)), n_boot=200,
                            n_permutations=2000)
    matched = _test_row(phases, "non-memorized idioms", control="confidence-matched")
    # every paired difference is +4: of the 2**8 sign patterns only all-plus and all-minus are as extreme
    assert (matched.n_a, matched.mean_diff, matched.median_diff, matched.p_value) == (8, 4.0, 4.0, 2 / 256)
    assert matched.mean_diff_low == matched.mean_diff_high == 4.0
    for versus in VERDICT_SETS:
        assert _test_row(phases, versus, control="confidence-matched").earlier
        assert _test_row(phases, versus, control="confidence-stratified").earlier
    assert phases.holds is True and phases.holds_confidence_matched is True
    assert "Earlier promotion survives the confidence-matched control." in phases.summary_text
    assert phases.summary_text.endswith("The two-phase pattern holds on this model.")


def test_no_verdict_without_a_testable_confidence_control() -> None:
    """Earlier on all probes, but every memorized idiom ends more confident than every other probe:
    no pair within the caliper, no stratum holding both sets. Nothing separates promotion from
    confidence, so the pattern is not claimed; a wide caliper pairs them and the paired test decides."""
    result = synthetic_result(_probes(memorized=[2] * 12, non_memorized=[6] * 12, text=[6] * 12, final=None))
    phases = analyse_phases(result, n_boot=50, n_permutations=2000)
    assert phases.promotion_tests["control"].tolist() == ["all probes"] * 2
    assert phases.promotion_tests["earlier"].all()
    assert phases.holds is False and phases.holds_confidence_matched is None
    assert "Too few confidence-matched pairs" in phases.summary_text
    assert ("memorized idioms vs non-memorized idioms: fewer than 5 probes of each set share a stratum: not tested."
            in phases.summary_text)
    # a wide caliper matches everything (final probabilities 0.9 vs 0.45)
    wide = analyse_phases(result, n_boot=50, n_permutations=2000, caliper=1.0)
    assert wide.matching["n_matched"].tolist() == [12, 12]
    assert wide.holds_confidence_matched is True and wide.holds is True
    # 12 pairs each, but 13 required: matched, reported, not tested
    strict = analyse_phases(result, n_boot=50, n_permutations=2000, caliper=1.0, min_matched=13)
    assert strict.matching["tested"].tolist() == [False, False] and strict.holds_confidence_matched is None
    assert strict.holds is False
    assert ("12 of 12 memorized idioms matched with 12 of 12 non-memorized idioms, fewer than 13: not tested."
            in strict.summary_text)


# final probability level -> promotion layer of every probe at that level, and probes per level
LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)
LEVEL_LAYERS = (6, 5, 4, 3, 2)
MEMORIZED_PER_LEVEL, OTHERS_PER_LEVEL = (1, 2, 3, 4, 6), (7, 6, 5, 4, 2)  # 8 per level when pooled


def _stratified_case(*, memorized_shift: int) -> list[tuple]:
    """Promotion set by final confidence alone (5 levels), memorized idioms mostly confident, others
    mostly not; memorized idioms are promoted `memorized_shift` layers earlier than others at their level."""
    probes: list[tuple] = []
    for level, layer, n_mem, n_other in zip(LEVELS, LEVEL_LAYERS, MEMORIZED_PER_LEVEL, OTHERS_PER_LEVEL, strict=True):
        probes += [("idiom", True, _ranks(layer - memorized_shift), level)] * n_mem
        probes += [("idiom", False, _ranks(layer), level)] * n_other
        probes += [("text", False, _ranks(layer), level)] * n_other
    return probes


def test_confidence_stratified_control_by_hand() -> None:
    """Raw difference 108/24 - 52/16 = +1.25 layers, all from confidence: within each of the 5
    quintile strata (one level each: 8 probes per level pooled) the difference is 0, so the
    stratified difference is 0 with p = 1. With memorized idioms 2 layers earlier within their
    level, it is +2 exactly."""
    phases = analyse_phases(synthetic_result(_stratified_case(memorized_shift=0)), n_boot=100, n_permutations=1000)
    raw = _test_row(phases, "non-memorized idioms")
    assert raw.mean_diff == pytest.approx(108 / 24 - 52 / 16)  # float64: default approx
    strat = _test_row(phases, "non-memorized idioms", control="confidence-stratified")
    assert (strat.n_a, strat.n_b, strat.n_a_total, strat.n_b_total, strat.n_strata) == (16, 24, 16, 24, 5)
    assert (strat.mean_diff, strat.mean_diff_low, strat.mean_diff_high, strat.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert strat.test == "set labels permuted within 5 quantile strata of the final probability"
    assert phases.holds is False
    shifted = analyse_phases(synthetic_result(_stratified_case(memorized_shift=2)), n_boot=100, n_permutations=1000)
    strat = _test_row(shifted, "non-memorized idioms", control="confidence-stratified")
    assert strat.mean_diff == pytest.approx(2.0) and strat.p_value == 1 / 1001  # float64: default approx
    assert "Stratified permutation test (two-sided, 1000 relabellings): mean +2.0 layers" in shifted.summary_text


def _verdict_table(*rows: tuple[str, str, float, float]) -> pd.DataFrame:
    return pd.DataFrame([{"control": c, "group": "memorized idioms", "versus": v, "mean_diff": d, "p_adjusted": p}
                         for c, v, d, p in rows])


def test_verdict_rule_reads_the_confidence_controls_only() -> None:
    """`two_phase_verdict` on hand-made tables: the all-probes comparison never decides; every tested
    confidence control must be earlier at Holm-adjusted p < alpha, for each comparison set present."""
    nm, text = "non-memorized idioms", "ordinary text"
    base = [("all probes", nm, 3.0, 0.001)]
    assert two_phase_verdict(_verdict_table(*base), boosted=True, alpha=0.05) == VERDICT_FAILS  # no control tested
    matched = ("confidence-matched", nm, 1.0, 0.01)
    assert two_phase_verdict(_verdict_table(*base, matched), boosted=True, alpha=0.05) == VERDICT_HOLDS
    assert two_phase_verdict(_verdict_table(*base, matched), boosted=False, alpha=0.05) == VERDICT_FAILS
    assert two_phase_verdict(_verdict_table(*base, matched), boosted=True, alpha=0.005) == VERDICT_FAILS
    # the unmatched comparison saying "later" does not matter, the controls do
    assert two_phase_verdict(_verdict_table(("all probes", nm, -1.0, 0.001), matched),
                             boosted=True, alpha=0.05) == VERDICT_HOLDS
    # every tested control must agree
    for stratified in (("confidence-stratified", nm, 1.0, 0.2), ("confidence-stratified", nm, -1.0, 0.01)):
        assert two_phase_verdict(_verdict_table(*base, matched, stratified), boosted=True,
                                 alpha=0.05) == VERDICT_FAILS
    # ordinary text present (an all-probes row) but no control tested against it
    assert two_phase_verdict(_verdict_table(*base, matched, ("all probes", text, 3.0, 0.001)),
                             boosted=True, alpha=0.05) == VERDICT_FAILS
    assert two_phase_verdict(_verdict_table(*base, matched, ("all probes", text, 3.0, 0.001),
                                            ("confidence-stratified", text, 2.0, 0.04)),
                             boosted=True, alpha=0.05) == VERDICT_HOLDS
    assert two_phase_verdict(_verdict_table(), boosted=True, alpha=0.05) == VERDICT_FAILS
