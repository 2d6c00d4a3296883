"""Trajectory figures are built from the analysis, one trace pair per set and panel."""

from __future__ import annotations

from idiom_lens.analyses.phases import analyse_phases
from idiom_lens.analyses.trajectory import layer_trajectory
from idiom_lens.plots.trajectory import promotion_histogram, trajectory_figure


def test_figures_have_a_line_and_band_per_group(tiny_model, probes):
    phases = analyse_phases(layer_trajectory(tiny_model, probes, sites=["resid_post"]), n_boot=50)
    fig = trajectory_figure(phases)
    groups = phases.curves["group"].nunique()
    assert len(fig.data) == groups * 2 * 2  # (band + mean) x (prob, rank panels)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert all(len(t.y) == phases.n_layers for t in lines)
    assert fig.layout.yaxis2.type == "log"
    hist = promotion_histogram(phases)
    assert len(hist.data) == phases.probes["group"].nunique()


def test_figures_use_the_shared_colours_and_metric_titles(tiny_model, probes):
    """Every set's traces take `groups.COLOR` (the tiny model memorizes nothing: its sets are renamed
    onto all five), and the axis titles come from the metric descriptors."""
    import dataclasses

    from idiom_lens import groups
    from idiom_lens.metrics import TRAJECTORY_METRICS

    phases = analyse_phases(layer_trajectory(tiny_model, probes, sites=["resid_post"]), n_boot=20)
    rename = dict(zip(dict.fromkeys(phases.curves["group"]), groups.GROUPS))
    assert "memorized idioms" in rename.values()
    renamed = dataclasses.replace(phases, curves=phases.curves.assign(group=phases.curves["group"].map(rename)),
                                  probes=phases.probes.assign(group=phases.probes["group"].map(rename)))
    fig = trajectory_figure(renamed)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    for t in lines:
        assert t.line.color == groups.COLOR[t.name.split(" (n=")[0]]
    assert any(t.name.startswith("memorized idioms") and t.line.color == groups.COLOR["memorized idioms"]
               for t in lines)
    hist = promotion_histogram(renamed)
    assert all(t.marker.color == groups.COLOR[t.name.split(" (n=")[0]] for t in hist.data)
    prob = TRAJECTORY_METRICS["pred_prob"]
    assert fig.layout.yaxis.title.text == prob.axis_title("mean") and list(fig.layout.yaxis.range) == [0, 1]
    target = trajectory_figure(renamed, token="target", log_rank=False)
    assert [a.text for a in target.layout.annotations][:2] == [
        TRAJECTORY_METRICS["target_prob"].label, TRAJECTORY_METRICS["target_rank"].axis_title()]
    assert target.layout.yaxis2.title.text == TRAJECTORY_METRICS["target_rank"].axis_title("mean")
