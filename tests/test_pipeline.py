"""Resumable jobs: parts are written atomically and reused on a rerun."""

from __future__ import annotations

import numpy as np

import idiom_lens.pipeline as pipeline
from idiom_lens.pipeline import resumable_trajectory, write_trajectory_outputs
from idiom_lens.trajectory import layer_trajectory


def test_rerun_reuses_finished_parts(tiny_model, probes, tmp_path, monkeypatch):
    calls = []
    real = pipeline.layer_trajectory

    def counting(model, chunk, **kw):
        calls.append(len(chunk))
        return real(model, chunk, **kw)

    monkeypatch.setattr(pipeline, "layer_trajectory", counting)
    first = resumable_trajectory(tiny_model, probes, tmp_path, sites=["resid_post"], part_size=4,
                                 progress=False, log=lambda m: None)
    assert calls == [4, 4, 2]
    parts = sorted((tmp_path / "parts").iterdir())
    # interrupt: one part lost its completion marker
    (parts[1] / "trajectory_memorization.parquet").unlink()
    second = resumable_trajectory(tiny_model, probes, tmp_path, sites=["resid_post"], part_size=4,
                                  progress=False, log=lambda m: None)
    assert len(calls) == 4 and calls[3] in (2, 4)  # only the damaged part was recomputed
    np.testing.assert_array_equal(first.pred_rank, second.pred_rank)
    whole = layer_trajectory(tiny_model, probes, sites=["resid_post"])
    np.testing.assert_array_equal(whole.pred_rank, second.pred_rank)
    assert [r.probe_id for r in second.memorization.records] == [p.id for p in probes]


def test_outputs_written(tiny_model, probes, tmp_path):
    result = layer_trajectory(tiny_model, probes, sites=["resid_post"])
    outputs = write_trajectory_outputs(result, tmp_path, title="tiny", png=True)
    names = {p.name for p in outputs.files}
    assert {"trajectory.parquet", "summary.json", "summary.md", "trajectory.html", "trajectory.png",
            "promotion_layers.png", "phases_curves.parquet"} <= names
    assert (tmp_path / "trajectory.png").read_bytes()[:4] == b"\x89PNG"
    assert "Two phases" in (tmp_path / "summary.md").read_text()
