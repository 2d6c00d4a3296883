"""Cross-model comparison reads two models' run outputs and puts them on normalized depth."""

from __future__ import annotations

import json

import pytest

import idiom_lens.cli as cli
from idiom_lens.errors import InputError
from idiom_lens.plots.compare import depth_figure
from idiom_lens.study.compare import compare_models
from idiom_lens.study.layout import FORMAT


def test_two_architectures_compared(tmp_path, monkeypatch, tiny_model_dir, tiny_llama_dir):
    monkeypatch.setattr(cli, "_COMMANDS", ("run", "compare"))
    for model_dir in (tiny_model_dir, tiny_llama_dir):
        assert cli.main(["run", "--model", str(model_dir), "--limit", "3", "--attribution-sample", "1",
                         "--out", str(tmp_path), "--no-png"]) == 0
    comparison = compare_models(tmp_path)
    assert len(comparison.table) == 2
    assert set(comparison.table["n_layers"]) == {3}
    assert comparison.curves["depth"].max() == pytest.approx(1.0)  # float64: default approx
    assert comparison.curves["depth"].min() == pytest.approx(1 / 3)  # float64: default approx
    assert 0 <= comparison.table["memorized_idiom_all"].min() <= 1
    assert len(depth_figure(comparison).data) > 0
    assert cli.main(["compare", "--results", str(tmp_path), "--no-png"]) == 0
    assert (tmp_path / "comparison" / "comparison.md").is_file()


def test_empty_results_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no study.json"):
        compare_models(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"format": FORMAT}))
    with pytest.raises(InputError, match="no model with a finished trajectory"):
        compare_models(tmp_path)
    (tmp_path / "study.json").write_text('{"format": 1}')
    with pytest.raises(InputError, match="format 1"):
        compare_models(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        compare_models(tmp_path / "missing")
