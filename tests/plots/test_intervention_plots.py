"""Intervention figures are built from result objects alone and export to HTML (and PNG)."""

from __future__ import annotations

import pytest

from idiom_lens.analyses.interventions import (
    CorruptionOptions,
    KnockoutGrid,
    KnockoutOptions,
    KnockoutResult,
    PatchingOptions,
    knockout_grid,
    patch_probes,
    skip_layers,
)
from idiom_lens.errors import InputError
from idiom_lens.plots.export import save_figure
from idiom_lens.plots.interventions import (
    knockout_heatmaps,
    knockout_layer_curves,
    knockout_positions_heatmaps,
    patching_heatmaps,
    skip_curves,
)

BANK = ("moon", "eye", "stone", "room", "cake", "ice", "mat", "book", "market", "history", "cat", "walked")


@pytest.fixture(scope="module")
def results(tiny_model, probes):
    knock = knockout_grid(tiny_model, probes, KnockoutOptions(grid=KnockoutGrid(ks=(1, 5), windows=(1, 2))))
    skip = skip_layers(tiny_model, probes)
    patch = patch_probes(tiny_model, probes[:4], PatchingOptions(corruption=CorruptionOptions(bank=BANK)))
    return knock, skip, patch


def test_knockout_heatmaps(results, tmp_path):
    knock = results[0]
    fig = knockout_heatmaps(knock, k=5)
    n_groups = knock.probes["group"].nunique()
    assert len(fig.data) == 4 * n_groups  # targeted, random, matched and the whole-MLP ceiling per set
    titles = [a.text for a in fig.layout.annotations]
    assert any("whole MLP (ceiling)" in t for t in titles) and any("norm-matched" in t for t in titles)
    assert all("(n=" in t for t in titles)
    title = fig.layout.title.text
    assert "every position (authors')" in title and "ranked by effective (ours)" in title
    assert "post-MLP norm frozen" in title and "zero ablation" in title
    z = fig.data[0].z
    assert z.shape == (3, 3) and z[2, 0] != z[2, 0]  # end < start is empty (NaN)
    paths = save_figure(fig, tmp_path / "knock", png=True, width=600, height=500)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    keep = knockout_heatmaps(knock, k=100, mode="keep_top", ceiling=False)  # keep_top's default k
    assert len(keep.data) == 2 * n_groups  # keep_top: targeted and random
    with pytest.raises(InputError, match="k=7"):
        knockout_heatmaps(knock, k=7)


def test_knockout_positions_and_layer_curves(results, tiny_model, probes, tmp_path):
    every = results[0]
    last = knockout_grid(tiny_model, probes,
                         KnockoutOptions(grid=KnockoutGrid(ks=(1, 5), windows=(1, 2)), positions="last"))
    both = KnockoutResult.stack_runs([every, last])
    group = both.probes["group"].iloc[0]
    fig = knockout_positions_heatmaps(both, k=5, group=group)
    assert len(fig.data) == 3  # every position, last position, difference
    assert fig.data[2].z[0, 0] == pytest.approx(fig.data[0].z[0, 0] - fig.data[1].z[0, 0])  # float64: default approx
    save_figure(fig, tmp_path / "positions", png=False)
    with pytest.raises(InputError, match="several variants"):
        knockout_heatmaps(both, k=5)
    assert "last position only" in knockout_heatmaps(both, k=5, positions="last").layout.title.text
    with pytest.raises(InputError, match="positions 'all' and 'last'"):
        knockout_positions_heatmaps(every, k=5, group=group)
    curves = knockout_layer_curves(both, k=5, window=1, positions="all")
    n_groups = both.probes["group"].nunique()
    assert len(curves.data) == 4 * n_groups  # targeted, matched, random, ceiling per set
    assert all(tr.error_y.array is not None for tr in curves.data)
    # each point's hover carries the layer table's diagnostics for that set, control and layer
    table = every.layer_table(k=5, window=1)
    first = curves.data[0]
    group = curves.layout.annotations[0].text.split("<br>")[0]
    row = table[(table["control"] == "targeted") & (table["group"] == group)]
    assert list(first.customdata[:, 1]) == list(row.sort_values("layer")["out_cosine"])
    live = knockout_grid(tiny_model, probes[:3], KnockoutOptions(grid=KnockoutGrid(ks=(5,), windows=(1,)), norm="live"))
    with pytest.raises(InputError, match="several variants"):
        knockout_layer_curves(KnockoutResult.stack_runs([every, live]), k=5, window=1, positions="all")
    assert "post-MLP norm live" in knockout_layer_curves(live, k=5, window=1).layout.title.text
    save_figure(curves, tmp_path / "curves", png=False)
    assert (tmp_path / "curves.html").exists()


def test_skip_curves(results, tmp_path):
    skip = results[1]
    fig = skip_curves(skip)
    assert len(fig.data) == 2 * 2 * skip.probes["group"].nunique()  # 2 panels x 2 window lengths x sets
    save_figure(fig, tmp_path / "skip", png=False)
    assert (tmp_path / "skip.html").exists()


def test_patching_heatmaps(results, tmp_path):
    patch = results[2]
    valid = patch.pairs[patch.pairs["valid"] & (patch.pairs["variant"] == "word_swap")]
    assert len(valid) > 0
    fig = patching_heatmaps(patch, variant="word_swap", probe_id=valid["probe_id"].iloc[0])
    assert len(fig.data) == 3  # resid_pre, attn_out, mlp_out
    assert fig.data[0].z.shape[0] == 3
    mean = patching_heatmaps(patch, variant="word_swap")
    assert len(mean.data) == 3
    save_figure(mean, tmp_path / "patch", png=False)
    with pytest.raises(InputError):
        patching_heatmaps(patch, variant="word_swap", probe_id="nope")


def test_intervention_figures_use_the_shared_colours_and_metric_labels(results):
    """Skip curves colour each set with `groups.COLOR` (sets renamed onto all five: the tiny model
    memorizes nothing); titles and axes name the metrics by their descriptors."""
    import dataclasses

    from idiom_lens import groups
    from idiom_lens.metrics import INTERVENTION_METRICS

    knock, skip = results[0], results[1]
    rename = dict(zip(dict.fromkeys(skip.probes["group"]), groups.GROUPS))
    assert "memorized idioms" in rename.values()
    renamed = dataclasses.replace(skip, probes=skip.probes.assign(group=skip.probes["group"].map(rename)))
    fig = skip_curves(renamed)
    for t in fig.data:
        assert t.line.color == groups.COLOR[t.name.split(" (n=")[0]]
    assert any(t.name.startswith("memorized idioms") and t.line.color == groups.COLOR["memorized idioms"]
               for t in fig.data)
    assert [a.text for a in fig.layout.annotations][:2] == [
        INTERVENTION_METRICS["changed"].label, INTERVENTION_METRICS["prob_drop"].label]
    curves = knockout_layer_curves(knock, k=5, window=1)
    assert curves.layout.yaxis.title.text == INTERVENTION_METRICS["changed"].axis_title()
    assert (INTERVENTION_METRICS["prob_drop"].label
            in knockout_heatmaps(knock, k=5, metric="prob_drop").layout.title.text)
    with pytest.raises(InputError, match="metric must be one of changed, prob_drop, new_is_target"):
        knockout_heatmaps(knock, k=5, metric="entropy")
