"""The two phases: promotion layers, curves with bands, boundary, summary."""

from __future__ import annotations

import numpy as np

from idiom_lens.phases import analyse_phases, first_entry_layers, promotion_layers
from idiom_lens.stats import bootstrap_mean_ci
from idiom_lens.trajectory import layer_trajectory


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
    assert isinstance(phases.summary_text, str) and phases.summary_text
    assert phases.to_dict()["n_layers"] == result.n_layers
