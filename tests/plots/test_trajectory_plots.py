"""Trajectory figures are built from the analysis, one trace pair per set and panel."""

from __future__ import annotations

from idiom_lens.analyses.phases import analyse_phases
from idiom_lens.plots.trajectory import promotion_histogram, trajectory_figure
from idiom_lens.analyses.trajectory import layer_trajectory


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
