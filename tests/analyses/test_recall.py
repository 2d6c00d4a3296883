"""The "where recall lives" table takes each measure's numbers from its own result, unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from idiom_lens.analyses.attribution import attribute_probes
from idiom_lens.analyses.interventions import (
    AttentionKnockoutOptions,
    KnockoutGrid,
    KnockoutOptions,
    TracingOptions,
    knockout_grid,
)
from idiom_lens.analyses.interventions.attention_knockouts import attention_knockout
from idiom_lens.analyses.interventions.tracing import causal_trace
from idiom_lens.analyses.recall import MEASURES, recall_profile
from idiom_lens.errors import InputError
from idiom_lens.plots.recall import where_recall_lives

GROUPS = ("memorized idioms", "non-memorized idioms", "ordinary text")


@pytest.fixture(scope="module")
def results(tiny_model, tiny_model_compat, probes):
    sample = probes[:4]
    return {
        "knockouts": knockout_grid(tiny_model, sample,
                                   KnockoutOptions(grid=KnockoutGrid(ks=(100,), windows=(1,), modes=("zero_top",)),
                                                   controls=("matched",), positions="all")),
        "tracing": causal_trace(tiny_model, sample, TracingOptions(windows=(1, 2), noise_samples=2)),
        "attention": attention_knockout(tiny_model, sample, AttentionKnockoutOptions(window=2)),
        "attribution": attribute_probes(tiny_model_compat, sample),
    }


def _at(frame, measure, group, layer):
    row = frame[(frame["measure"] == measure) & (frame["group"] == group) & (frame["layer"] == layer)]
    assert len(row) == 1, (measure, group, layer)
    return row.iloc[0]


def test_each_measure_is_read_from_its_result(results, tiny_model):
    profile = recall_profile(**results, groups=GROUPS)
    frame = profile.to_dataframe()
    assert set(frame["measure"]) == set(MEASURES)
    assert profile.settings["tracing"]["window"] == 2  # the largest window by default
    layer = tiny_model.n_layers - 1
    group = frame.loc[frame["measure"] == "tracing MLP (last noised)", "group"].iloc[0]

    s = results["tracing"].summary()
    want = s[(s["site"] == "mlp") & (s["window"] == 2) & (s["position"] == "last noised") & (s["group"] == group)
             & (s["layer"] == layer)].iloc[0]
    got = _at(frame, "tracing MLP (last noised)", group, layer)
    assert ((got["value"], got["value_low"], got["value_high"], got["n"])
            == (want["aie"], want["aie_low"], want["aie_high"], want["n"]))
    want = s[(s["site"] == "attn") & (s["window"] == 2) & (s["position"] == "last") & (s["group"] == group)
             & (s["layer"] == 0)].iloc[0]
    assert _at(frame, "tracing attention (last)", group, 0)["value"] == want["aie"]

    a = results["attention"].summary()
    want = a[(a["source"] == "context") & (a["group"] == group) & (a["layer"] == 0)].iloc[0]
    got = _at(frame, "attention knockout", group, 0)
    assert got["value"] == -want["rel_change"] and got["value_low"] == -want["rel_change_high"]

    k = results["knockouts"].layer_table(k=100, window=1)
    want = k[(k["control"] == "matched") & (k["group"] == group) & (k["layer"] == layer)].iloc[0]
    assert _at(frame, "knockout matched", group, layer)["value"] == want["changed"]

    # the DLA share of an MLP layer: mean contribution over mean final logit (bias excluded)
    attrib = results["attribution"]
    probes = [p for p in attrib.probes if p.group == group]
    mlp = np.array([float(p.mlp[layer, 0]) for p in probes])
    total = np.array([p.logit - float(p.unembed_bias[0]) for p in probes])
    # float64: default approx
    assert _at(frame, "DLA MLP share", group, layer)["value"] == pytest.approx(mlp.mean() / total.mean())


def test_peaks_and_figure(results):
    profile = recall_profile(**results, groups=GROUPS)
    peaks = profile.peaks()
    for (measure, group), part in profile.frame.groupby(["measure", "group"]):
        row = peaks[(peaks["measure"] == measure) & (peaks["group"] == group)].iloc[0]
        assert row["value"] == part["value"].max()
    fig = where_recall_lives(profile)
    assert len(fig.layout.annotations) == 4  # one title per panel: knockouts, tracing, attention, DLA
    only_tracing = where_recall_lives(recall_profile(tracing=results["tracing"], groups=GROUPS))
    assert len(only_tracing.layout.annotations) == 1


def test_bad_input_is_named(results):
    with pytest.raises(InputError, match="at least one result"):
        recall_profile()
    with pytest.raises(InputError, match="tracing_window 7"):
        recall_profile(tracing=results["tracing"], tracing_window=7)
