"""The attention knockout figure draws the summary's measure (log-probability change by default)
from a hand-built result."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutResult
from idiom_lens.errors import InputError
from idiom_lens.plots.attention_knockout import MEASURES, attention_knockout_curves


@pytest.fixture(scope="module")
def result() -> AttentionKnockoutResult:
    """Two memorized idioms, halved at layer 0 and unchanged at layer 1; one changed prediction."""
    rows = []
    for probe_id, changed in (("a", True), ("b", False)):
        for layer, p in enumerate((0.25, 0.5)):
            rows.append({"probe_id": probe_id, "source": "context", "layer": layer, "window_first": layer,
                         "window_last": layer, "n_blocked": 2, "clean_pred_id": 3, "clean_prob": 0.5, "prob": p,
                         "rel_change": (p - 0.5) / 0.5, "logp_change": math.log(p / 0.5),
                         "changed": changed and layer == 0, "new_pred_id": 3, "reason": ""})
    probes = pd.DataFrame({"probe_id": ["a", "b"], "kind": "idiom", "group": "memorized idioms", "clean_prob": 0.5})
    return AttentionKnockoutResult(rows=pd.DataFrame(rows), probes=probes,
                                   settings={"window": 1, "sources": ["context"], "model_name": "toy"})


def line(figure, name_start: str):
    return next(t for t in figure.data if t.mode == "lines+markers" and t.name.startswith(name_start))


@pytest.mark.parametrize("measure, want", [
    ("logp_change", [-math.log(2), 0.0]),
    ("logp_change_median", [-math.log(2), 0.0]),
    ("rel_change", [-0.5, 0.0]),
    ("changed", [0.5, 0.0]),
])
def test_draws_the_chosen_measure(result, measure, want):
    figure = attention_knockout_curves(result, measure=measure)
    assert list(line(figure, "memorized idioms (n=2)").y) == pytest.approx(want)
    assert figure.layout.yaxis.tickformat == MEASURES[measure][2]


def test_default_is_the_log_probability_change(result):
    figure = attention_knockout_curves(result)
    assert "log p" in figure.layout.yaxis.title.text and "mean" in figure.layout.title.text
    assert list(line(figure, "memorized").y) == pytest.approx([-math.log(2), 0.0])


def test_bad_measure_or_groups(result):
    with pytest.raises(InputError, match="measure must be one of"):
        attention_knockout_curves(result, measure="prob")
    with pytest.raises(InputError, match="none of the sets"):
        attention_knockout_curves(result, groups=["ordinary text"])
