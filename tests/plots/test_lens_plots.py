"""A tuned lens's training-curve figure: one line for the training loss, one for the held-out KL
where it was measured."""

from __future__ import annotations

import math

import pandas as pd

from idiom_lens.plots.lenses import training_curve_figure


def test_training_curve_figure_draws_what_was_measured():
    curve = pd.DataFrame({"step": [0, 1, 2, 3], "train_kl": [2.0, 1.5, 1.0, math.nan],
                          "heldout_kl": [2.2, math.nan, math.nan, 1.2]})
    fig = training_curve_figure(curve)
    assert [t.name for t in fig.data] == ["training batch", "held-out"]
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[0].y) == [2.0, 1.5, 1.0]
    assert list(fig.data[1].x) == [0, 3] and list(fig.data[1].y) == [2.2, 1.2]
    assert fig.layout.yaxis.type == "log"
    no_heldout = training_curve_figure(curve.assign(heldout_kl=math.nan))
    assert [t.name for t in no_heldout.data] == ["training batch"]
