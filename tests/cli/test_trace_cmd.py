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


def test_trace_key_positions_with_a_noise_design_write_the_restored_share(commands, tiny_model_dir, probe_file,
                                                                           tmp_path, capsys):
    out = tmp_path / "key"
    assert main(["trace", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--sample", "1",
                 "--noise-samples", "2", "--windows", "2", "--sites", "mlp", "--positions", "key",
                 "--noise-design", "all_but_last_two", "--min-total-effect", "0.01", "--no-png",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "share" in printed and "total effect >= 0.01" in printed
    result = TracingResult.load(out)
    assert set(result.rows["position"]) <= {"last noised", "last"}
    assert result.settings["noise_design"] == "all_but_last_two"
    assert result.settings["restored_positions"] == "the last noised token and the last token"
    share = pd.read_parquet(out / "tracing_share.parquet")
    assert {"share", "share_low", "share_high", "n", "n_dropped"} <= set(share.columns)
    assert (share["min_total_effect"] == 0.01).all()
    per_group = result.probes.groupby("group").size()
    assert (share["n"] + share["n_dropped"] == share["group"].map(per_group)).all()  # every probe, kept or dropped
    assert json.loads((out / "summary.json").read_text())["share_min_total_effect"] == 0.01
    assert list(out.glob("tracing_share_last*.fig.json"))


def test_trace_noise_effects_of_a_set_write_results_and_resume(commands, tiny_model_dir, probe_file, tmp_path,
                                                                capsys):
    out = tmp_path / "noise"
    argv = ["trace", "--noise-effects", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--sample", "1",
            "--noise-samples", "2", "--part-size", "2", "--no-png", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "most necessary word" in printed and "all_but_last_two" in printed
    rows = pd.read_parquet(out / "noise_effects.parquet")
    assert set(rows["design"]) == {"all_but_last", "all_but_last_two", "each_word"}
    summary = pd.read_parquet(out / "noise_effects_summary.parquet")
    assert {"total_effect", "total_effect_low", "total_effect_high", "total_effect_median"} <= set(summary.columns)
    assert (out / "noise_effects.fig.json").is_file() and not (out / "tracing.parquet").exists()
    assert main(argv) == 0  # a second run reuses the parts
    assert "reusing" in capsys.readouterr().out


def test_trace_noise_effects_of_one_sequence_print_each_word(commands, tiny_model_dir, capsys):
    assert main(["trace", "once in a blue moon", "--noise-effects", "--model", str(tiny_model_dir),
                 "--noise-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "all_but_last_two" in out and "word -1 ('blue')" in out and "word -4 ('once')" in out


@pytest.mark.parametrize("extra, message", [
    (["--noise-design", "all_but_last_two", "--noise-words", "0", "2"], "give --noise-words or --noise-design"),
    (["--noise-effects", "--noise-design", "all_but_last_two"], "--noise-effects measures every noise design"),
    (["--min-total-effect", "0"], "--min-total-effect must be > 0"),
])
def test_trace_noise_options_are_named(commands, tiny_model_dir, extra, message, capsys):
    assert main(["trace", "once in a blue moon", "--model", str(tiny_model_dir), *extra]) == 2
    assert message in capsys.readouterr().err
