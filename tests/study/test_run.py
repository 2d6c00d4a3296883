"""`run_study` from Python and `idiom-lens run` write the same folder; options and folders are checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_faults import assert_same_results, run_args, run_here  # the fault tests' comparison of two runs

from idiom_lens.errors import InputError
from idiom_lens.study import StudyFolder, StudyOptions, run_study
from idiom_lens.study.layout import FORMAT, STUDY_FILE

OPTIONS = StudyOptions(limit=3, part_size=4, png=False, knockout_sample=1, patching_sample=1, attribution_sample=1,
                       tracing_sample=1, attn_knockout_sample=1)


def test_python_and_cli_write_the_same_folder(tiny_model_dir, tmp_path):
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    run_here(run_args(tiny_model_dir, cli_out))
    study = run_study(str(tiny_model_dir), py_out, OPTIONS, log=lambda line: None)
    (model,) = study.models()
    assert [s.name for s in model.stages()] == ["trajectory", "recall", "attribution", "interventions", "tracing",
                                                "attention_knockout", "patching"]
    assert_same_results(py_out, cli_out, model.name)
    for out in (cli_out, py_out):
        assert json.loads((out / STUDY_FILE).read_text())["format"] == FORMAT
        assert (out / "report.html").is_file()
    # read back through the layout: typed results with their settings
    assert len(model.trajectory().memorization) == 9
    assert model.trajectory().settings["model_spec"] == str(tiny_model_dir)
    assert set(model.knockouts().probes["probe_id"]) <= {r.probe_id for r in model.memorization().records}
    assert set(model.tracing().probes["group"]) <= {"memorized idioms", "non-memorized idioms"}
    assert len(model.attention_knockout().probes) >= 2
    # the recall figure's table is what the stages hold, read back through the layout
    profile = model.recall_profile().to_dataframe()
    from idiom_lens.analyses.recall import MEASURES, PRIMARY

    # every primary measure; the live-norm knockouts are not in the study (its knockouts are frozen only)
    assert set(PRIMARY) <= set(profile["measure"]) <= set(MEASURES)
    assert not any(m.endswith("(live norm)") for m in profile["measure"])
    import pandas as pd
    pd.testing.assert_frame_equal(pd.read_parquet(model.stage_path("recall") / "recall_profile.parquet"), profile)


def test_options_are_validated():
    with pytest.raises(InputError, match="limit must be >= 1"):
        StudyOptions(limit=0)
    with pytest.raises(InputError, match="knockout_sample must be >= 0"):
        StudyOptions(knockout_sample=-1)
    with pytest.raises(InputError, match="datasets must be a non-empty sequence"):
        StudyOptions(datasets="idioms")
    with pytest.raises(InputError, match="batch_size must be >= 1"):
        StudyOptions(batch_size=0)


def test_a_folder_of_an_earlier_version_is_refused_with_the_fix(tiny_model_dir, tmp_path):
    old = tmp_path / "old"
    (old / "gemma-3-270m" / "trajectory").mkdir(parents=True)  # the layout before study.json existed
    with pytest.raises(InputError, match="earlier idiom_lens.*idiom-lens run --out"):
        run_study(str(tiny_model_dir), old, OPTIONS, log=lambda line: None)
    with pytest.raises(InputError, match="no study.json"):
        StudyFolder.open(old)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / STUDY_FILE).write_text(json.dumps({"format": FORMAT + 1}))
    with pytest.raises(InputError, match=f"format {FORMAT + 1}"):
        run_study(str(tiny_model_dir), newer, OPTIONS, log=lambda line: None)


def test_a_missing_stage_names_the_fix(tmp_path):
    study = StudyFolder.create(tmp_path / "s")
    with pytest.raises(InputError, match="no finished trajectory stage"):
        study.model("m").trajectory()
    assert isinstance(study.root, Path) and study.models() == []


def test_the_lenses_stage_compares_the_phases_under_each_lens(tiny_model_dir, tmp_path, monkeypatch):
    """`run --lens tuned jacobian`: lenses trained into the cache (never on a probe), the trajectory
    under each, the identity lens equal to the trajectory stage, and the report showing it."""
    import numpy as np

    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    options = StudyOptions(limit=3, part_size=4, png=False, knockout_sample=0, patching_sample=0,
                           attribution_sample=0, tracing_sample=0, attn_knockout_sample=0,
                           lenses=("tuned", "jacobian"))
    study = run_study(str(tiny_model_dir), tmp_path / "out", options, log=lambda line: None)
    (model,) = study.models()
    assert [s.name for s in model.stages()] == ["trajectory", "lenses"]
    stage = model.stage("lenses")
    assert set(stage.summary["lenses"]) == {"logit", "tuned", "jacobian"}
    assert {r["lens"] for r in stage.summary["boundaries"]} == {"logit", "tuned", "jacobian"}
    kl = stage.table("lens_heldout_kl")
    assert set(kl["lens"]) == {"logit", "tuned", "jacobian"}
    logit, plain = model.lens_trajectory("logit"), model.trajectory()
    np.testing.assert_array_equal(logit.pred_rank[:, 0], plain.pred_rank[:, plain.site("resid_post")])
    assert model.lens_trajectory("tuned").lens["kind"] == "tuned"
    assert (model.stage_path("lenses") / "lens_trajectories.html").is_file()
    assert "lens_trajectories" in (study.root / "report.html").read_text()
    assert len(list((tmp_path / "cache" / "lenses").rglob("*.pt"))) == 2
    # a rerun reuses everything
    lines: list[str] = []
    run_study(str(tiny_model_dir), tmp_path / "out", options, log=lines.append)
    assert any("lenses: already done" in line for line in lines)
    with pytest.raises(InputError, match="lenses \\['sharp'\\] are unknown"):
        StudyOptions(lenses=("sharp",))


def test_the_whole_study_runs_on_gpt2(tiny_gpt2_dir, tmp_path):
    """`idiom-lens run --model DIR` on a GPT-2 directory (the paper's model family: learned positions,
    LayerNorm, GELU MLP, tied embeddings) runs every stage; no BOS is prepended, as the authors ran
    GPT-2, and every result records it."""
    out = tmp_path / "gpt2"
    run_here(run_args(tiny_gpt2_dir, out))
    study = StudyFolder(out)
    (model,) = study.models()
    assert [s.name for s in model.stages()] == ["trajectory", "recall", "attribution", "interventions", "tracing",
                                                "attention_knockout", "patching"]
    for result in (model.trajectory(), model.knockouts(), model.tracing()):
        assert result.settings["prepend_bos"] is False
    assert (out / "report.html").is_file()


def test_the_study_runs_on_bert_and_says_what_it_did_not_run(tiny_bert_dir, tmp_path):
    """`idiom-lens run --model DIR` on a BERT masked LM runs the trajectory (memorization at the
    mask, the logit lens through the MLM head), the interventions (knockouts, layer skipping),
    activation patching, direct logit attribution (norms frozen) and causal tracing, and names
    every other stage with the reason it did not run, in the log and in not_run.json."""
    from idiom_lens.study.run import MASKED_LM_REASONS

    out = tmp_path / "bert"
    log = run_here(run_args(tiny_bert_dir, out))
    study = StudyFolder(out)
    (model,) = study.models()
    assert [s.name for s in model.stages()] == ["trajectory", "recall", "attribution", "interventions", "tracing",
                                                "patching"]
    assert model.knockouts().settings["objective"] == "masked"
    trajectory = model.trajectory()
    assert trajectory.settings["objective"] == "masked"
    assert len(trajectory.memorization.records) > 0
    not_run = json.loads((model.path / "not_run.json").read_text())
    assert not_run["objective"] == "masked"
    assert set(not_run["stages"]) == {"attention_knockout"}
    assert model.attribution().settings["position"] == "the mask"
    for stage, reason in not_run["stages"].items():
        assert reason == MASKED_LM_REASONS[stage]
        assert f"[run] {stage}: not run on a masked LM: {reason}" in log
    assert (out / "report.html").is_file()
