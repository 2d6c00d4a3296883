"""`idiom-lens trace` end to end on the tiny model: a set in resumable parts, one sequence, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from idiom_lens.analyses.interventions.tracing import TracingResult
from idiom_lens.cli import main

COMMANDS = ("trace",)  # registered by the `commands` fixture (tests/cli/conftest.py)


def test_trace_set_writes_results_and_resumes(commands, tiny_model_dir, probe_file, tmp_path, capsys):
    out = tmp_path / "tr"
    argv = ["trace", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--sample", "3",
            "--noise-samples", "2", "--windows", "1", "2", "--part-size", "2", "--no-png", "--out", str(out)]
    assert main(argv) == 0
    first = capsys.readouterr().out
    rows = pd.read_parquet(out / "tracing.parquet")
    assert rows["probe_id"].nunique() == 3
    assert set(zip(rows["site"], rows["window"])) == {("resid", 1), ("mlp", 1), ("mlp", 2), ("attn", 1), ("attn", 2)}
    summary = pd.read_parquet(out / "tracing_summary.parquet")
    assert {"aie", "aie_low", "aie_high", "n"} <= set(summary.columns)
    assert list(out.glob("tracing_curves_last*.fig.json")) and list(out.glob("tracing_*idioms*.fig.json"))
    settings = json.loads((out / "summary.json").read_text())
    assert settings["samples"] == 2 and settings["noise_sigma"] > 0 and settings["n_probes"] == 3
    assert len(list((out / ".parts").iterdir())) == 2 and "memorized" in first
    # a second run reuses both parts and writes the same rows
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    assert TracingResult.load(out).rows.equals(rows.drop(columns=["kind", "group"]))


def test_trace_one_sequence_prints_the_largest_effects(commands, tiny_model_dir, capsys):
    assert main(["trace", "the cat sat on the mat", "--model", str(tiny_model_dir), "--noise-samples", "2",
                 "--windows", "2"]) == 0
    out = capsys.readouterr().out
    assert "largest indirect effect" in out and "mlp (window 2)" in out and "resid" in out


@pytest.mark.parametrize("extra, message", [
    (["--noise-samples", "0"], "--noise-samples must be >= 1"),
    (["--samples", "0"], "--noise-samples must be >= 1"),  # the old spelling, still understood
    (["--windows", "0"], "--windows"),
    (["--noise-multiplier", "-1"], "--noise-multiplier"),
])
def test_trace_bad_options_are_named(commands, tiny_model_dir, extra, message, capsys):
    assert main(["trace", "the cat sat on the mat", "--model", str(tiny_model_dir), *extra]) == 2
    assert message in capsys.readouterr().err
