"""Localization scores on hand-built per-probe tables whose answer is known: a method that puts
the true layer first scores 1, a constant one 0.5, random ones chance within a tolerance that
follows from n; neuron precision likewise."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from idiom_lens.analyses.attribution import attribute_probes
from idiom_lens.analyses.interventions.knockouts import rank_neurons
from idiom_lens.analyses.localization import (
    NEURON_COLUMNS,
    PROBE_SCORE_COLUMNS,
    PROFILE_COLUMNS,
    SCORE_COLUMNS,
    Implant,
    LocalizationScores,
    NeuronPrecision,
    attribution_neuron_scores,
    layer_neuron_scores,
    layer_scores,
    neuron_precision,
)
from idiom_lens.analyses.recall import PER_PROBE_COLUMNS, recall_profile
from idiom_lens.analyses.trajectory import layer_trajectory
from idiom_lens.errors import InputError

N_LAYERS = 18


def _table(measure: str, values: dict[str, np.ndarray], den: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """A recall per-probe table: values[implant] is [probe, layer] (NaN: no row)."""
    rows = []
    for group, table in values.items():
        for i, row in enumerate(table):
            for layer, v in enumerate(row):
                if not np.isnan(v):
                    d = 1.0 if den is None else float(den[group][i])
                    rows.append({"measure": measure, "group": group, "probe_id": f"p{i}", "layer": layer,
                                 "num": float(v), "den": d})
    return pd.DataFrame(rows, columns=PER_PROBE_COLUMNS)


def _peaked(rng: np.random.Generator, n: int, layer: int) -> np.ndarray:
    """Random values with the largest at `layer` for every probe."""
    values = rng.normal(size=(n, N_LAYERS))
    values[:, layer] = values.max(axis=1) + 0.5
    return values


def _row(scores: LocalizationScores, measure: str, implant: str) -> pd.Series:
    frame = scores.frame
    row = frame[(frame["measure"] == measure) & (frame["implant"] == implant)]
    assert len(row) == 1, (measure, implant)
    return row.iloc[0]


def test_the_true_layer_first_scores_one():
    rng = np.random.default_rng(0)
    per = pd.concat([_table("logit lens gain", {"a": _peaked(rng, 12, 2), "b": _peaked(rng, 12, 8)}),
                     _table("DLA MLP share", {"a": _peaked(rng, 12, 2), "b": _peaked(rng, 12, 8)},
                            {"a": np.full(12, 3.0), "b": np.full(12, 3.0)})])
    scores = layer_scores(per, true_layers={"a": 2, "b": Implant(layer=8, seed=1)})
    for measure in ("logit lens gain", "DLA MLP share"):
        for implant, depth in (("a", 2), ("b", 8), ("layer 2", 2), ("layer 8", 8)):
            row = _row(scores, measure, implant)
            assert (row["score"], row["score_low"], row["score_high"], row["hit"]) == (1.0, 1.0, 1.0, 1.0)
            assert (row["profile_top_layer"], row["profile_rank"], row["profile_score"]) == (depth, 1.0, 1.0)
            assert (row["n"], row["n_layers"], row["depth"]) == (12, N_LAYERS, depth)
            assert row["chance_score"] == 0.5 and row["chance_hit"] == pytest.approx(1 / N_LAYERS)
    per_probe = scores.per_probe
    assert (per_probe["rank"] == 1).all() and (per_probe["top_layer"] == per_probe["depth"]).all()
    assert _row(scores, "DLA MLP share", "b")["seed"] == 1 and pd.isna(_row(scores, "DLA MLP share", "a")["seed"])


def test_a_constant_method_scores_chance_not_one():
    per = _table("knockout top-100", {"a": np.ones((5, N_LAYERS))})  # every layer changes every prediction
    row = _row(layer_scores(per, true_layers={"a": 3}), "knockout top-100", "a")
    assert row["score"] == 0.5 and (row["score_low"], row["score_high"]) == (0.5, 0.5)
    assert row["hit"] == pytest.approx(1 / N_LAYERS)  # a random pick among 18 tied layers
    assert pd.isna(row["profile_top_layer"]) and row["profile_rank"] == (N_LAYERS + 1) / 2
    assert row["profile_score"] == 0.5


def test_ties_share_their_average_rank():
    values = np.zeros((1, 5))
    values[0, [1, 3]] = 1.0  # the true layer 3 ties with layer 1 at the top
    scores = layer_scores(_table("knockout top-100", {"a": values}), true_layers={"a": 3})
    probe = scores.per_probe.iloc[0]
    assert (probe["rank"], probe["score"], probe["hit"]) == (1.5, 1 - 0.5 / 4, 0.5)
    assert pd.isna(probe["top_layer"])
    values[0, 1] = 2.0  # now layer 1 alone is first, layer 3 second
    probe = layer_scores(_table("knockout top-100", {"a": values}), true_layers={"a": 3}).per_probe.iloc[0]
    assert (probe["rank"], probe["score"], probe["hit"], probe["top_layer"]) == (2.0, 0.75, 0.0, 1)


def test_random_methods_score_chance_within_their_standard_error():
    rng = np.random.default_rng(7)
    n, true = 600, 8
    picks = np.zeros((n, N_LAYERS))
    picks[np.arange(n), rng.integers(0, N_LAYERS, size=n)] = 1.0  # a method naming one random layer
    per = pd.concat([_table("tracing MLP (last)", {"a": rng.normal(size=(n, N_LAYERS))}),
                     _table("knockout top-100", {"a": picks})])
    scores = layer_scores(per, true_layers={"a": true}, n_boot=200)
    # random values: the score is uniform on the 18 points 0, 1/17, ..., 1 (mean 0.5, variance 19 / (12 * 17))
    values = _row(scores, "tracing MLP (last)", "a")
    assert abs(values["score"] - 0.5) < 4 * math.sqrt((N_LAYERS + 1) / (12 * (N_LAYERS - 1)) / n)
    # a random pick: 1 with p = 1/18, else the average rank of the 17 tied zeros, 1 - 9 / 17 (mean 0.5)
    p, miss = 1 / N_LAYERS, 1 - (N_LAYERS / 2) / (N_LAYERS - 1)
    assert p * 1 + (1 - p) * miss == pytest.approx(0.5)
    sd = math.sqrt(p * (1 - p)) * (1 - miss)
    named = _row(scores, "knockout top-100", "a")
    assert abs(named["score"] - 0.5) < 4 * sd / math.sqrt(n)
    for row in (values, named):
        assert abs(row["hit"] - p) < 4 * math.sqrt(p * (1 - p) / n)
        assert row["score_low"] <= row["score"] <= row["score_high"]
        assert row["hit_low"] <= row["hit"] <= row["hit_high"]


def test_intervals_contain_the_mean_and_depths_resample_within_each_implant():
    rng = np.random.default_rng(1)
    good, bad = _peaked(rng, 10, 2), _peaked(rng, 10, 5)  # b's true layer 2 is never first
    per = _table("logit lens gain", {"a": good, "b": bad, "c": rng.normal(size=(7, N_LAYERS))})
    scores = layer_scores(per, true_layers={"a": Implant(layer=2, seed=0), "b": Implant(layer=2, seed=1),
                                            "c": Implant(layer=9, seed=0)})
    for row in scores.frame.itertuples():
        assert row.score_low <= row.score <= row.score_high
        assert row.hit_low <= row.hit <= row.hit_high
    pooled = _row(scores, "logit lens gain", "layer 2")
    a, b = _row(scores, "logit lens gain", "a"), _row(scores, "logit lens gain", "b")
    assert (pooled["n"], pooled["n_implants"], pooled["scope"]) == (20, 2, "depth")
    assert pooled["score"] == pytest.approx((a["score"] * 10 + b["score"] * 10) / 20)
    assert pooled["hit"] == pytest.approx(0.5)
    # resampled within each implant, the pooled score moves only with b's scores (a always scores 1)
    probe = scores.per_probe[scores.per_probe["implant"] == "b"]
    assert pooled["score_high"] - pooled["score_low"] <= (probe["score"].max() - probe["score"].min()) / 2 + 1e-12
    assert set(scores.profile["scope"]) == {"implant", "depth"}
    assert set(scores.profile.loc[scores.profile["scope"] == "depth", "implant"]) == {"layer 2", "layer 9"}


def test_scores_do_not_depend_on_the_order_of_implants_or_rows():
    """The same results given in another order (implants named in reverse, rows shuffled) give the
    same table, intervals included: a pooled bootstrap must not follow the caller's order."""
    rng = np.random.default_rng(3)
    per = _table("logit lens gain", {"a": rng.normal(size=(9, N_LAYERS)), "b": rng.normal(size=(8, N_LAYERS))})
    true = {"a": Implant(layer=2, seed=0), "b": Implant(layer=2, seed=1)}
    first = layer_scores(per, true_layers=true)
    again = layer_scores(per.sample(frac=1.0, random_state=0), true_layers=dict(reversed(list(true.items()))))
    pd.testing.assert_frame_equal(first.frame, again.frame)
    pooled = _row(first, "logit lens gain", "layer 2")
    assert pooled["score_low"] < pooled["score"] < pooled["score_high"]  # a real interval, not a point


