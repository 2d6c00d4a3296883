"""CLI: models, predict, trajectory, run; user mistakes are one line and exit code 2."""

from __future__ import annotations

import json

import pytest

import idiom_lens.cli as cli


@pytest.fixture
def run_cli(monkeypatch):
    monkeypatch.setattr(cli, "_COMMANDS", ("models", "predict", "trajectory", "run"))
    return cli.main


def test_models_lists_specs(run_cli, capsys):
    assert run_cli(["models"]) == 0
    out = capsys.readouterr().out
    assert "gemma-3-270m" in out and "smollm2-135m" in out


def test_predict_on_a_local_model(run_cli, capsys, tiny_model_dir):
    assert run_cli(["predict", "once in a blue", "--model", str(tiny_model_dir), "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3


def test_user_errors_are_one_line_no_traceback(run_cli, capsys, tiny_model_dir):
    assert run_cli(["predict", "", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idiom-lens predict: error:") and "Traceback" not in err and len(err.splitlines()) == 1
    assert run_cli(["predict", "x", "--model", "./missing-dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_trajectory_command_writes_results(run_cli, tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "probes.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"i{i}", "text": t, "kind": "idiom"})
                              for i, t in enumerate(["once in a blue moon", "turn a blind eye", "break the ice"])))
    out = tmp_path / "out"
    assert run_cli(["trajectory", "--dataset", str(data), "--model", str(tiny_model_dir), "--out", str(out),
                    "--no-png"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_probes"] == 3 and summary["settings"]["numerics_mode"] == "raw"
    assert (out / "trajectory.html").is_file()
    assert run_cli(["trajectory", "--dataset", "no-such-set", "--model", str(tiny_model_dir), "--out", str(out)]) == 2


def test_run_limit_writes_study_and_resumes(run_cli, tmp_path, tiny_model_dir, capsys):
    args = ["run", "--model", str(tiny_model_dir), "--limit", "3", "--out", str(tmp_path), "--no-png",
            "--knockout-sample", "1", "--patching-sample", "1", "--attribution-sample", "1"]
    assert run_cli(args) == 0
    model_dir = tmp_path / tiny_model_dir.name
    summary = json.loads((model_dir / "trajectory" / "summary.json").read_text())
    assert summary["n_probes"] == 9  # 3 idioms + 3 text + 3 facts
    for stage in ("attribution", "interventions"):
        assert (model_dir / stage / "summary.json").is_file(), stage
    assert (tmp_path / "report.html").is_file()
    capsys.readouterr()
    assert run_cli(args) == 0  # a rerun reuses every finished stage
    out = capsys.readouterr().out
    assert "reusing" in out and "part 1/1: reusing" in out


@pytest.mark.embedded
def test_predict_once_in_a_blue_prints_moon(run_cli, capsys):
    assert run_cli(["predict", "once in a blue", "--top", "1"]) == 0
    assert capsys.readouterr().out == " moon\n"


def test_run_on_the_published_idiomem_file_keeps_its_flags(run_cli, tmp_path, tiny_model_dir, capsys):
    """`run --dataset idiomem.jsonl text`: the study runs on the authors' idioms, with their flags
    (their repeated id renamed, the shared-prompt pair out of hard_to_guess), beside our text."""
    from tests.datasets.test_loaders import PUBLISHED_IDIOMEM, SHARED_ID

    path = tmp_path / "idiomem.jsonl"
    path.write_text("\n".join(PUBLISHED_IDIOMEM) + "\n")
    args = ["run", "--model", str(tiny_model_dir), "--dataset", str(path), "text", "--limit", "4",
            "--out", str(tmp_path / "out"), "--no-png", "--knockout-sample", "0", "--patching-sample", "0",
            "--attribution-sample", "0"]
    with pytest.warns(UserWarning, match="renamed 1 repeated id"):
        assert run_cli(args) == 0
    model_dir = tmp_path / "out" / tiny_model_dir.name
    summary = json.loads((model_dir / "trajectory" / "summary.json").read_text())
    assert summary["n_probes"] == 8  # 4 idioms of the file + 4 text
    memo = {(r["kind"], r["subset"]): r for r in summary["memorization"]}
    assert memo[("idiom", "all")]["n"] == 4 and memo[("idiom", "all")]["n_not_single_target"] == 2
    assert memo[("idiom", "hard_to_guess")]["n"] == 2  # the authors mark all 4; the dead-as-a pair drops out
    import pandas as pd

    ids = set(pd.read_parquet(model_dir / "trajectory" / "trajectory_memorization.parquet")["probe_id"])
    assert {SHARED_ID, f"{SHARED_ID}-2"} <= ids
    with pytest.warns(UserWarning, match="renamed 1 repeated id"):
        assert run_cli(["run", "--model", str(tiny_model_dir), "--dataset", str(path), str(path),
                        "--out", str(tmp_path / "out2")]) == 2  # the same ids twice
    assert "unique ids" in capsys.readouterr().err
