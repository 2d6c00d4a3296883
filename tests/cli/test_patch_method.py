"""`idiom-lens patch --method attribution|both` end to end on the tiny model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from idiom_lens.analyses.interventions.patching import PatchingResult
from idiom_lens.cli import main

COMMANDS = ("patch",)  # registered by the `commands` fixture (tests/cli/conftest.py)


def test_attribution_writes_the_files_exact_patching_writes(commands, tiny_model_dir, probe_file, tmp_path):
    runs = {}
    for method in ("exact", "attribution"):
        out = tmp_path / method
        assert main(["patch", "--dataset", str(probe_file), "--limit", "6", "--model", str(tiny_model_dir),
                     "--method", method, "--no-png", "--out", str(out)]) == 0
        runs[method] = out
    names = {m: sorted(p.name for p in out.iterdir()) for m, out in runs.items()}
    assert names["attribution"] == names["exact"] and "patching.parquet" in names["exact"]
    approx = PatchingResult.load(runs["attribution"])
    assert approx.settings["method"] == "attribution"
    assert json.loads((runs["attribution"] / "summary.json").read_text())["method"] == "attribution"
    exact = PatchingResult.load(runs["exact"])
    assert approx.pairs["corrupted_prompt"].tolist() == exact.pairs["corrupted_prompt"].tolist()


def test_both_writes_each_result_and_their_agreement(commands, tiny_model_dir, probe_file, tmp_path, capsys):
    out = tmp_path / "both"
    assert main(["patch", "--dataset", str(probe_file), "--limit", "6", "--model", str(tiny_model_dir),
                 "--method", "both", "--no-png", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    exact, approx = PatchingResult.load(out), PatchingResult.load(out / "attribution")
    assert approx.settings["method"] == "attribution" and exact.settings.get("method", "exact") == "exact"
    assert exact.pairs[["probe_id", "variant"]].equals(approx.pairs[["probe_id", "variant"]])
    agreement = pd.read_parquet(out / "agreement.parquet")
    summary = pd.read_csv(out / "agreement_summary.csv")
    assert set(agreement["site"]) == {"resid_pre", "attn_out", "mlp_out", "all"}
    assert ({"correlation", "correlation_low", "correlation_high", "overlap", "pooled_correlation"}
            <= set(summary.columns))
    assert summary["correlation"].between(-1, 1).all()
    assert "attribution vs exact patching" in printed and "pooled_correlation" in printed
    assert "pairs patched (exact)" in printed and "pairs patched (attribution)" in printed


def test_text_with_attribution_and_both(commands, tiny_model_dir, tmp_path, capsys):
    """One sequence: the estimate prints the same report; with `both`, each method's report and the agreement."""
    code = main(["patch", "kill two birds with one stone", "--model", str(tiny_model_dir), "--variants", "word_swap",
                 "--method", "attribution"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "[word_swap] clean 'kill two birds with one' -> target 'stone'" in printed
    assert {line.split()[0] for line in printed.splitlines() if "most restoring:" in line} == {
        "resid_pre", "attn_out", "mlp_out"}

    out = tmp_path / "one"
    code = main(["patch", "kill two birds with one stone", "--model", str(tiny_model_dir), "--variants", "word_swap",
                 "--method", "both", "--no-png", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "== exact patching" in printed and "== attribution patching" in printed
    assert "attribution vs exact patching" in printed
    assert (out / "patching.parquet").exists() and (out / "attribution" / "patching.parquet").exists()
    assert (out / "agreement.parquet").exists() and (out / "agreement_summary.csv").exists()


def test_unknown_method_is_a_usage_error(commands, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["patch", "once in a blue moon", "--model", str(tiny_model_dir), "--method", "gradient"])
    assert stop.value.code == 2
    assert "--method" in capsys.readouterr().err