def test_a_pooled_depth_of_opposite_implants_has_no_spread():
    """One implant always found (score 1), one never (score 0), ten probes each: resampling within
    each implant keeps the pooled mean at 0.5 in every resample; resampling the pooled probes would not."""
    top, bottom = np.zeros((10, 4)), np.zeros((10, 4))
    top[:, 1], bottom[:, [0, 2, 3]] = 1.0, 1.0
    bottom[:, 1] = -1.0
    per = _table("logit lens gain", {"a": top, "b": bottom})
    row = _row(layer_scores(per, true_layers={"a": Implant(layer=1, seed=0), "b": Implant(layer=1, seed=1)}),
               "logit lens gain", "layer 1")
    assert (row["score"], row["score_low"], row["score_high"]) == (0.5, 0.5, 0.5)


def test_a_ratio_ranks_num_over_den_and_missing_layers_are_left_out():
    num = np.array([[1.0, 2.0, 3.0]])  # the smallest num at layer 0, but a negative total: the largest share
    scores = layer_scores(_table("DLA MLP share", {"a": num}, {"a": np.array([-1.0])}), true_layers={"a": 0})
    assert _row(scores, "DLA MLP share", "a")["score"] == 1.0
    gains = np.array([[np.nan, 1.0, 0.5], [np.nan, 0.2, 0.9]])  # a lens gain has no layer 0
    scores = layer_scores(_table("logit lens gain", {"a": gains, "b": gains}), true_layers={"a": 0, "b": 2})
    assert _row(scores, "logit lens gain", "a")["n"] == 0 and np.isnan(_row(scores, "logit lens gain", "a")["score"])
    b = _row(scores, "logit lens gain", "b")
    assert (b["n"], b["n_layers"], b["score"]) == (2, 2, 0.5)  # first for one probe, last for the other


