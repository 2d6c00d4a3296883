"""The localization figures draw the scores and profiles of a `LocalizationScores` as they are."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from idiom_lens.analyses.localization import Implant, LocalizationScores, layer_scores
from idiom_lens.analyses.recall import PER_PROBE_COLUMNS
from idiom_lens.errors import InputError
from idiom_lens.plots.localization import localization_heatmap, localization_profiles

N_LAYERS = 6
IMPLANTS = {"L1 s0": Implant(layer=1, seed=0), "L1 s1": Implant(layer=1, seed=1), "L4 s0": Implant(layer=4, seed=0)}


@pytest.fixture(scope="module")
def scores() -> LocalizationScores:
    """Two measures on three implants (two at layer 1, one at layer 4): one finds the layer, one is noise."""
    rng = np.random.default_rng(0)
    rows = []
    for name, implant in IMPLANTS.items():
        for p in range(5):
            noise = rng.normal(size=N_LAYERS)
            for layer in range(N_LAYERS):
                rows.append(("logit lens gain", name, f"p{p}", layer, 3.0 if layer == implant.layer else noise[layer]))
                rows.append(("tracing MLP (last)", name, f"p{p}", layer, rng.normal()))
    per = pd.DataFrame([(*r, 1.0) for r in rows], columns=PER_PROBE_COLUMNS)
    return layer_scores(per, true_layers=IMPLANTS, n_boot=100)


def test_heatmap_holds_the_pooled_score_of_each_method_and_depth(scores):
    fig = localization_heatmap(scores)
    (heat,) = fig.data
    assert isinstance(heat, go.Heatmap)
    assert list(heat.x) == ["layer 1", "layer 4"]
    assert list(heat.y) == ["tracing MLP (last)", "logit lens gain"]  # recall's MEASURES order
    depth = scores.frame[scores.frame["scope"] == "depth"].set_index(["measure", "depth"])
    for i, measure in enumerate(heat.y):
        for j, d in enumerate((1, 4)):
            row = depth.loc[(measure, d)]
            assert heat.z[i][j] == pytest.approx(row["score"])
            assert f"[{row['score_low']:.2f}, {row['score_high']:.2f}]" in heat.text[i][j]
            assert f"n = {int(row['n'])}" in heat.text[i][j]
    assert list(heat.z[1]) == [1.0, 1.0]  # the lens gain finds both layers
    assert heat.zmid == 0.5 and "chance" in heat.colorbar.ticktext[1]
    only = localization_heatmap(scores, measures=["logit lens gain"])
    assert list(only.data[0].y) == ["logit lens gain"]


def test_profiles_mark_the_true_layer_in_every_panel(scores):
    fig = localization_profiles(scores)
    lines = [shape for shape in fig.layout.shapes if shape.type == "line"]
    assert sorted(shape.x0 for shape in lines) == [1, 1, 4, 4]  # 2 methods x 2 depths
    pooled = [t for t in fig.data if t.name == "pooled over implants"]
    per_implant = [t for t in fig.data if t.name in IMPLANTS]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert (len(pooled), len(per_implant), len(bands)) == (4, 6, 4)
    profile = scores.profile
    want = profile[(profile["scope"] == "depth") & (profile["measure"] == "logit lens gain") & (profile["depth"] == 4)]
    drawn = [t for t in pooled if list(t.y) == pytest.approx(want.sort_values("layer")["value"].tolist())]
    assert len(drawn) == 1
    assert [a.text for a in fig.layout.annotations][:2] == ["implanted in layer 1", "implanted in layer 4"]
    row_titles = [a for a in fig.layout.annotations if a.text in ("logit lens gain", "tracing MLP (last)")]
    assert len(row_titles) == 2 and all(a.textangle == 0 and a.xanchor == "right" for a in row_titles)


def test_saved_png_takes_the_figures_own_size(scores, tmp_path):
    """A figure of many panels sets its height; the PNG keeps it unless a size is given."""
    from idiom_lens.plots.export import save_figure

    def png_size(path):
        return struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk's width and height

    fig = localization_profiles(scores)
    own = save_figure(fig, tmp_path / "own", png=True)[-1]
    assert png_size(own) == (fig.layout.width, fig.layout.height)
    given = save_figure(fig, tmp_path / "given", png=True, width=640, height=480)[-1]
    assert png_size(given) == (640, 480)
    plain = save_figure(go.Figure(go.Scatter(x=[0, 1], y=[0, 1])), tmp_path / "plain", png=True)[-1]
    assert png_size(plain) == (1000, 700)


def test_bad_input_is_named(scores):
    with pytest.raises(InputError, match="not in the localization scores"):
        localization_heatmap(scores, measures=["DLA MLP share"])
    with pytest.raises(InputError, match="not in the localization scores"):
        localization_profiles(scores, measures=["DLA MLP share"])
    empty = LocalizationScores(frame=scores.frame.iloc[:0], per_probe=scores.per_probe.iloc[:0],
                               profile=scores.profile.iloc[:0])
    with pytest.raises(InputError, match="no rows"):
        localization_heatmap(empty)
    with pytest.raises(InputError, match="no profiles"):
        localization_profiles(empty)
