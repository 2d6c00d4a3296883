"""Resumable jobs: parts are written atomically and reused on a rerun, only when intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import idiom_lens.study.stages.trajectory as stages
from idiom_lens.analyses.trajectory import layer_trajectory
from idiom_lens.study.run import sample_by_group
from idiom_lens.study.stages import resumable_trajectory, write_trajectory_outputs


def test_rerun_reuses_finished_parts(tiny_model, probes, tmp_path, monkeypatch):
    calls = []
    real = stages.layer_trajectory

    def counting(model, chunk, **kw):
        calls.append(len(chunk))
        return real(model, chunk, **kw)

    monkeypatch.setattr(stages, "layer_trajectory", counting)
    first = resumable_trajectory(tiny_model, probes, tmp_path, sites=["resid_post"], part_size=4,
                                 progress=False, log=lambda m: None)
    assert calls == [4, 4, 2]
    parts = sorted((tmp_path / ".parts").iterdir())
    # interrupt: one part lost one of its files (its marker no longer verifies)
    (parts[1] / "trajectory_memorization.parquet").unlink()
    second = resumable_trajectory(tiny_model, probes, tmp_path, sites=["resid_post"], part_size=4,
                                  progress=False, log=lambda m: None)
    assert len(calls) == 4 and calls[3] in (2, 4)  # only the damaged part was recomputed
    np.testing.assert_array_equal(first.pred_rank, second.pred_rank)
    whole = layer_trajectory(tiny_model, probes, sites=["resid_post"])
    np.testing.assert_array_equal(whole.pred_rank, second.pred_rank)
    assert [r.probe_id for r in second.memorization.records] == [p.id for p in probes]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, why", [
    ("trajectory.parquet", _truncate, "trajectory.parquet has"),
    ("trajectory_memorization.parquet", _flip_byte, "trajectory_memorization.parquet differs"),
    (".part.json", _truncate, "unreadable completion marker"),
    (".part.json", Path.unlink, "no completion marker"),  # killed after the files, before the marker
])
def test_damaged_part_is_recomputed(name, damage, why, tiny_model, probes, tmp_path, monkeypatch):
    """A part whose marker does not verify is recomputed, with one log line saying why."""
    calls = []
    real = stages.layer_trajectory

    def counting(model, chunk, **kw):
        calls.append([p.id for p in chunk])
        return real(model, chunk, **kw)

    monkeypatch.setattr(stages, "layer_trajectory", counting)
    kw = dict(sites=["resid_post"], part_size=4, progress=False)
    first = resumable_trajectory(tiny_model, probes, tmp_path, log=lambda m: None, **kw)
    sweep = stages.trajectory_sweep(tiny_model, sites=kw["sites"], lens=None, batch_size=16)
    damage(sweep.parts(tiny_model, probes[4:8], tmp_path / ".parts", size=4)[0].folder / name)
    logs: list[str] = []
    second = resumable_trajectory(tiny_model, probes, tmp_path, log=logs.append, **kw)
    assert calls[3:] == [[p.id for p in probes[4:8]]]  # only the damaged part
    assert [line for line in logs if "recomputing" in line] == [logs[1]] and why in logs[1]
    np.testing.assert_array_equal(first.pred_rank, second.pred_rank)
    assert first.memorization.to_dataframe().equals(second.memorization.to_dataframe())


def test_outputs_written(tiny_model, probes, tmp_path):
    result = layer_trajectory(tiny_model, probes, sites=["resid_post"])
    outputs = write_trajectory_outputs(result, tmp_path, title="tiny", png=True)
    names = {p.name for p in outputs.files}
    assert {"trajectory.parquet", "summary.json", "summary.md", "trajectory.html", "trajectory.png",
            "promotion_layers.png", "phases_curves.parquet"} <= names
    assert (tmp_path / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert "Two phases" in (tmp_path / "summary.md").read_text()


def test_completion_marker_verifies_settings_and_files(tmp_path):
    """A marker records size and sha256 of every (non-hidden) file and the settings it was written
    with; `check_marker` says why not to trust a folder, or None."""
    from idiom_lens.io import check_marker, write_json, write_marker

    key = {"model": {"spec": "tiny"}, "options": {"k": [10], "seed": 0}}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "table.parquet").write_bytes(b"0123456789")
    write_json(tmp_path / "summary.json", {"n": 1})
    marker = write_marker(tmp_path / ".stage.json", key)
    listed = json.loads(marker.read_text())["files"]
    assert sorted(listed) == ["sub/table.parquet", "summary.json"] and listed["sub/table.parquet"]["size"] == 10
    assert check_marker(marker, {"options": {"seed": 0, "k": (10,)}, "model": {"spec": "tiny"}}) is None
    assert check_marker(marker, key | {"options": {"k": [10], "seed": 1}}) == "settings changed (options.seed)"
    (tmp_path / "sub" / "table.parquet").write_bytes(b"0123456788")  # same size, other bytes
    assert "table.parquet differs" in check_marker(marker, key)
    marker.write_text(json.dumps({"key": "0123abcd"}))  # a marker of the previous format
    assert "has format None" in check_marker(marker, key)
    assert check_marker(tmp_path / "missing" / ".stage.json", key) == "no completion marker .stage.json"


def _record(probe_id: str, group: str):
    from idiom_lens.analyses.memorization import MemorizationRecord

    return MemorizationRecord(probe_id=probe_id, kind="idiom", group=group, hard_to_guess=None, prompt="a b",
                              target="c", target_id=0, target_token="c", n_target_tokens=1, pred_id=0,
                              pred_token="c", memorized=group == "memorized idioms", pred_prob=0.5,
                              target_rank=0, target_prob=0.5, full_target_match=True)


def test_sample_by_group_keeps_whole_sets_and_samples_the_others():
    from idiom_lens.analyses.memorization import MemorizationResult
    from idiom_lens.datasets.probes import Probe
    from idiom_lens.errors import InputError

    groups = ["memorized idioms"] * 7 + ["non-memorized idioms"] * 9
    probes = [Probe(id=f"p{i}", prompt="a b", target="c", kind="idiom") for i in range(len(groups))]
    memo = MemorizationResult(tuple(_record(p.id, g) for p, g in zip(probes, groups)), {})
    chosen = sample_by_group(memo, probes, per_group=3, seed=0, whole=["memorized idioms"])
    ids = [p.id for p in chosen]
    assert ids[:7] == [f"p{i}" for i in range(7)]  # every memorized idiom, in input order
    assert len(ids) == 10 and all(int(i[1:]) >= 7 for i in ids[7:])
    assert ids == [p.id for p in sample_by_group(memo, probes, per_group=3, seed=0,
                                                          whole=["memorized idioms"])]
    with pytest.raises(InputError, match="ordinary text"):
        sample_by_group(memo, probes, per_group=3, whole=["ordinary text"])