def test_table_columns_and_saved_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    per = pd.concat([_table("knockout top-100", {"a": (rng.random((6, N_LAYERS)) < 0.3).astype(float)}),
                     _table("attention knockout", {"a": rng.normal(size=(6, N_LAYERS))})])
    scores = layer_scores(per, true_layers={"a": Implant(layer=4, seed=2)}, n_boot=100)
    assert list(scores.to_dataframe().columns) == SCORE_COLUMNS
    assert list(scores.per_probe.columns) == PROBE_SCORE_COLUMNS
    assert list(scores.profile.columns) == PROFILE_COLUMNS
    assert len(scores.frame) == 4 and len(scores.per_probe) == 12
    assert scores.settings["measures"] == {"knockout top-100": "share", "attention knockout": "median"}
    scores.save(tmp_path)
    back = LocalizationScores.load(tmp_path)
    pd.testing.assert_frame_equal(back.frame, scores.frame)
    pd.testing.assert_frame_equal(back.per_probe, scores.per_probe)
    pd.testing.assert_frame_equal(back.profile, scores.profile)
    assert back.settings == scores.settings


def test_bad_input_is_named():
    per = _table("knockout top-100", {"a": np.ones((2, 3))})
    with pytest.raises(InputError, match="does not have"):
        layer_scores(per, true_layers={"z": 1})
    with pytest.raises(InputError, match="no implant"):
        layer_scores(per, true_layers={})
    with pytest.raises(InputError, match="lacks the columns"):
        layer_scores(per.drop(columns=["den"]), true_layers={"a": 1})
    with pytest.raises(InputError, match="not in the per-probe table"):
        layer_scores(per, true_layers={"a": 1}, measures=["DLA MLP share"])
    for bad in (-1, True, 1.5):
        with pytest.raises(InputError, match="layer must be"):
            Implant(layer=bad)
    with pytest.raises(InputError, match="seed"):
        Implant(layer=1, seed="0")


