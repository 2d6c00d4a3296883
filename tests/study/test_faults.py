"""Faults in `idiom-lens run`, on the tiny random model: a SIGKILL inside each stage, truncated or
altered result files, and changed settings. After each, a rerun must give exactly the results of
one uninterrupted run with the same settings, recomputing what it must and nothing else.

Kills go through the documented fault points of `idiom_lens.faults` (IDIOM_LENS_FAULT) in a
child process; reruns and the reference run go through `idiom_lens.cli.main` in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from folders import comparable, result_files  # tests/folders.py

import idiom_lens.cli as cli
import idiom_lens.study.run as study_run
from idiom_lens.faults import ENV
from idiom_lens.study.parts import NOT_IN_KEY, run_stage, stage_key
from idiom_lens.study.stages import run_attribution, run_knockouts, run_patching

# Under pytest-xdist (`make test`) on one worker: the reference run below is made once.
pytestmark = pytest.mark.xdist_group("faults")

# 9 probes (3 per set) in 3 trajectory parts of 4, 4 and 1; one probe per set in each stage.
OPTIONS = ["--limit", "3", "--part-size", "4", "--no-png", "--knockout-sample", "1",
           "--patching-sample", "1", "--attribution-sample", "1", "--tracing-sample", "1",
           "--attn-knockout-sample", "1"]
STAGES = ("interventions", "patching", "attribution", "tracing", "attention_knockout")

# Compared: the list of result files; every parquet file, every column, exact values (no column
# is dropped: none depends on the run); every JSON file (summary.json, *.fig.json) and summary.md.
# Left out because they differ between two uninterrupted runs:
# - `seconds` / `total_seconds` in summary.json: wall-clock timings;
# - the folders in `files` of attribution/summary.json: absolute paths, which hold the output
#   folder (a reused stage keeps the paths of the run that wrote it); the file names are compared;
# - *.html: plotly gives each figure div a random id (the same figure is in *.fig.json, compared);
# - hidden files (.stage.json, .part.json): markers hold the sha256 of summary.json, which holds
#   timings; they are checked by the reruns instead.


def run_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model_dir), "--out", str(out), *OPTIONS, *extra]


def run_here(args: list[str]) -> str:
    """`idiom-lens ARGS` in this process; its stdout (the run's log)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(args)
    log = buffer.getvalue()
    assert code == 0, log
    return log


def run_killed(args: list[str], point: str) -> str:
    """`idiom-lens ARGS` in a child process that SIGKILLs itself at fault `point`; its output."""
    env = os.environ | {ENV: point}
    proc = subprocess.run([sys.executable, "-m", "idiom_lens", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def computed_stages(log: str) -> set[str]:
    """Stages the run computed (not reused), from its log."""
    return set(re.findall(r"^\[run\] (\w+): \d+ probes$", log, flags=re.M))


def computed_parts(log: str) -> list[int]:
    return [int(i) for i in re.findall(r"^  trajectory part (\d+)/\d+: \d+ probes, ", log, flags=re.M)]


def _json(path: Path) -> Any:
    return comparable(json.loads(path.read_text(encoding="utf-8")))


def assert_same_results(out: Path, expected_out: Path, model_name: str) -> None:
    """Same result files; every parquet equal (rows, dtypes, exact values); JSON and Markdown
    equal once timings and the output folder are set aside."""
    got, want = out / model_name, expected_out / model_name
    names = result_files(want)
    assert result_files(got) == names, set(result_files(got)) ^ set(names)
    for name in names:
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(got / name), pd.read_parquet(want / name),
                                          check_exact=True, obj=name)
        elif name.endswith(".json"):
            assert _json(got / name) == _json(want / name), name
        elif name.endswith(".md"):
            assert (got / name).read_text() == (want / name).read_text(), name


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted run: the results every faulty run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_here(run_args(tiny_model_dir, out))
    return out


@pytest.fixture
def finished(reference, tmp_path) -> Path:
    """A copy of the reference run, to damage."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


# --------------------------------------------------------------------------------------
# 1. SIGKILL inside each stage
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("point, stage", [
    ("trajectory.part", None),                # part 1 of 3 finished, parts 2 and 3 not started
    ("knockouts.written", "interventions"),   # knockout tables written, no skipping yet
    ("skipping.written", "interventions"),    # skipping tables written, no final summary
    ("patching.written", "patching"),         # tables written, no summary
    ("attribution.written", "attribution"),   # tables written, no statistics or summary
    ("tracing.part", "tracing"),              # the first tracing part written, nothing joined yet
    ("stage.outputs", "interventions"),       # every output written, the marker not yet
])
def test_sigkill_then_rerun_equals_uninterrupted_run(point, stage, reference, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = run_args(tiny_model_dir, out)
    killed_log = run_killed(args, point)
    model_out = out / tiny_model_dir.name
    if stage is not None:  # killed inside the stage: it has outputs (or finished parts) but no marker
        finished_parts = list((model_out / stage / ".parts").glob("*/.part.json"))
        assert result_files(model_out / stage) or finished_parts
        assert not (model_out / stage / ".stage.json").exists()
    if point == "trajectory.part":
        assert len(list((model_out / "trajectory" / ".parts").glob("*/.part.json"))) == 1

    log = run_here(args)
    assert_same_results(out, reference, tiny_model_dir.name)
    if stage is not None:
        assert f"[run] {stage}: recomputing, no completion marker" in log
        finished_before = {s for s in STAGES if f"[run] {s}: " in killed_log and s != stage}
        assert computed_stages(log) & finished_before == set()  # finished stages are reused
    if point == "trajectory.part":
        assert "part 1/3: reusing" in log and computed_parts(log) == [2, 3]


# --------------------------------------------------------------------------------------
# 2. Truncated or altered files are never trusted
# --------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target, damage, stages, n_parts, why", [
    ("interventions/knockouts.parquet", _truncate, {"interventions"}, 0, "knockouts.parquet has"),
    ("interventions/skipping.parquet", _flip_byte, {"interventions"}, 0, "skipping.parquet differs"),
    ("patching/summary.json", _truncate, {"patching"}, 0, "summary.json has"),
    ("attribution/attribution_probes.parquet", Path.unlink, {"attribution"}, 0,
     "attribution_probes.parquet is missing"),
    ("attribution/.stage.json", _truncate, {"attribution"}, 0, "unreadable completion marker"),
    ("PART/trajectory.parquet", _truncate, set(), 1, "trajectory.parquet has"),
    ("PART/.part.json", _truncate, set(), 1, "unreadable completion marker"),
    ("trajectory/trajectory_memorization.parquet", _truncate, set(), 0, None),  # rewritten by every run
])
def test_damaged_file_is_recomputed(target, damage, stages, n_parts, why, finished, reference, tiny_model_dir):
    model_out = finished / tiny_model_dir.name
    if target.startswith("PART/"):  # in one of the trajectory parts
        part = sorted((model_out / "trajectory" / ".parts").iterdir())[0]
        path = part / target.removeprefix("PART/")
    else:
        path = model_out / target
    damage(path)
    log = run_here(run_args(tiny_model_dir, finished))
    assert computed_stages(log) == stages and len(computed_parts(log)) == n_parts, log
    reasons = [line for line in log.splitlines() if "recomputing" in line]
    if why is None:
        assert reasons == [], log
    else:  # one line, naming the file at fault
        assert len(reasons) == 1 and why in reasons[0] and str(path) in reasons[0], log
    assert_same_results(finished, reference, tiny_model_dir.name)


# --------------------------------------------------------------------------------------
# 3. Changed settings redo the stages that depend on them, and only those
# --------------------------------------------------------------------------------------


def test_stage_key_holds_every_option(tiny_model, tiny_model_compat, probes):
    """Each argument of each stage function, defaults included, is in its key, except the few
    that change neither numbers nor files (NOT_IN_KEY); so is the model, the probes, the stage."""
    import inspect

    for fn in (run_knockouts, run_patching, run_attribution):
        base = stage_key(fn, tiny_model, probes[:2], {})
        for name in list(inspect.signature(fn).parameters)[3:]:
            changed = stage_key(fn, tiny_model, probes[:2], {name: ("changed", name)})
            assert (changed == base) == (name in NOT_IN_KEY), (fn.__name__, name)
        assert stage_key(fn, tiny_model, probes[:3], {}) != base
        assert stage_key(fn, tiny_model_compat, probes[:2], {}) != base
    assert stage_key(run_knockouts, tiny_model, probes[:2], {}) != stage_key(run_patching, tiny_model, probes[:2], {})
    with pytest.raises(TypeError):
        stage_key(run_knockouts, tiny_model, probes[:2], {"no_such_option": 1})


def _knockouts(model_out: Path) -> pd.DataFrame:
    return pd.read_parquet(model_out / "interventions" / "knockouts.parquet")


def test_changed_settings_redo_dependent_stages_only(finished, tiny_model_dir, monkeypatch, tmp_path):
    """One setting changed at a time (cumulatively): exactly the dependent stages are redone and
    their results follow the new setting."""
    from idiom_lens.analyses.trajectory import load_trajectory
    from idiom_lens.datasets.selection import join_probe_sets
    from idiom_lens.study.run import sample_by_group

    model_out = finished / tiny_model_dir.name
    extra: list[str] = []

    def rerun(*more: str, model_dir: Path = tiny_model_dir) -> str:
        extra.extend(more)
        return run_here(run_args(model_dir, finished, *extra))

    def probe_ids(stage: str, table: str) -> set[str]:
        return set(pd.read_parquet(model_out / stage / table)["probe_id"])

    # batch size changes speed only: nothing redone
    log = rerun("--batch-size", "4")
    assert computed_stages(log) == set() and computed_parts(log) == []

    log = rerun("--knockout-sample", "2")
    assert computed_stages(log) == {"interventions"} and "settings changed (probes)" in log
    assert len(probe_ids("interventions", "knockouts_probes.parquet")) == 6

    log = rerun("--attribution-sample", "2")
    assert computed_stages(log) == {"attribution"}
    assert len(probe_ids("attribution", "attribution_probes.parquet")) == 6

    # the seed: knockout controls, patching corruptions and tracing noise always; attribution and
    # attention knockout through their samples
    memo = load_trajectory(model_out / "trajectory").memorization
    study = join_probe_sets(("idioms", "text", "facts"), limit=3).probes
    old = {p.id for p in sample_by_group(memo, study, per_group=2, seed=0)}
    new = {p.id for p in sample_by_group(memo, study, per_group=2, seed=1)}
    old1 = {p.id for p in sample_by_group(memo, study, per_group=1, seed=0)}
    new1 = {p.id for p in sample_by_group(memo, study, per_group=1, seed=1)}
    log = rerun("--seed", "1")
    assert computed_stages(log) == ({"interventions", "patching", "tracing"}
                                    | ({"attribution"} if old != new else set())
                                    | ({"attention_knockout"} if old1 != new1 else set()))
    assert json.loads((model_out / "interventions" / "summary.json").read_text())["knockouts"]["seed"] == 1
    assert json.loads((model_out / "patching" / "summary.json").read_text())["seed"] == 1
    assert probe_ids("attribution", "attribution_probes.parquet") == new

    # trajectory sites: every part redone; the stages read only memorization, which is unchanged
    log = rerun("--sites", "resid_post", "resid_mid")
    assert computed_parts(log) == [1, 2, 3] and computed_stages(log) == set()
    assert json.loads((model_out / "trajectory" / "summary.json").read_text())["sites"] == ["resid_post", "resid_mid"]

    # the stages' options in StudyOptions (k, windows, variants, top): their stage only
    real_run_study = study_run.run_study
    changes: dict[str, Any] = {}

    def with_changes(model: Any, out: Any, options: Any, **kw: Any) -> Any:
        return real_run_study(model, out, dataclasses.replace(options, **changes), **kw)

    monkeypatch.setattr(study_run, "run_study", with_changes)
    study = study_run.StudyOptions()
    changes["knockouts"] = dataclasses.replace(
        study.knockouts, grid=dataclasses.replace(study.knockouts.grid, ks=(10,)))
    log = rerun()
    assert computed_stages(log) == {"interventions"} and "options.options.grid.ks" in log
    ko = _knockouts(model_out)
    assert set(ko.loc[ko["control"] != "whole_mlp", "k"]) == {10}  # the whole-MLP ceiling has k = d_mlp

    changes["knockouts"] = dataclasses.replace(
        study.knockouts, grid=dataclasses.replace(study.knockouts.grid, ks=(10,), windows=(1, 2)))
    log = rerun()
    assert computed_stages(log) == {"interventions"}
    assert set(_knockouts(model_out)["window"]) == {1, 2}

    changes["patching"] = dataclasses.replace(
        study.patching, corruption=dataclasses.replace(study.patching.corruption, variants=("word_swap",)))
    log = rerun()
    assert computed_stages(log) == {"patching"}
    assert set(pd.read_parquet(model_out / "patching" / "patching_pairs.parquet")["variant"]) == {"word_swap"}

    changes["attribution_top_neurons"] = 3
    log = rerun()
    assert computed_stages(log) == {"attribution"}
    assert json.loads((model_out / "attribution" / "summary.json").read_text())["settings"]["top_neurons"] == 3
    neurons = pd.read_parquet(model_out / "attribution" / "attribution_neurons.parquet")
    assert neurons[neurons["scope"] == "set"].groupby("group").size().max() == 3

    # the model: another directory (same name, so the same output folder) redoes everything
    other = tmp_path / "elsewhere" / tiny_model_dir.name
    shutil.copytree(tiny_model_dir, other)
    log = rerun(model_dir=other)
    assert computed_parts(log) == [1, 2, 3] and computed_stages(log) == set(STAGES)
    for stage in STAGES:
        summary = json.loads((model_out / stage / "summary.json").read_text())
        settings = summary.get("settings", summary.get("knockouts", summary))
        assert settings["model_spec"] == str(other), stage

    # and a rerun with nothing changed reuses everything
    log = rerun(model_dir=other)
    assert computed_stages(log) == set() and computed_parts(log) == []


def test_error_inside_a_stage_leaves_it_unfinished(tiny_model, probes, tmp_path):
    """An exception inside a stage (e.g. a failed self-check): no marker, so the rerun redoes the
    stage, from an empty folder (nothing the failed attempt wrote survives)."""
    def stage(model, probes, out, *, fail: bool = True) -> str:
        out.mkdir(parents=True, exist_ok=True)
        if fail:
            (out / "partial.parquet").write_bytes(b"half")
            raise RuntimeError("self-check failed")
        (out / "result.parquet").write_bytes(b"whole")
        return "ran"

    stage_dir = tmp_path / "stage"
    with pytest.raises(RuntimeError):
        run_stage("demo", stage, tiny_model, probes[:2], stage_dir, {}, log=lambda m: None)
    assert (stage_dir / "partial.parquet").exists() and not (stage_dir / ".stage.json").exists()
    logs: list[str] = []
    assert run_stage("demo", stage, tiny_model, probes[:2], stage_dir, {"fail": False}, log=logs.append) == "ran"
    assert "recomputing, no completion marker" in logs[0]
    assert sorted(p.name for p in stage_dir.iterdir()) == [".stage.json", "result.parquet"]
    assert run_stage("demo", stage, tiny_model, probes[:2], stage_dir, {"fail": False}, log=logs.append) is None
    assert "already done" in logs[-1]
