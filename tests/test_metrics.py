"""Metric descriptors: one per measured column, shared by the analyses and the figures."""

from __future__ import annotations

import dataclasses

import pytest

from idiom_lens.analyses import phases, trajectory
from idiom_lens.metrics import EFFECT_METRICS, INTERVENTION_METRICS, METRICS, TRAJECTORY_METRICS, Metric


def test_descriptors_cover_the_analyses_columns() -> None:
    assert all(name == m.name for name, m in METRICS.items())
    assert phases.CURVE_METRICS == tuple(TRAJECTORY_METRICS)
    assert set(trajectory.METRICS) - {"top_id"} <= set(TRAJECTORY_METRICS)
    assert set(INTERVENTION_METRICS) == {"changed", "prob_drop", "new_is_target"}
    assert TRAJECTORY_METRICS["pred_rank"].lower_is_better and not TRAJECTORY_METRICS["pred_prob"].lower_is_better
    # the summary columns the figures draw: tracing, attention knockout, patching, lenses, attribution
    assert {"aie", "rel_change", "restored", "kl", "logit", "logit_diff", "share"} <= set(EFFECT_METRICS)
    assert len(METRICS) == len(TRAJECTORY_METRICS) + len(INTERVENTION_METRICS) + len(EFFECT_METRICS)  # no name twice


def test_axis_title_and_range() -> None:
    rank = TRAJECTORY_METRICS["target_rank"]
    assert rank.axis_title() == "rank of the target token (0 = top-1)"
    assert rank.axis_title("mean") == "mean rank of the target token (0 = top-1)"
    assert rank.axis_range is None  # unbounded above: autorange
    assert TRAJECTORY_METRICS["pred_prob"].axis_range == [0, 1]
    assert Metric("x", "a thing").axis_title() == "a thing"
    assert Metric("x", "a thing").short_label == "a thing" and METRICS["aie"].short_label == "AIE"
    assert METRICS["kl"].axis_title() == "KL(output || lens) on held-out text (nats)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        rank.label = "other"  # type: ignore[misc]