def test_scores_a_recall_profile_of_a_real_result(tiny_model, probes):
    """The per-probe table of `recall_profile` (here the lens gains of the tiny model) scores as
    the probe's own ranks say."""
    ids = [p.id for p in probes[:4]]
    trajectory = layer_trajectory(tiny_model, probes[:4], sites=("resid_post", "resid_mid"))
    per = recall_profile(trajectory=trajectory, sets={"implant": ids}).per_probe
    true = 1
    scores = layer_scores(per, true_layers={"implant": true}, measures=["logit lens MLP gain"])
    got = scores.per_probe.set_index("probe_id")
    part = per[per["measure"] == "logit lens MLP gain"].pivot(index="probe_id", columns="layer", values="num")
    for pid, row in part.iterrows():
        assert got.loc[pid, "rank"] == 1 + (row > row[true]).sum() + ((row == row[true]).sum() - 1) / 2
    assert _row(scores, "logit lens MLP gain", "implant")["n"] == 4


# --------------------------------------------------------------------------------------
# Neurons
# --------------------------------------------------------------------------------------

D_MLP = 256


def _precision(result: NeuronPrecision, method: str, k: int) -> pd.Series:
    frame = result.frame
    row = frame[(frame["method"] == method) & (frame["k"] == k)]
    assert len(row) == 1
    return row.iloc[0]


def test_the_trained_set_ranked_first_is_found_and_random_rankings_score_chance():
    rng = np.random.default_rng(0)
    trained = sorted(rng.choice(D_MLP, size=8, replace=False).tolist())
    exact = np.zeros(D_MLP)
    exact[trained] = 1.0 + rng.random(8)
    n = 500
    result = neuron_precision({"exact": exact, "random": rng.normal(size=(n, D_MLP)), "constant": np.ones(D_MLP)},
                              trained, n_boot=200)
    assert list(result.to_dataframe().columns) == NEURON_COLUMNS
    assert sorted(set(result.frame["k"])) == [8, 16, 40]  # n_trained x (1, 2, 5): Chang et al.'s k = r, 2r, 5r
    row = _precision(result, "exact", 8)
    assert (row["precision"], row["recall"], row["hits"]) == (1.0, 1.0, 8.0)
    assert (_precision(result, "exact", 40)["precision"], _precision(result, "exact", 40)["recall"]) == (0.2, 1.0)
    for k in (8, 16, 40):
        constant = _precision(result, "constant", k)  # ties broken at random, in expectation: exactly chance
        assert constant["precision"] == pytest.approx(8 / D_MLP) and constant["recall"] == pytest.approx(k / D_MLP)
        assert (constant["chance_precision"], constant["chance_recall"]) == (8 / D_MLP, k / D_MLP)
        # random rankings: hits per probe are hypergeometric (k draws of 256 holding 8 trained)
        q = 8 / D_MLP
        sd = math.sqrt(k * q * (1 - q) * (D_MLP - k) / (D_MLP - 1))
        random = _precision(result, "random", k)
        assert abs(random["hits"] - k * q) < 4 * sd / math.sqrt(n)
        assert random["n"] == n and random["precision_low"] <= random["precision"] <= random["precision_high"]
        assert random["recall"] == pytest.approx(random["hits"] / 8)


