"""`idiom-lens knockout` and `idiom-lens patch` end to end on the tiny model."""

from __future__ import annotations

import json

import pandas as pd

from idiom_lens.cli import main

COMMANDS = ("knockout", "patch")  # registered by the `commands` fixture (tests/cli/conftest.py)


def test_knockout_cmd_writes_results(commands, tiny_model_dir, probe_file, tmp_path, capsys):
    """Defaults: the authors' positions (every position), effective ranking, frozen norm (live
    before: the frozen norm is now the primary result), zero ablation, the random, matched and
    whole-MLP controls; tables with n, intervals and the output diagnostics per set, figures,
    value vectors."""
    out = tmp_path / "ko"
    code = main(["knockout", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--k", "1", "5",
                 "--windows", "1", "2", "--sample", "6", "--seed", "1", "--no-png", "--out", str(out)])
    assert code == 0
    frame = pd.read_parquet(out / "knockouts.parquet")
    assert frame["probe_id"].nunique() == 6 and set(frame.loc[frame["control"] != "whole_mlp", "k"]) == {1, 5, 100}
    assert set(frame["control"]) == {"targeted", "random", "matched", "whole_mlp"}
    assert set(frame["positions"]) == {"all"} and set(frame["rank_by"]) == {"effective"}
    assert set(frame["norm"]) == {"frozen"} and set(frame["ablation"]) == {"zero"}
    summary_table = pd.read_parquet(out / "knockouts_summary.parquet")
    assert {"n", "changed", "changed_low", "changed_high", "score_ratio", "zeroed_share"} <= set(summary_table.columns)
    layers = pd.read_parquet(out / "knockout_layers.parquet")
    assert set(layers["control"]) == {"targeted", "random", "matched", "whole_mlp"} and (layers["n"] > 0).all()
    assert {"norm", "ablation", "rank_by", "n_zeroed", "removed_norm", "out_cosine", "out_norm_ratio",
            "matched_norm_ratio"} <= set(layers.columns)
    assert (out / "skipping.parquet").exists() and (out / "skip_curves.html").exists()
    assert (out / "knockout_zero_top_k5.html").exists() and (out / "knockout_layers_k5.html").exists()
    assert set(pd.read_parquet(out / "value_vectors.parquet")["k"]) == {1, 10}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_probes"] == 6 and "total_seconds" in summary
    settings = summary["knockouts"]
    assert settings["positions"] == "all" and settings["controls"] == ["random", "matched", "whole_mlp"]
    assert settings["n_masked_tokens"] == 3 and settings["post_norm"] == "ln2_post"
    assert "ms per configuration" in capsys.readouterr().out


def test_knockout_cmd_variants(commands, tiny_model_dir, probe_file, tmp_path):
    """--full-grid (the paper's), --positions last with --compare-positions, --norm live,
    --ablation mean, --rank-by magnitude, --controls, recorded in the rows and the settings."""
    out = tmp_path / "paper"
    assert main(["knockout", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--full-grid",
                 "--limit", "2", "--controls", "none", "--value-vector-k", "--no-skip", "--no-png",
                 "--out", str(out)]) == 0
    frame = pd.read_parquet(out / "knockouts.parquet")
    assert set(frame.loc[frame["mode"] == "zero_top", "k"]) == {1, 10, 100, 1000}
    assert set(frame.loc[frame["mode"] == "keep_top", "k"]) == {10, 100, 1000}
    assert set(frame["control"]) == {"targeted"} and not (out / "value_vectors.parquet").exists()
    assert json.loads((out / "summary.json").read_text())["knockouts"]["grid"] == "paper"

    out = tmp_path / "ours"
    assert main(["knockout", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--k", "5",
                 "--windows", "1", "--modes", "zero_top", "--limit", "3", "--positions", "last",
                 "--compare-positions", "--norm", "live", "--ablation", "mean", "--rank-by", "magnitude",
                 "--controls", "matched", "matched_score", "--no-skip", "--no-png", "--out", str(out)]) == 0
    last, every = pd.read_parquet(out / "knockouts.parquet"), pd.read_parquet(out / "knockouts_all.parquet")
    assert set(last["positions"]) == {"last"} and set(every["positions"]) == {"all"}
    assert set(last["norm"]) == {"live"} and set(last["rank_by"]) == {"magnitude"} and set(last["ablation"]) == {"mean"}
    assert set(last["control"]) == {"targeted", "matched", "matched_score"}
    settings = json.loads((out / "summary.json").read_text())["knockouts"]
    assert settings["mean_reference"]["reference"] == "text" and "the authors'" in settings["rank_by_note"]
    assert any(p.name.startswith("knockout_positions_") and p.suffix == ".html" for p in out.iterdir())


