"""`idiom-lens attn-knockout` end to end on the tiny model (registered here: the command list is
patched, so the test does not depend on `idiom_lens.cli._COMMANDS` listing it)."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest

from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutResult
from idiom_lens.cli import attn_knockout_cmd, main

COMMANDS = ("attn_knockout",)  # registered by the `commands` fixture (tests/cli/conftest.py)


def test_register_adds_the_subcommand():
    parser = argparse.ArgumentParser()
    attn_knockout_cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["attn-knockout", "--dataset", "idioms", "--out", "x"])
    assert args.sources == ["context"] and args.windows == [5] and args.batch_size == 64 and args.sample is None
    args = parser.parse_args(["attn-knockout", "once in a blue moon", "--sources", "last_word", "bos",
                              "--windows", "3"])
    assert args.text == "once in a blue moon" and args.sources == ["last_word", "bos"] and args.windows == [3]
    args = parser.parse_args(["attn-knockout", "once in a blue moon", "--window", "4"])  # the old spelling
    assert args.windows == [4]


def test_dataset_mode_writes_result_summary_and_figure(commands, tiny_model_dir, probe_file, tmp_path, capsys):
    out = tmp_path / "attn"
    code = main(["attn-knockout", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--sample", "6",
                 "--sources", "context", "bos", "--windows", "2", "--no-png", "--out", str(out)])
    assert code == 0
    result = AttentionKnockoutResult.load(out)
    assert result.rows["probe_id"].nunique() == 6 and set(result.rows["source"]) == {"context", "bos"}
    assert result.settings["window"] == 2 and result.settings["sources"] == ["context", "bos"]
    frame = pd.read_parquet(out / "attention_knockout.parquet")
    assert {"probe_id", "kind", "group", "source", "layer", "window_first", "window_last", "n_blocked",
            "clean_pred_id", "clean_prob", "prob", "rel_change", "changed"} <= set(frame.columns)
    summary = pd.read_csv(out / "attention_knockout_summary.csv")
    assert {"group", "source", "layer", "n", "rel_change", "rel_change_low", "rel_change_high"} <= set(summary.columns)
    assert {"logp_change", "logp_change_low", "logp_change_median", "changed_low", "changed_high"} \
        <= set(summary.columns)
    assert "logp_change" in frame.columns
    matched = pd.read_csv(out / "attention_knockout_matched.csv")
    assert {"group", "n_pairs", "logp_change"} <= set(matched.columns)
    pairs = pd.read_csv(out / "attention_knockout_matched_pairs.csv")
    assert list(pairs.columns) == ["probe_id", "matched_id", "clean_prob", "matched_clean_prob", "log_ratio"]
    assert json.loads((out / "summary.json").read_text())["matching"]["n_pairs"] == len(pairs)
    assert (out / "attention_knockout_summary.parquet").exists()
    assert (out / "attention_knockout.html").exists() and (out / "attention_knockout.fig.json").exists()
    figure = json.loads((out / "attention_knockout.fig.json").read_text())
    assert len(figure["data"]) >= 2  # a band and a line per set and source
    printed = capsys.readouterr().out
    assert "6 probes" in printed and "strongest drop at layers" in printed and "log p " in printed


def test_text_mode_prints_per_layer_effect(commands, tiny_model_dir, tmp_path, capsys):
    code = main(["attn-knockout", "once in a zyxblue moon", "--model", str(tiny_model_dir),
                 "--sources", "context", "last_word", "--windows", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "context (3 positions blocked)" in printed and "last_word (" in printed
    assert printed.count("layer ") >= 6 and "p=" in printed and "log p " in printed and "relative " in printed
    out = tmp_path / "one"
    assert main(["attn-knockout", "break ice", "--model", str(tiny_model_dir), "--sources", "context", "last_word",
                 "--no-png", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to block" in printed  # one-word prompt, one-token word: reasons, not errors
    assert (out / "attention_knockout.result.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["attn-knockout"], "give either TEXT"),
    (["attn-knockout", "once in a blue moon", "--dataset", "idioms"], "give either TEXT"),
    (["attn-knockout", "--dataset", "idioms"], "--out DIR is required with --dataset"),
    (["attn-knockout", "moon"], "needs at least 2 words"),
    (["attn-knockout", "once in a blue moon", "--windows", "0"],
     "--windows must be a whole number of layers >= 1, got 0"),
    (["attn-knockout", "once in a blue moon", "--windows", "3", "5"], "--windows takes one window length"),
    (["attn-knockout", "once in a blue moon", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
])
def test_bad_input_exits_2(commands, argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_source_is_refused(commands, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["attn-knockout", "once in a blue moon", "--sources", "subject"])
    assert exc.value.code == 2 and "invalid choice: 'subject'" in capsys.readouterr().err
