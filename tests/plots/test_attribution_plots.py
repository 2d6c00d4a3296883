"""Attribution figures build from result objects, are non-empty, and export."""

from __future__ import annotations

import pytest

from idiom_lens.analyses.attribution import attribute_probes
from idiom_lens.plots.attribution import (
    head_heatmap_figure,
    layer_contribution_figure,
    probe_heatmap_figure,
    top_neurons_table,
)
from idiom_lens.plots.export import save_figure


@pytest.fixture(scope="module")
def result(tiny_model_compat, probes):
    return attribute_probes(tiny_model_compat, probes, top_neurons=5, promoted_tokens=3)


@pytest.mark.parametrize("measure", ["logit", "logit_diff"])
def test_layer_figure(result, measure):
    fig = layer_contribution_figure(result, measure=measure, min_n=1, n_boot=100)
    names = {t.name for t in fig.data if t.showlegend}
    assert names and all("(n=" in n for n in names)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 3 * len(names)  # attention, MLP, cumulative share per set
    assert all(len(t.x) > 0 for t in lines)


def test_the_layer_figure_names_the_logit_it_splits(result, bert, probes):
    assert "compat logits" in layer_contribution_figure(result, min_n=1, n_boot=20).layout.title.text
    masked = attribute_probes(bert, probes[:4], top_neurons=3, promoted_tokens=2)
    assert "raw MLM logits at the mask" in layer_contribution_figure(masked, min_n=1, n_boot=20).layout.title.text


def test_layer_figure_leaves_out_small_sets(result):
    fig = layer_contribution_figure(result, min_n=3, n_boot=50)
    assert "left out" in fig.layout.title.text
    assert all(int(t.name.split("n=")[1].rstrip(")")) >= 3 for t in fig.data if t.showlegend)


def test_probe_figures(result):
    p = result.probes[0]
    heat = probe_heatmap_figure(p)
    assert len(heat.data[0].z) == 3 and len(heat.data[0].x) == p.n_layers + 1
    heads = head_heatmap_figure(p, measure="logit_diff")
    assert len(heads.data[0].z) == p.heads.shape[1] and len(heads.data[0].z[0]) == p.n_layers
    table = top_neurons_table(p.top_neurons, value_vector_final_norm=True)
    assert len(table.data[0].cells.values[0]) == 5
    assert "final norm weight applied" in table.layout.title.text


def test_save(result, tmp_path):
    written = save_figure(probe_heatmap_figure(result.probes[0]), tmp_path / "heat", png=True)
    assert all(p.stat().st_size > 0 for p in written) and {p.suffix for p in written} == {".html", ".png", ".json"}