def test_old_window_spellings_are_ranges_and_say_so(capsys):
    """`--max-window N` (deprecated) is `--windows 1 .. N`; `--keep-top-max-window` likewise."""
    from idiom_lens.cli import build_parser
    from idiom_lens.cli.knockout_cmd import knockout_options

    args = build_parser().parse_args(["knockout", "--dataset", "idioms", "--out", "x", "--max-window", "3",
                                      "--keep-top-max-window", "2"])
    grid = knockout_options(args).grid
    assert grid.windows == (1, 2, 3) and grid.keep_top_windows == (1, 2) and grid.ks == (1, 10, 100, 1000)
    err = capsys.readouterr().err.splitlines()
    assert err == ["idiom-lens: --max-window is deprecated; use --windows (the old spelling goes in 0.2)",
                   "idiom-lens: --keep-top-max-window is deprecated; use --keep-top-windows (the old spelling goes "
                   "in 0.2)"]


def test_knockout_cmd_rejects_bad_input(commands, tiny_model_dir, probe_file, tmp_path, capsys):
    code = main(["knockout", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--windows", "9",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "window lengths must be in 1..3, got [9]" in capsys.readouterr().err
    code = main(["knockout", "--dataset", str(probe_file), "--model", str(tiny_model_dir), "--full-grid", "--k", "5",
                 "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert code == 2 and "--full-grid" in err and "--k" in err


def test_patch_cmd_dataset_and_text(commands, tiny_model_dir, probe_file, tmp_path, capsys):
    """A dataset run writes its tables; one idiom with a word_swap that fits is patched (exit 0).

    The default word bank holds single-token words ("the") that the tiny tokenizer keeps at the
    prompt's token length, so the text run must succeed and print the pair and each site's most
    restoring cells; an exit 2 or a missing line means the command lost the one-sequence path.
    """
    out = tmp_path / "patch"
    code = main(["patch", "--dataset", str(probe_file), "--limit", "4", "--model", str(tiny_model_dir),
                 "--no-png", "--out", str(out)])
    assert code == 0
    assert (out / "patching.parquet").exists() and (out / "summary.json").exists()
    capsys.readouterr()

    code = main(["patch", "kill two birds with one stone", "--model", str(tiny_model_dir), "--variants", "word_swap"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "error" not in captured.err
    lines = captured.out.splitlines()
    pair_head = "[word_swap] clean 'kill two birds with one' -> target 'stone'"
    pair_lines = [line for line in lines if line.startswith(pair_head)]
    assert len(pair_lines) == 1, captured.out
    assert not any(line.startswith("skipped") for line in lines)
    site_lines = {line.split()[0]: line for line in lines if "most restoring:" in line}
    assert set(site_lines) == {"resid_pre", "attn_out", "mlp_out"}
    # Seeded swap: "kill" (position 1, after BOS) -> "the", a one-token change, so patching the clean
    # residual stream into layer 0 at that position makes the corrupted run the clean one (1.00).
    assert "corrupted 'the two birds with one'" in pair_lines[0]
    assert site_lines["resid_pre"].split("most restoring: ")[1].startswith("layer 0 pos 1 'kill': 1.00")


def test_patch_cmd_text_that_cannot_be_corrupted(commands, tiny_model_dir, capsys):
    """A 2-word prompt cannot keep its last 2 words and change one: say why, then exit 2.

    Exit 0 here would mean an empty patching result is reported as success; a missing "skipped"
    line would hide the reason.
    """
    code = main(["patch", "break the ice", "--model", str(tiny_model_dir), "--variants", "prefix_swap"])
    captured = capsys.readouterr()
    assert code == 2
    assert "skipped text (prefix_swap): prompt has 2 words, needs more than 2" in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "idiom-lens patch: error: no probe could be corrupted at the same token length; nothing to patch"
    )


def test_patch_cmd_needs_text_or_dataset(commands, tiny_model_dir, probe_file, capsys):
    """Neither TEXT nor --dataset, or both, is a usage error (exit 2, one line), not a crash or a no-op."""
    assert main(["patch", "--model", str(tiny_model_dir)]) == 2
    assert "give either TEXT (one sequence) or --dataset NAME|PATH, not both or neither" in capsys.readouterr().err
    assert main(["patch", "once in a blue moon", "--dataset", str(probe_file), "--model", str(tiny_model_dir)]) == 2
    assert "not both or neither" in capsys.readouterr().err
    assert main(["patch", "--dataset", str(probe_file), "--model", str(tiny_model_dir)]) == 2
    assert "--out DIR is required with --dataset" in capsys.readouterr().err
