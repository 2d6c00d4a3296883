"""The two phases: promotion layers, curves with bands, boundary, summary."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest

from idiom_lens.memorization import MemorizationRecord, MemorizationResult, probe_group
from idiom_lens.phases import analyse_phases, first_entry_layers, promotion_layers
from idiom_lens.stats import bootstrap_mean_ci
from idiom_lens.trajectory import TrajectoryResult, layer_trajectory

N_LAYERS = 8
MODEL = "synthetic-8"
PRED_ID, OTHER_ID = 7, 9


def _ranks(promotion: int, *, n_layers: int = N_LAYERS) -> list[int]:
    """Predicted token's rank per layer: 20 (outside the top-10) before `promotion`, 0 from it on."""
    return [20 if layer < promotion else 0 for layer in range(n_layers)]


def _probs(ranks: Sequence[int], *, boost: bool) -> list[float]:
    """Predicted token's probability: 0.05 while not top-1; from the first top-1 layer, 0.3 rising by
    0.15 per layer up to 0.9 (`boost`), or staying at 0.3 (no confidence boosting)."""
    first = next(layer for layer, rank in enumerate(ranks) if rank == 0)
    return [0.05 if rank > 0 else (min(0.9, 0.3 + 0.15 * (layer - first)) if boost else 0.3)
            for layer, rank in enumerate(ranks)]


def synthetic_result(probes: Sequence[tuple[str, bool, Sequence[int]]], *, boost: bool = True) -> TrajectoryResult:
    """The smallest valid TrajectoryResult: one `resid_post` site, one record per (kind, memorized, ranks).

    `ranks` is the predicted token's rank per layer (0 at the last layer, as in a real result).
    """
    records, ranks, probs = [], [], []
    for i, (kind, memorized, rank_row) in enumerate(probes):
        assert rank_row[-1] == 0  # the last layer's read-out is the model's own prediction
        prob_row = _probs(rank_row, boost=boost)
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
    memorized: Sequence[int], non_memorized: Sequence[int], text: Sequence[int]
) -> list[tuple[str, bool, list[int]]]:
    """Probes promoted (top-1 through the last layer) at the given layers, per set."""
    return ([("idiom", True, _ranks(p)) for p in memorized]
            + [("idiom", False, _ranks(p)) for p in non_memorized]
            + [("text", False, _ranks(p)) for p in text])


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
    result = synthetic_result(_probes(memorized=[3, 3, 3, 3], non_memorized=[5, 7, 7], text=[4, 7, 7]))
    phases = analyse_phases(result, n_boot=50)
    assert phases.boundary_layer == 3
    assert phases.holds is True
    assert phases.probes["promotion_layer"].tolist() == [3, 3, 3, 3, 5, 7, 7, 4, 7, 7]
    assert phases.probes["top10_layer"].tolist() == [3, 3, 3, 3, 5, 7, 7, 4, 7, 7]
    np.testing.assert_allclose(phases.probes["confidence_gain"].iloc[:4], 0.6, atol=1e-6)  # 0.3 -> 0.9
    table = phases.group_table().set_index("group")
    assert table.loc["memorized idioms", "median_promotion_layer"] == 3
    assert table.loc["non-memorized idioms", "median_promotion_layer"] == 7
    assert table.loc["non-memorized idioms", "mean_promotion_layer"] == pytest.approx(19 / 3)
    assert table.loc["ordinary text", "median_promotion_layer"] == 7
    share = phases.curves[(phases.curves.metric == "pred_top1") & (phases.curves.group == "memorized idioms")]
    assert share.sort_values("layer")["mean"].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    as_dict = phases.to_dict()
    assert (as_dict["boundary_layer"], as_dict["two_phase_pattern_holds"], as_dict["n_layers"]) == (3, True, 8)


def test_summary_states_the_boundary_the_boost_and_the_comparison() -> None:
    """The summary gives the boundary, the probabilities at it and at the end, each set's median
    promotion layer and the verdict, with the numbers of the synthetic result (not merely some text)."""
    result = synthetic_result(_probes(memorized=[3, 3, 3, 3], non_memorized=[5, 7, 7], text=[4, 7, 7]))
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
    """Promoted early but the probability never rises after the boundary: not the two-phase pattern."""
    result = synthetic_result(_probes(memorized=[3, 3, 3, 3], non_memorized=[7, 7, 7], text=[7, 7, 7]), boost=False)
    phases = analyse_phases(result, n_boot=50)
    assert phases.boundary_layer == 3 and phases.holds is False
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
