"""Every result type saves and loads the same way (`idiom_lens.analyses.saved`): round trips on the
tiny models give back equal data and settings; bad folders fail with a clear `InputError`."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import numpy as np
import pandas as pd
import pytest
import torch

from idiom_lens.analyses.attribution import AttributionResult, attribute_probes
from idiom_lens.analyses.interventions import (
    CorruptionOptions,
    KnockoutGrid,
    KnockoutOptions,
    KnockoutResult,
    PatchingOptions,
    SkipOptions,
    SkipResult,
    knockout_grid,
    patch_probes,
    skip_layers,
    value_vector_ranks,
)
from idiom_lens.analyses.memorization import MemorizationResult, score_memorization
from idiom_lens.analyses.saved import decode_exact, descriptor_path, encode_exact
from idiom_lens.analyses.trajectory import layer_trajectory, load_trajectory, save_trajectory
from idiom_lens.errors import InputError

BANK = ("moon", "eye", "stone", "room", "cake", "ice", "mat", "book", "market", "history", "cat", "walked")


def _round_trip(result, tmp_path, **name):
    paths = result.save(tmp_path, **name)
    assert all(p.is_file() for p in paths)
    back = type(result).load(tmp_path, **name)
    assert type(back) is type(result)
    assert back.settings == result.settings and back.settings
    return back


# --------------------------------------------------------------------------------------
# Round trips, one per type
# --------------------------------------------------------------------------------------


def test_memorization_round_trip(tiny_model, probes, tmp_path):
    result = score_memorization(tiny_model, probes[:4])
    back = _round_trip(result, tmp_path)
    assert back.records == result.records
    pd.testing.assert_frame_equal(back.to_dataframe(), result.to_dataframe())
    assert (tmp_path / "memorization.parquet").is_file() and (tmp_path / "memorization.result.json").is_file()


def test_memorization_keeps_nested_settings_and_missing_flags(tiny_model, probes, tmp_path):
    """Tuples, nested dicts, None and floats come back equal; a None flag stays None."""
    result = score_memorization(tiny_model, probes[:2])
    records = (result.records[0],) + tuple(
        type(r)(**{f.name: getattr(r, f.name) for f in fields(r)} | {"hard_to_guess": None, "single_target": None})
        for r in result.records[1:]
    )
    settings = result.settings | {"grid": (1, (2, "x")), "nested": {"a": [1, (2.5,)], "b": None}, "empty": ()}
    custom = MemorizationResult(records=records, settings=settings)
    back = _round_trip(custom, tmp_path)
    assert back.records == records and back.records[1].single_target is None
    assert back.settings["grid"] == (1, (2, "x")) and back.settings["nested"]["a"][1] == (2.5,)


def test_trajectory_round_trip_and_wrappers(tiny_model, probes, tmp_path):
    result = layer_trajectory(tiny_model, probes[:4], batch_size=4)
    back = _round_trip(result, tmp_path)
    assert back.sites == result.sites and back.memorization.records == result.memorization.records
    assert back.memorization.settings == result.memorization.settings
    for metric in ("pred_rank", "pred_prob", "target_rank", "target_prob", "entropy", "top_id"):
        got, want = getattr(back, metric), getattr(result, metric)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # the old functions: same files, and the loaded result now carries its settings
    wrapped = tmp_path / "wrapped"
    names = {p.name for p in save_trajectory(result, wrapped, stem="part")}
    assert names == {"part.parquet", "part_memorization.parquet", "part.result.json"}
    assert load_trajectory(wrapped, stem="part").settings == result.settings
    assert load_trajectory(wrapped, stem="part", settings={"x": 1}).settings == {"x": 1}
    # a folder saved before descriptors existed still loads, with the settings given
    descriptor_path(wrapped, "part").unlink()
    legacy = load_trajectory(wrapped, stem="part", settings=result.settings)
    assert legacy.memorization.records == result.memorization.records and legacy.settings == result.settings
    np.testing.assert_array_equal(legacy.entropy, result.entropy)


def _assert_attribution_equal(back: AttributionResult, result: AttributionResult) -> None:
    assert len(back.probes) == len(result.probes)
    for b, r in zip(back.probes, result.probes):
        for f in fields(r):
            got, want = getattr(b, f.name), getattr(r, f.name)
            if isinstance(want, torch.Tensor):
                assert got.dtype == want.dtype and torch.equal(got, want), f.name
            else:
                assert got == want, f.name
    assert back.set_neurons == result.set_neurons and list(back.set_neurons) == list(result.set_neurons)
    assert list(back.neuron_means) == list(result.neuron_means)
    for group, mean in result.neuron_means.items():
        assert back.neuron_means[group].dtype == mean.dtype and torch.equal(back.neuron_means[group], mean)
    assert back.group_counts == result.group_counts and back.checks == result.checks
    pd.testing.assert_frame_equal(back.probes_dataframe(), result.probes_dataframe())
    pd.testing.assert_frame_equal(back.to_dataframe(), result.to_dataframe())
    pd.testing.assert_frame_equal(back.neurons_dataframe(), result.neurons_dataframe())


def test_attribution_round_trip(tiny_model_compat, probes, tmp_path):
    result = attribute_probes(tiny_model_compat, probes[:3], top_neurons=3, promoted_tokens=2)
    assert any(n.promoted for p in result.probes for n in p.top_neurons)
    _assert_attribution_equal(_round_trip(result, tmp_path), result)
    # a probe without a target (memorized, target and target_id None)
    from idiom_lens.analyses.attribution import attribute_probe

    single = attribute_probe(tiny_model_compat, "turn a blind", top_neurons=2, promoted_tokens=0)
    loose = AttributionResult(probes=(single,), set_neurons={}, neuron_means={}, group_counts={}, checks={},
                              settings={"note": "no target"})
    _assert_attribution_equal(_round_trip(loose, tmp_path, name="loose"), loose)


def test_knockouts_at_two_positions_share_a_folder(tiny_model, probes, tmp_path):
    grid = KnockoutGrid(ks=(1,), windows=(1,), modes=("zero_top",))
    results = {pos: knockout_grid(tiny_model, probes[:2],
                                  KnockoutOptions(grid=grid, controls=("random",), positions=pos))
               for pos in ("all", "last")}
    for pos, result in results.items():
        result.save(tmp_path, name=f"knockouts_{pos}")
    for pos, result in results.items():
        back = KnockoutResult.load(tmp_path, name=f"knockouts_{pos}")
        pd.testing.assert_frame_equal(back.rows, result.rows)
        pd.testing.assert_frame_equal(back.probes, result.probes)
        pd.testing.assert_frame_equal(back.summary(), result.summary())
        assert back.settings == result.settings
    assert (tmp_path / "knockouts_last_summary.parquet").is_file()
    joined = KnockoutResult.stack_runs(list(results.values()))
    back = _round_trip(joined, tmp_path / "joined")
    pd.testing.assert_frame_equal(back.rows, joined.rows)
    pd.testing.assert_frame_equal(back.probes, joined.probes)


def test_skipping_round_trip(tiny_model, probes, tmp_path):
    result = skip_layers(tiny_model, probes[:2], SkipOptions(windows=(1, 2)))
    back = _round_trip(result, tmp_path)
    pd.testing.assert_frame_equal(back.rows, result.rows)
    pd.testing.assert_frame_equal(back.probes, result.probes)
    pd.testing.assert_frame_equal(back.to_dataframe(), result.to_dataframe())
    assert {"skipping.parquet", "skipping_probes.parquet", "skipping_summary.parquet"} <= {
        p.name for p in tmp_path.iterdir()}


def test_patching_round_trip(tiny_model, probes, tmp_path):
    result = patch_probes(tiny_model, probes[:3],
                          PatchingOptions(corruption=CorruptionOptions(bank=BANK), sites=("resid_pre", "mlp_out")))
    assert len(result.rows) and len(result.pairs)
    back = _round_trip(result, tmp_path)
    pd.testing.assert_frame_equal(back.rows, result.rows)
    pd.testing.assert_frame_equal(back.pairs, result.pairs)
    pd.testing.assert_frame_equal(back.skipped, result.skipped)
    pd.testing.assert_frame_equal(back.to_dataframe(), result.to_dataframe())


def test_value_vector_ranks_round_trip(tiny_model, probes, tmp_path):
    result = value_vector_ranks(tiny_model, probes[:3], ks=(1, 3))
    back = _round_trip(result, tmp_path)
    assert (back.probe_ids, back.groups, back.pred_ids, back.ks) == (
        result.probe_ids, result.groups, result.pred_ids, result.ks)
    for name in ("ranks", "neurons"):
        got, want = getattr(back, name), getattr(result, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    pd.testing.assert_frame_equal(back.summary(), result.summary())


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_skip(tiny_model, probes) -> SkipResult:
    return skip_layers(tiny_model, probes[:1], SkipOptions(windows=(1,)))


def test_load_of_another_type_names_both(small_skip, tmp_path):
    small_skip.save(tmp_path, name="results")
    with pytest.raises(InputError, match="holds a SkipResult, expected a KnockoutResult"):
        KnockoutResult.load(tmp_path, name="results")


def test_load_of_missing_folder_or_descriptor(small_skip, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match=re.escape(f"SkipResult from {missing}: no such folder")):
        SkipResult.load(missing)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(InputError, match="it has no skipping.result.json"):
        SkipResult.load(tmp_path / "empty")
    small_skip.save(tmp_path, name="other")
    with pytest.raises(InputError, match="no skipping.result.json"):
        SkipResult.load(tmp_path)  # saved under another name


def test_load_of_another_format_version(small_skip, tmp_path):
    path = descriptor_path(tmp_path, "skipping")
    small_skip.save(tmp_path)
    data = json.loads(path.read_text())
    data["format_version"] = SkipResult.format_version + 1
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"format version {SkipResult.format_version + 1}.*expected version"):
        SkipResult.load(tmp_path)


def test_load_of_missing_table_or_broken_descriptor(small_skip, tmp_path):
    small_skip.save(tmp_path)
    (tmp_path / "skipping_probes.parquet").unlink()
    with pytest.raises(InputError, match="lacks skipping_probes.parquet"):
        SkipResult.load(tmp_path)
    descriptor_path(tmp_path, "skipping").write_text("{not json")
    with pytest.raises(InputError, match="not a readable result descriptor"):
        SkipResult.load(tmp_path)


def test_bad_names_and_unsavable_settings(small_skip, tmp_path):
    for name in ("", ".hidden", "a/b"):
        with pytest.raises(InputError, match="cannot name files"):
            small_skip.save(tmp_path, name=name)
    with pytest.raises(TypeError, match=r"settings\.when"):
        SkipResult(rows=small_skip.rows, probes=small_skip.probes, settings={"when": object()}).save(tmp_path)
    with pytest.raises(TypeError, match="key 1"):
        encode_exact({1: "a"})
    assert not list(tmp_path.iterdir())  # refused before writing anything
    value = {"t": (1, [2, (3,)]), "d": {"e": ()}, "f": np.float32(0.5), "i": np.int64(3)}
    assert decode_exact(json.loads(json.dumps(encode_exact(value)))) == value


# --------------------------------------------------------------------------------------
# Derived analyses, saved the same way
# --------------------------------------------------------------------------------------


def test_phases_and_lens_comparison_round_trip(tiny_model, probes, tmp_path):
    from idiom_lens.analyses.lens_comparison import LensComparison, compare_lenses
    from idiom_lens.analyses.phases import PhaseAnalysis, analyse_phases

    trajectory = layer_trajectory(tiny_model, probes, sites=["resid_post"])
    phases = analyse_phases(trajectory)
    phases.save(tmp_path / "phases")
    back = PhaseAnalysis.load(tmp_path / "phases")
    for f in fields(PhaseAnalysis):
        mine, theirs = getattr(phases, f.name), getattr(back, f.name)
        if isinstance(mine, pd.DataFrame) or isinstance(theirs, pd.DataFrame):
            pd.testing.assert_frame_equal(theirs, mine, check_dtype=False, check_column_type=False, obj=f.name)
        else:
            assert theirs == mine and type(theirs) is type(mine), f.name
    assert (tmp_path / "phases" / "phases_per_probe.parquet").is_file()

    comparison = compare_lenses({"logit": trajectory, "again": trajectory})
    comparison.save(tmp_path / "lenses")
    loaded = LensComparison.load(tmp_path / "lenses")
    for name in ("promotion", "tests", "boundaries"):
        pd.testing.assert_frame_equal(getattr(loaded, name), getattr(comparison, name), obj=name)
    assert loaded.heldout_kl is None and loaded.phases == {}


def test_recall_profile_round_trip(tmp_path):
    from idiom_lens.analyses.recall import RecallProfile

    frame = pd.DataFrame({"measure": ["knockout"] * 2, "group": ["memorized idioms"] * 2, "layer": [0, 1],
                          "value": [0.1, 0.3], "n": [4, 4], "value_low": [0.0, 0.1], "value_high": [0.2, 0.5]})
    profile = RecallProfile(frame=frame, settings={"knockouts": {"k": 100}})
    back = _round_trip(profile, tmp_path)
    pd.testing.assert_frame_equal(back.frame, frame)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "recall_peaks.parquet"), profile.peaks())


def test_parts_of_one_run_join_and_others_refuse(tiny_model, probes):
    whole = skip_layers(tiny_model, probes[:4], SkipOptions(windows=(1,)))
    parts = [skip_layers(tiny_model, probes[i : i + 2], SkipOptions(windows=(1,))) for i in (0, 2)]
    joined = SkipResult.join_parts(parts)
    pd.testing.assert_frame_equal(joined.rows, whole.rows)
    pd.testing.assert_frame_equal(joined.probes, whole.probes)
    assert {k: v for k, v in joined.settings.items() if k != "seconds"} == {
        k: v for k, v in whole.settings.items() if k != "seconds"}
    other = skip_layers(tiny_model, probes[2:4], SkipOptions(windows=(1, 2)))
    with pytest.raises(InputError, match=r"different settings \(.*windows"):
        SkipResult.join_parts([parts[0], other])
