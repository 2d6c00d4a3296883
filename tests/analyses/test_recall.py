"""The "where recall lives" table takes each measure from its own result; set comparisons are
tested on hand-built per-probe tables whose answer is known."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
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
from idiom_lens.analyses.recall import (
    LOG_P_RESOLVED,
    MEASURES,
    PER_PROBE_COLUMNS,
    RecallProfile,
    compare_sets,
    profile_from_per_probe,
    recall_profile,
)
from idiom_lens.analyses.trajectory import layer_trajectory
from idiom_lens.errors import InputError
from idiom_lens.plots.recall import where_recall_lives

GROUPS = ("memorized idioms", "non-memorized idioms", "ordinary text")


@pytest.fixture(scope="module")
def results(tiny_model, tiny_model_compat, probes):
    sample = probes[:4]
    grid = KnockoutGrid(ks=(100,), windows=(1,), modes=("zero_top",))
    frozen = knockout_grid(tiny_model, sample, KnockoutOptions(grid=grid, controls=("matched", "whole_mlp"),
                                                               positions="all", norm="frozen"))
    return {
        "knockouts": frozen,
        "tracing": causal_trace(tiny_model, sample, TracingOptions(windows=(1, 2), noise_samples=2)),
        "attention": attention_knockout(tiny_model, sample, AttentionKnockoutOptions(window=2)),
        "attribution": attribute_probes(tiny_model_compat, sample),
    }


def _at(frame, measure, group, layer):
    row = frame[(frame["measure"] == measure) & (frame["group"] == group) & (frame["layer"] == layer)]
    assert len(row) == 1, (measure, group, layer)
    return row.iloc[0]


def test_each_measure_is_read_from_its_result(results, tiny_model):
    profile = recall_profile(**results, groups=GROUPS, min_total_effect=1e-9)
    frame = profile.to_dataframe()
    present = set(frame["measure"])
    assert present <= set(MEASURES)
    assert {"knockout top-100", "knockout matched", "tracing MLP share (last)", "attention knockout",
            "DLA MLP share"} <= present
    assert profile.settings["tracing"]["window"] == 2  # the largest window by default
    layer = tiny_model.n_layers - 1
    group = frame.loc[frame["measure"] == "tracing MLP (last noised)", "group"].iloc[0]

    s = results["tracing"].summary()
    want = s[(s["site"] == "mlp") & (s["window"] == 2) & (s["position"] == "last noised") & (s["group"] == group)
             & (s["layer"] == layer)].iloc[0]
    got = _at(frame, "tracing MLP (last noised)", group, layer)
    assert (got["value"], got["n"]) == (pytest.approx(want["aie"]), want["n"])

    # the restored share: the ratio of means tracing computes itself
    share = results["tracing"].restored_share(min_total_effect=1e-9)
    want = share[(share["site"] == "mlp") & (share["window"] == 2) & (share["position"] == "last")
                 & (share["group"] == group) & (share["layer"] == layer)].iloc[0]
    got = _at(frame, "tracing MLP share (last)", group, layer)
    assert (got["value"], got["n"]) == (pytest.approx(want["share"]), want["n"])

    # the attention knockout: the median over probes of -(log p_cut - log p_clean), by hand
    rows = results["attention"].to_dataframe()
    rows = rows[(rows["source"] == "context") & (rows["group"] == group) & (rows["layer"] == 0)
                & (rows["reason"] == "")]
    drop = np.log(rows["clean_prob"].to_numpy()) - np.log(rows["prob"].to_numpy())
    assert _at(frame, "attention knockout", group, 0)["value"] == pytest.approx(np.median(drop), rel=1e-5)

    k = results["knockouts"].layer_table(k=100, window=1)
    want = k[(k["control"] == "matched") & (k["group"] == group) & (k["layer"] == layer)].iloc[0]
    got = _at(frame, "knockout matched", group, layer)
    assert (got["value"], got["value_low"], got["value_high"]) == pytest.approx(
        (want["changed"], want["changed_low"], want["changed_high"]))

    # the DLA share of an MLP layer: mean contribution over mean final logit (bias excluded)
    attrib = results["attribution"]
    probes = [p for p in attrib.probes if p.group == group]
    mlp = np.array([float(p.mlp[layer, 0]) for p in probes])
    total = np.array([p.logit - float(p.unembed_bias[0]) for p in probes])
    assert _at(frame, "DLA MLP share", group, layer)["value"] == pytest.approx(mlp.mean() / total.mean())


def test_whole_mlp_and_log_p_drops_come_from_the_knockout_rows(results):
    knock = results["knockouts"]
    profile = recall_profile(knockouts=knock, groups=GROUPS)
    frame, per = profile.frame, profile.per_probe
    assert {"knockout whole MLP", "knockout whole MLP log-p drop", "knockout top-100 log-p drop",
            "knockout matched log-p drop"} <= set(frame["measure"])
    table = knock.layer_table(k=100, window=1)
    for row in table[table["control"] == "whole_mlp"].itertuples():
        got = _at(frame, "knockout whole MLP", row.group, row.layer)
        assert (got["value"], got["n"]) == (pytest.approx(row.changed), row.n)
    # the log-p drop of each row, by hand: log p_clean - log p_knocked of the clean prediction
    rows = knock.to_dataframe()
    clean = rows["probe_id"].map(knock.probes.set_index("probe_id")["clean_pred_prob"])
    rows["drop"] = np.log(clean) - np.log(rows["prob_of_clean_pred"])
    for control, measure in (("whole_mlp", "knockout whole MLP log-p drop"),
                             ("targeted", "knockout top-100 log-p drop")):
        mine = rows[rows["control"] == control]
        want = mine.set_index(["probe_id", "start"])["drop"].sort_index()
        got = per[per["measure"] == measure].set_index(["probe_id", "layer"])["num"].sort_index()
        assert got.index.equals(want.index) and got.to_numpy() == pytest.approx(want.to_numpy())
        # the set's value is the median over its probes
        for (group, layer), part in mine.groupby(["group", "start"]):
            assert _at(frame, measure, group, layer)["value"] == pytest.approx(np.median(part["drop"]))


def test_lens_gains_are_log_probability_steps(tiny_model, probes):
    sample = probes[:4]
    trajectory = layer_trajectory(tiny_model, sample, sites=("resid_post", "resid_mid"))
    ids = [p.id for p in sample]
    profile = recall_profile(trajectory=trajectory, sets={"A": ids[:3], "B": ids[1:]})
    per = profile.per_probe
    assert set(per["measure"]) == {"logit lens gain", "logit lens MLP gain"}
    assert (trajectory.target_prob >= LOG_P_RESOLVED).all()  # the tiny model resolves every probability
    logp = np.log(trajectory.target_prob.astype(np.float64))
    post, mid = logp[:, trajectory.site("resid_post")], logp[:, trajectory.site("resid_mid")]
    gain = per[(per["measure"] == "logit lens gain") & (per["group"] == "A")]
    assert sorted(set(gain["layer"])) == list(range(1, tiny_model.n_layers))  # no embedding read: no layer 0
    for row in gain.itertuples():
        i = ids.index(row.probe_id)
        assert row.num == pytest.approx(post[i, row.layer] - post[i, row.layer - 1])
    # the gains telescope: their sum over layers is the last read-out's log p minus the first's
    total = gain.groupby("probe_id")["num"].sum()
    assert total.to_numpy() == pytest.approx([post[ids.index(p), -1] - post[ids.index(p), 0] for p in total.index])
    mlp = per[(per["measure"] == "logit lens MLP gain") & (per["group"] == "B") & (per["layer"] == 0)]
    assert mlp.set_index("probe_id")["num"].to_dict() == pytest.approx(
        {p: post[ids.index(p), 0] - mid[ids.index(p), 0] for p in ids[1:]})
    # the set's value is the mean over its probes
    want = np.mean([post[ids.index(p), 2] - post[ids.index(p), 1] for p in ids[:3]])
    assert _at(profile.frame, "logit lens gain", "A", 2)["value"] == pytest.approx(want)
    # a probability that underflows float32 has no log: the gains into and out of it have no value
    prob = trajectory.target_prob.copy()
    prob[0, trajectory.site("resid_post"), 2] = 1e-40
    lost = recall_profile(trajectory=dataclasses.replace(trajectory, target_prob=prob), sets={"A": ids}).per_probe
    lost = lost[(lost["measure"] == "logit lens gain") & (lost["probe_id"] == ids[0])]
    assert sorted(lost["layer"]) == [x for x in range(1, tiny_model.n_layers) if x not in (2, 3)]
    with pytest.raises(InputError, match="tuned lens"):
        recall_profile(tuned_trajectory=trajectory)
    with pytest.raises(InputError, match="does not have"):
        recall_profile(trajectory=trajectory, sets={"A": ["no-such-probe"]})


def test_sets_regroup_every_result_and_may_share_probes(results):
    ids = list(results["knockouts"].probes["probe_id"])
    sets = {"A": ids[:3], "B": ids[1:]}  # two probes in both sets
    profile = recall_profile(**results, sets=sets, min_total_effect=1e-9)
    assert set(profile.frame["group"]) == {"A", "B"}
    per = profile.per_probe
    for measure in ("knockout top-100", "DLA MLP share", "attention knockout"):
        got = per[(per["measure"] == measure)].groupby("group")["probe_id"].nunique().to_dict()
        assert got == {"A": 3, "B": 3}, measure
    # a set's value is the value of its probes alone
    alone = recall_profile(attribution=results["attribution"], sets={"A": ids[:3]})
    assert (alone.frame["value"].to_numpy() == pytest.approx(
        profile.frame[(profile.frame["measure"] == "DLA MLP share") & (profile.frame["group"] == "A")]
        ["value"].to_numpy()))
    with pytest.raises(InputError, match="does not have"):
        recall_profile(knockouts=results["knockouts"], sets={"A": ["no-such-probe"]})


def test_peaks_and_figure(results):
    profile = recall_profile(**results, groups=GROUPS)
    peaks = profile.peaks()
    for (measure, group), part in profile.frame.groupby(["measure", "group"]):
        row = peaks[(peaks["measure"] == measure) & (peaks["group"] == group)]
        if part["value"].notna().any():
            assert row.iloc[0]["value"] == part["value"].max()
    fig = where_recall_lives(profile)
    assert len(fig.layout.annotations) == 4  # one title per panel: knockouts, tracing, attention, DLA
    only_tracing = where_recall_lives(recall_profile(tracing=results["tracing"], groups=GROUPS))
    assert len(only_tracing.layout.annotations) == 1


def test_saved_profile_round_trips(results, tmp_path):
    profile = recall_profile(**results, groups=GROUPS)
    profile.save(tmp_path)
    back = RecallProfile.load(tmp_path)
    pd.testing.assert_frame_equal(back.frame, profile.frame)
    pd.testing.assert_frame_equal(back.per_probe, profile.per_probe)


def test_bad_input_is_named(results):
    with pytest.raises(InputError, match="at least one result"):
        recall_profile()
    with pytest.raises(InputError, match="tracing_window 7"):
        recall_profile(tracing=results["tracing"], tracing_window=7)


# --------------------------------------------------------------------------------------
# Statistics on hand-built per-probe tables
# --------------------------------------------------------------------------------------


def _per_probe(measure: str, values: dict[str, np.ndarray], den: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    rows = []
    for group, table in values.items():
        for i, row in enumerate(table):
            for layer, v in enumerate(row):
                d = 1.0 if den is None else float(den[group][i])
                rows.append({"measure": measure, "group": group, "probe_id": f"{group}-{i}", "layer": layer,
                             "num": float(v), "den": d})
    return pd.DataFrame(rows, columns=PER_PROBE_COLUMNS)


def test_ratio_of_means_and_median_by_hand():
    ie = {"a": np.array([[0.1, 0.4], [0.3, 0.0]])}
    te = {"a": np.array([0.2, 0.6])}
    frame = profile_from_per_probe(_per_probe("tracing MLP share (last)", ie, te))
    # (0.1 + 0.3) / (0.2 + 0.6) = 0.5, not the mean of ratios (0.5 + 0.5) / 2 ... at layer 1: 0.4 / 0.8
    assert frame["value"].tolist() == pytest.approx([0.5, 0.5])
    frame = profile_from_per_probe(_per_probe("attention knockout", {"a": np.array([[1.0], [5.0], [2.0]])}))
    assert frame["value"].tolist() == [2.0]


def test_compare_sets_finds_the_one_layer_that_differs():
    ref = np.zeros((6, 5))
    ref[:, 2] = 1.0  # every reference probe changed at layer 2 only
    other = np.zeros((6, 5))
    profile = RecallProfile(pd.DataFrame(), per_probe=_per_probe("knockout top-100", {"m": ref, "o": other}))
    table = compare_sets(profile, reference="m", n_permutations=4000, seed=1)
    layers = table[table["scope"] == "layer"].set_index("layer")
    assert layers.loc[2, "diff"] == 1.0
    # exact permutation p: only the 2 of C(12, 6) = 924 labelings that split the ones off reach |diff| = 1
    assert layers.loc[2, "p_value"] == pytest.approx(2 / 924, abs=0.004)
    assert layers.loc[2, "p_adjusted"] < 0.01  # max-T over layers: the others never differ
    assert (layers.drop(index=2)["p_adjusted"] == 1.0).all()
    bands = table[table["scope"] == "band"]
    assert len(bands) == 3 and bands["correction"].eq("holm").all()
    # Holm over the three bands: the smallest p times 3, then monotone
    order = np.sort(bands["p_value"].to_numpy())
    assert np.sort(bands["p_adjusted"].to_numpy())[0] == pytest.approx(min(1.0, 3 * order[0]))


def test_paired_comparison_uses_the_pairs():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, size=(10, 1))  # large between-pair spread, a constant +1 within pairs
    ref, other = base + 1.0, base.copy()
    profile = RecallProfile(pd.DataFrame(), per_probe=_per_probe("tracing MLP (last)", {"m": ref, "o": other}))
    pairs = {f"m-{i}": f"o-{i}" for i in range(10)}
    paired = compare_sets(profile, reference="m", pairs={"o": pairs}, measures=["tracing MLP (last)"],
                          n_permutations=2000)
    unpaired = compare_sets(profile, reference="m", measures=["tracing MLP (last)"], n_permutations=2000)
    p_paired = paired[paired["scope"] == "layer"]["p_value"].iloc[0]
    p_unpaired = unpaired[unpaired["scope"] == "layer"]["p_value"].iloc[0]
    assert paired["paired"].all() and not unpaired["paired"].any()
    # every within-pair difference is +1: only the all-unswapped and all-swapped draws reach |mean diff| 1
    assert p_paired < 0.01 < p_unpaired
    assert paired[paired["scope"] == "layer"]["diff"].iloc[0] == pytest.approx(1.0)


def test_compare_sets_names_bad_sets():
    profile = RecallProfile(pd.DataFrame(), per_probe=_per_probe("DLA MLP share", {"m": np.ones((3, 2))},
                                                                  {"m": np.ones(3)}))
    with pytest.raises(InputError, match="reference set"):
        compare_sets(profile, reference="x")
    with pytest.raises(InputError, match="not in the profile"):
        compare_sets(profile, reference="m", versus=["y"])
    assert math.isclose(profile_from_per_probe(profile.per_probe)["value"].iloc[0], 1.0)


def test_attribution_patching_shares_are_summed_over_a_probes_pairs(tiny_model, probes):
    from idiom_lens.analyses.interventions.attribution_patching import attribution_patch_probes
    from idiom_lens.analyses.interventions.patching import PatchingOptions

    result = attribution_patch_probes(tiny_model, probes[:6],
                                      PatchingOptions(method="attribution", sites=("attn_out", "mlp_out")))
    kept = result.pairs[result.pairs["valid"] & (result.pairs["gap"] >= result.settings["min_gap"])]
    assert len(kept) >= 2 and (~result.pairs["valid"] | (result.pairs["gap"] < 0)).any()  # both kinds of pair
    sets = {"a": sorted(set(kept["probe_id"])), "b": [kept["probe_id"].iloc[0]]}
    profile = recall_profile(patching=result, sets=sets)
    per_probe = profile.per_probe
    # by hand, pair by pair
    for probe_id in sets["a"]:
        pairs = kept[kept["probe_id"] == probe_id]
        for layer in range(tiny_model.n_layers):
            for site, last, name in (("mlp_out", True, "MLP share (last)"),
                                     ("mlp_out", False, "MLP share (all positions)"),
                                     ("attn_out", True, "attention share (last)")):
                num = 0.0
                for _, pair in pairs.iterrows():
                    rows = result.rows
                    rows = rows[(rows["probe_id"] == probe_id) & (rows["variant"] == pair["variant"])
                                & (rows["site"] == site) & (rows["layer"] == layer)]
                    if last:
                        rows = rows[rows["pos_from_end"] == -1]
                    num += float((rows["patched_logit"] - pair["corrupted_logit"]).sum())
                row = per_probe[(per_probe["measure"] == f"attribution patching {name}") & (per_probe["group"] == "a")
                                & (per_probe["probe_id"] == probe_id) & (per_probe["layer"] == layer)]
                assert len(row) == 1
                assert row["num"].iloc[0] == pytest.approx(num, abs=1e-9)
                assert row["den"].iloc[0] == pytest.approx(float(pairs["gap"].sum()), abs=1e-9)
    assert set(per_probe.loc[per_probe["group"] == "b", "probe_id"]) == {sets["b"][0]}
    assert profile.settings["attribution_patching"]["n_pairs"] == len(kept) + 1  # the shared probe's pair, twice
