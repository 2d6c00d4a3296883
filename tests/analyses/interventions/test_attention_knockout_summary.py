"""The attention-knockout summary and confidence matching on hand-built results (no model): the
log-probability change, medians, Wilson shares, old results without logp_change, and which
probes `confidence_matched` pairs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from idiom_lens.analyses.interventions.attention_knockouts import (
    SUMMARY_COLUMNS,
    AttentionKnockoutResult,
    confidence_matched,
    mean_median_intervals,
)
from idiom_lens.analyses.stats import bootstrap_mean_ci
from idiom_lens.errors import InputError

LN2 = math.log(2)


def toy_result(clean: dict[str, float], blocked: dict[str, list[float]], groups: dict[str, str],
               changed: dict[str, list[bool]] | None = None, *, with_logp: bool = True) -> AttentionKnockoutResult:
    """A result by hand: one source (context), one layer per entry of `blocked[probe]` (window 1)."""
    rows = []
    for probe_id, probs in blocked.items():
        p0 = clean[probe_id]
        for layer, p in enumerate(probs):
            rows.append({
                "probe_id": probe_id, "source": "context", "layer": layer, "window_first": layer,
                "window_last": layer, "n_blocked": 3, "clean_pred_id": 7, "clean_prob": p0, "prob": p,
                "rel_change": (p - p0) / p0, "logp_change": math.log(p) - math.log(p0),
                "changed": (changed or {}).get(probe_id, [False] * len(probs))[layer], "new_pred_id": 7,
                "reason": "",
            })
    frame = pd.DataFrame(rows)
    frame["changed"] = frame["changed"].astype("boolean")
    if not with_logp:
        frame = frame.drop(columns="logp_change")
    probes = pd.DataFrame({"probe_id": list(clean), "kind": "idiom", "group": [groups[i] for i in clean],
                           "clean_prob": list(clean.values())})
    return AttentionKnockoutResult(rows=frame, probes=probes, settings={"window": 1, "sources": ["context"]})


# Three memorized idioms: halved, unchanged, quadrupled (layer 0); all unchanged at layer 1.
CLEAN = {"a": 0.8, "b": 0.5, "c": 0.1, "solo": 0.3}
BLOCKED = {"a": [0.4, 0.8], "b": [0.5, 0.5], "c": [0.4, 0.1], "solo": [0.15, 0.3]}
GROUPS = {"a": "memorized idioms", "b": "memorized idioms", "c": "memorized idioms", "solo": "non-memorized idioms"}
CHANGED = {"a": [True, False], "b": [False, False], "c": [False, False], "solo": [True, False]}


def test_logp_change_mean_and_median_by_hand():
    summary = toy_result(CLEAN, BLOCKED, GROUPS, CHANGED).summary()
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    memo = summary[summary["group"] == "memorized idioms"].set_index("layer")
    # layer 0: log changes -ln 2, 0, +ln 4 = 2 ln 2; relative changes -0.5, 0, +3
    assert memo.loc[0, "n"] == 3
    assert memo.loc[0, "logp_change"] == pytest.approx((-LN2 + 0 + 2 * LN2) / 3)
    assert memo.loc[0, "logp_change_median"] == pytest.approx(0.0, abs=1e-15)
    assert memo.loc[0, "rel_change"] == pytest.approx((-0.5 + 0 + 3) / 3)  # the bounded-below measure: pulled up
    assert memo.loc[0, "rel_change_median"] == pytest.approx(0.0, abs=1e-15)
    assert memo.loc[0, "prob"] == pytest.approx((0.4 + 0.5 + 0.4) / 3)
    assert memo.loc[0, "clean_prob"] == pytest.approx((0.8 + 0.5 + 0.1) / 3)
    # a median of resamples of three values is one of them; a mean lies between the extremes
    for column in ("logp_change_median_low", "logp_change_median_high"):
        assert min(abs(memo.loc[0, column] - v) for v in (-LN2, 0.0, 2 * LN2)) < 1e-12
    assert -LN2 <= memo.loc[0, "logp_change_low"] < memo.loc[0, "logp_change"] < memo.loc[0, "logp_change_high"] \
        <= 2 * LN2
    # layer 1: nothing moves, so every interval is the point 0
    for column in ("logp_change", "logp_change_low", "logp_change_high", "logp_change_median",
                   "logp_change_median_low", "logp_change_median_high", "rel_change_low", "rel_change_high"):
        assert memo.loc[1, column] == pytest.approx(0.0, abs=1e-15), column
    # one probe: the intervals collapse to its value
    solo = summary[summary["group"] == "non-memorized idioms"].set_index("layer")
    assert solo.loc[0, "n"] == 1
    for column in ("logp_change", "logp_change_low", "logp_change_high", "logp_change_median_low"):
        assert solo.loc[0, column] == pytest.approx(-LN2), column


def test_rel_change_interval_is_the_old_one():
    """The relative change keeps the interval older summaries had (`bootstrap_mean_ci`, seed 0)."""
    summary = toy_result(CLEAN, BLOCKED, GROUPS).summary(n_boot=500, seed=3)
    memo = summary[summary["group"] == "memorized idioms"].sort_values("layer")
    rel = np.array([[(BLOCKED[i][l] - CLEAN[i]) / CLEAN[i] for l in (0, 1)] for i in ("a", "b", "c")])
    mean, low, high = bootstrap_mean_ci(rel, n_boot=500, seed=3)
    np.testing.assert_allclose(memo["rel_change"], mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(memo["rel_change_low"], low, rtol=0, atol=1e-12)
    np.testing.assert_allclose(memo["rel_change_high"], high, rtol=0, atol=1e-12)


def test_changed_share_with_wilson_interval():
    summary = toy_result(CLEAN, BLOCKED, GROUPS, CHANGED).summary()
    memo = summary[summary["group"] == "memorized idioms"].set_index("layer")
    # 1 of 3: the Wilson 95% interval is (0.0615, 0.7923) (centre (p + z^2/2n) / (1 + z^2/n), z = 1.96)
    assert memo.loc[0, "n_changed"] == 1 and memo.loc[0, "changed"] == pytest.approx(1 / 3)
    assert memo.loc[0, "changed_low"] == pytest.approx(0.0615, abs=1e-4)
    assert memo.loc[0, "changed_high"] == pytest.approx(0.7923, abs=1e-4)
    # 0 of 3: from exactly 0 up to z^2 / (n + z^2) = 3.8415 / 6.8415 = 0.5615
    assert memo.loc[1, "changed"] == 0 and memo.loc[1, "changed_low"] == 0.0
    assert memo.loc[1, "changed_high"] == pytest.approx(0.5615, abs=1e-4)
    solo = summary[summary["group"] == "non-memorized idioms"].set_index("layer")
    assert solo.loc[0, "changed"] == 1.0 and solo.loc[0, "changed_high"] == 1.0  # 1 of 1


def test_results_saved_without_logp_change_still_summarize(tmp_path):
    """A result saved before logp_change existed: the summary derives it from prob and clean_prob."""
    old = toy_result(CLEAN, BLOCKED, GROUPS, CHANGED, with_logp=False)
    old.save(tmp_path)
    again = AttentionKnockoutResult.load(tmp_path)
    assert "logp_change" not in again.rows.columns
    new = toy_result(CLEAN, BLOCKED, GROUPS, CHANGED).summary()
    pd.testing.assert_frame_equal(again.summary(), new, check_exact=False, rtol=0, atol=1e-12)


def test_empty_source_counts_no_probe():
    result = toy_result(CLEAN, BLOCKED, GROUPS)
    rows = result.rows.copy()
    solo = rows["probe_id"] == "solo"
    rows.loc[solo, ["prob", "rel_change", "logp_change"]] = np.nan
    rows.loc[solo, "changed"] = pd.NA
    rows.loc[solo, "reason"] = "the prompt is a single word: no context tokens to block"
    summary = AttentionKnockoutResult(rows=rows, probes=result.probes, settings=result.settings).summary()
    solo_rows = summary[summary["group"] == "non-memorized idioms"]
    assert (solo_rows["n"] == 0).all() and solo_rows["logp_change"].isna().all()
    assert solo_rows["changed"].isna().all() and solo_rows["changed_low"].isna().all()


def test_mean_median_intervals_shapes():
    point, low, high = mean_median_intervals(np.array([[1.0], [2.0], [10.0]]), n_boot=200, level=0.9, seed=0)
    assert point.shape == low.shape == high.shape == (2, 1)
    assert point[:, 0].tolist() == [13 / 3, 2.0]
    assert (low <= point).all() and (point <= high).all()
    nan, _, _ = mean_median_intervals(np.zeros((0, 4)), n_boot=10, level=0.9, seed=0)
    assert nan.shape == (2, 4) and np.isnan(nan).all()


# --------------------------------------------------------------------------------------
# Confidence matching
# --------------------------------------------------------------------------------------

# memorized m1 0.9, m2 0.2, m3 0.04; non-memorized n1 0.5, n2 0.1, n3 0.3, n4 0.01.
# Within a factor of 2 on the log scale: m1 -> n1 (0.9 / 0.5 = 1.8), m2 -> n3 (0.3 / 0.2 = 1.5;
# n2 is as near on the linear scale and listed first, so a linear match would take it), m3 none
# (0.1 / 0.04 = 2.5, 0.04 / 0.01 = 4). Every visiting order gives these pairs.
MATCH_CLEAN = {"m1": 0.9, "m2": 0.2, "m3": 0.04, "n1": 0.5, "n2": 0.1, "n3": 0.3, "n4": 0.01, "t1": 0.2}
MATCH_GROUPS = {**{f"m{i}": "memorized idioms" for i in (1, 2, 3)},
                **{f"n{i}": "non-memorized idioms" for i in (1, 2, 3, 4)}, "t1": "ordinary text"}


def match_toy() -> AttentionKnockoutResult:
    blocked = {i: [p / 2, p] for i, p in MATCH_CLEAN.items()}
    return toy_result(MATCH_CLEAN, blocked, MATCH_GROUPS)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_confidence_matching_by_hand(seed):
    matched = confidence_matched(match_toy(), seed=seed)
    pairs = sorted(map(tuple, matched.pairs[["probe_id", "matched_id"]].to_numpy().tolist()))
    assert pairs == [("m1", "n1"), ("m2", "n3")]
    assert matched.n_pairs == 2 and matched.n_group == 3 and matched.n_candidates == 4
    assert matched.caliper == pytest.approx(LN2)
    by_id = matched.pairs.set_index("probe_id")
    assert by_id.loc["m1", "log_ratio"] == pytest.approx(math.log(0.9 / 0.5))
    assert by_id.loc["m2", "matched_clean_prob"] == pytest.approx(0.3)
    summary = matched.to_dataframe()
    assert set(summary["group"]) == {"memorized idioms", "non-memorized idioms"}  # ordinary text left out
    assert (summary["n"] == 2).all() and (summary["n_pairs"] == 2).all()
    memo = summary[(summary["group"] == "memorized idioms") & (summary["layer"] == 0)].iloc[0]
    assert memo["clean_prob"] == pytest.approx((0.9 + 0.2) / 2) and memo["logp_change"] == pytest.approx(-LN2)


def test_confidence_matching_caliper_and_given_pairs():
    wide = confidence_matched(match_toy(), caliper=10.0)
    assert wide.n_pairs == 3  # everyone finds a partner
    none = confidence_matched(match_toy(), caliper=0.0)
    assert none.n_pairs == 0 and none.summary.empty and "n_pairs" in none.summary.columns
    given = confidence_matched(match_toy(), pairs=[("m3", "n4")])
    assert given.pairs[["probe_id", "matched_id"]].values.tolist() == [["m3", "n4"]]
    assert given.pairs["log_ratio"].iloc[0] == pytest.approx(math.log(4))
    assert (given.summary["n"] == 1).all()
    frame = pd.DataFrame({"probe_id": ["m1", "m2"], "matched_id": ["n2", "n4"]})
    assert confidence_matched(match_toy(), pairs=frame).n_pairs == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"pairs": [("n1", "m1")]}, "probe_id must be probes of 'memorized idioms'"),
    ({"pairs": [("m1", "t1")]}, "matched_id must be probes of 'non-memorized idioms'"),
    ({"pairs": [("m1", "zz")]}, r"pairs name probes the result does not have: \['zz'\]"),
    ({"pairs": [("m1",)]}, "pairs must be"),
    ({"pairs": pd.DataFrame({"a": ["m1"]})}, "pairs needs the columns probe_id and matched_id"),
    ({"caliper": -1.0}, "caliper must be >= 0"),
])
def test_confidence_matching_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        confidence_matched(match_toy(), **kwargs)