def test_a_mask_and_indices_agree_and_ties_at_the_cut_count_in_expectation():
    scores = np.zeros(10)
    scores[[0, 1]] = 2.0
    scores[[2, 3, 4, 5]] = 1.0  # k = 4: two places left for four tied neurons, one of them trained
    mask = np.zeros(10, dtype=bool)
    mask[[0, 2, 9]] = True
    by_mask = neuron_precision({"m": scores}, mask, ks=[4])
    by_index = neuron_precision({"m": scores}, [0, 2, 9], ks=[4])
    pd.testing.assert_frame_equal(by_mask.frame, by_index.frame)
    assert _precision(by_mask, "m", 4)["hits"] == pytest.approx(1 + 2 * 1 / 4)


def test_neuron_precision_round_trips_and_names_bad_input(tmp_path):
    result = neuron_precision({"m": np.arange(D_MLP, dtype=float)}, [1, 2], ks=[2, 4], implant="layer 2 seed 0")
    result.save(tmp_path)
    back = NeuronPrecision.load(tmp_path)
    pd.testing.assert_frame_equal(back.frame, result.frame)
    assert back.settings == result.settings and set(back.frame["implant"]) == {"layer 2 seed 0"}
    with pytest.raises(InputError, match="distinct indices"):
        neuron_precision({"m": np.zeros(D_MLP)}, [1, 1])
    with pytest.raises(InputError, match="some but not all"):
        neuron_precision({"m": np.zeros(D_MLP)}, [])
    with pytest.raises(InputError, match="ks must be"):
        neuron_precision({"m": np.zeros(D_MLP)}, [1], ks=[0])
    with pytest.raises(InputError, match="one d_mlp"):
        neuron_precision({"m": np.zeros(D_MLP), "n": np.zeros(D_MLP + 1)}, [1])
    with pytest.raises(InputError, match="not all finite"):
        neuron_precision({"m": np.full(D_MLP, np.nan)}, [1])


def test_neuron_scores_of_a_layer_come_from_the_toolkit_rankings(tiny_model, tiny_model_compat, probes):
    sample = probes[:3]
    got = layer_neuron_scores(tiny_model, sample, layer=1, rank_by=("effective", "dla"))
    want = rank_neurons(tiny_model, sample, rank_by="effective")
    d_mlp = int(tiny_model.bridge.cfg.d_mlp)
    assert set(got) == {"effective", "dla", "activation"}
    assert all(v.shape == (3, d_mlp) for v in got.values())
    assert got["effective"] == pytest.approx(want.scores[:, 1].double().numpy())
    assert got["activation"] == pytest.approx(want.activations[:, 1].abs().double().numpy())
    attribution = attribute_probes(tiny_model_compat, sample)
    group = next(iter(attribution.neuron_means))
    dla = attribution_neuron_scores(attribution, layer=1, group=group)
    assert dla.shape == (d_mlp,) and dla == pytest.approx(attribution.neuron_means[group][1, :, 0].double().numpy())
    assert len(neuron_precision({"effective": got["effective"], "dla (set)": dla}, [0, 3], ks=[2]).frame) == 2
    with pytest.raises(InputError, match="no neuron means"):
        attribution_neuron_scores(attribution, layer=1, group="no such set")
    with pytest.raises(InputError, match="layer must be"):
        layer_neuron_scores(tiny_model, sample, layer=tiny_model.n_layers)
