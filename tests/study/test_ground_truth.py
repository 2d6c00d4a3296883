"""The ground-truth benchmark end to end on the tiny Gemma 3: implant into layer 1, run the
localizers, score; the whole-MLP knockout must find the implanted layer."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from idiom_lens.errors import InputError
from idiom_lens.lenses.cache import obtain_lens
from idiom_lens.lenses.settings import LensSettings
from idiom_lens.models.loading import load_model
from idiom_lens.study.ground_truth import (
    IMPLANTED,
    NO_IMPLANT,
    GroundTruthOptions,
    default_layers,
    run_ground_truth,
    score_ground_truth,
)
from idiom_lens.study.localizers import LocalizerOptions

FAST = {"lr": 0.03, "max_epochs": 150, "stop_loss": 0.5, "batch_size": 10}  # converge on the tiny model


def test_default_layers_scale_with_depth():
    assert default_layers(18) == (2, 8, 14)
    assert default_layers(30) == (3, 13, 23)
    assert default_layers(3) == (0, 1, 2)


def test_options_are_checked():
    with pytest.raises(InputError, match="mode"):
        GroundTruthOptions(mode="everything")
    with pytest.raises(InputError, match="n_scored"):
        GroundTruthOptions(n_scored=0)
    with pytest.raises(InputError, match="seeds"):
        GroundTruthOptions(seeds=())
    with pytest.raises(InputError, match="implant options"):
        GroundTruthOptions(implant={"learning_rate": 1.0})
    with pytest.raises(InputError, match="nothing to score in mode 'layer'"):
        GroundTruthOptions(layer_localizers=False)


@pytest.fixture(scope="module")
def tuned(strong_mlp_dir, tmp_path_factory):
    """A tuned lens of the base model, trained in seconds (the benchmark's default trains a real one)."""
    base = load_model(str(strong_mlp_dir), progress=False)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path_factory.mktemp("lens-cache")))
        return obtain_lens(base, "tuned", settings=LensSettings(corpus="samples", n_samples=16, train_tokens=64,
                                                                heldout_tokens=40, steps=3, batch_tokens=8),
                           prompts=[], train=True, progress=False, log=lambda line: None)


@pytest.fixture(scope="module")
def benchmark(strong_mlp_dir, probes, tmp_path_factory, tuned):
    root = tmp_path_factory.mktemp("ground-truth")
    probe_file = root / "implanted.jsonl"
    probe_file.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": "idiom"})
                                  + "\n" for p in probes))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(root / "cache"))
    options = GroundTruthOptions(
        layers=(1,), seeds=(0,), dataset=str(probe_file), n_scored=4, n_control=2, implant=FAST,
        localizers=LocalizerOptions(norms=("frozen",), knockout_controls=("whole_mlp",), window=1, noise_samples=2,
                                    noise_effects=False, lenses=("logit", "tuned")))
    table = run_ground_truth(str(strong_mlp_dir), root / "ground_truth", options, png=False, tuned_lens=tuned,
                             log=lambda line: None)
    yield root / "ground_truth", table, options
    monkeypatch.undo()


def test_benchmark_writes_every_table(benchmark):
    out, table, _ = benchmark
    for name in ("implants.parquet", "side_effects.parquet", "localization.parquet", "localization.md",
                 "summary.json", "localization_scores.html", "localization_profiles.html"):
        assert (out / name).is_file(), name
    implants = pd.read_parquet(out / "implants.parquet")
    assert implants["rate"].iloc[0] == 1.0 and implants["layer"].iloc[0] == 1
    effects = pd.read_parquet(out / "side_effects.parquet")
    assert {"kl_per_token", "idioms_rate_before", "idioms_rate_after"} <= set(effects["measure"])
    assert {IMPLANTED, NO_IMPLANT} <= set(table["set"])
    # tracing is scored on its raw effects; its shares would rank every probe's layers the same way
    assert "tracing MLP (last)" in set(table["measure"])
    assert not any(m.startswith("tracing") and " share " in m for m in table["measure"])
    pd.testing.assert_frame_equal(score_ground_truth(out, png=False), table)  # rescoring reads the same results


def test_every_model_is_read_through_the_base_models_tuned_lens(benchmark):
    out, table, _ = benchmark
    settings = json.loads((out / "settings.json").read_text())
    assert settings["tuned_lens"]["kind"] == "tuned" and "base model's tuned lens" in settings["tuned_lens"]["note"]
    assert any(measure.startswith("tuned lens") for measure in table["measure"])


def test_whole_mlp_knockout_finds_the_implanted_layer(benchmark):
    _, table, _ = benchmark
    row = table[(table["set"] == IMPLANTED) & (table["scope"] == "depth")
                & (table["measure"] == "knockout whole MLP log-p drop")].iloc[0]
    assert row["depth"] == 1 and row["n"] == 4
    assert row["score"] == 1.0  # the implanted layer ranked first for every idiom
    assert row["profile_top_layer"] == 1


def test_a_rerun_reuses_the_implant_and_every_stage(benchmark, strong_mlp_dir, monkeypatch, tuned):
    out, table, options = benchmark
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(out.parent / "cache"))
    settings = json.loads((out / "settings.json").read_text())
    assert settings["layers"] == [1] and set(settings["sets"]) == {"L1-s0"}
    logged: list[str] = []
    again = run_ground_truth(str(strong_mlp_dir), out, options, png=False, tuned_lens=tuned, log=logged.append)
    stages = [line for line in logged if line.startswith("[run] ")]
    assert stages and all("already done" in line for line in stages)
    assert any(line.startswith("[ground truth] side effects: reusing") for line in logged)
    implants = pd.read_parquet(out / "implants.parquet")
    assert implants["train_seconds"].iloc[0] == settings_seconds(out)  # the stored implant, not a new one
    pd.testing.assert_frame_equal(again, table)


def settings_seconds(out) -> float:
    from idiom_lens.models.loading import cache_dir

    stored = [json.loads(p.read_text()) for p in (cache_dir() / "implants").rglob("*.json")
              if "seconds" in json.loads(p.read_text())]
    assert len(stored) == 1, stored
    return float(stored[0]["seconds"])


def test_cli_rescores_a_folder(benchmark, capsys):
    from idiom_lens.cli import main

    out, table, _ = benchmark
    assert main(["localize", "--out", str(out), "--rescore", "--no-png"]) == 0
    printed = capsys.readouterr().out
    assert "knockout whole MLP" in printed and f"wrote the scores and figures to {out}" in printed
    assert main(["localize", "--out", str(out / "missing"), "--rescore"]) == 2  # no results there: one line, exit 2


def test_the_report_shows_the_ground_truth_stage(benchmark):
    from idiom_lens.study.html import FigureRenderer
    from idiom_lens.study.layout import read_stage
    from idiom_lens.study.report import _stage_section

    out, _, _ = benchmark
    stage = read_stage(out)  # a study's OUT/<model>/ground_truth/ folder is this one
    section = _stage_section(stage, "ground-truth", FigureRenderer())
    assert section.title == "Ground truth: do the localizers find idioms implanted into a known MLP layer?"
    assert "score of the implanted layer" in section.body and "Side effects of each implant" in section.body
    assert section.body.count("<div") >= 2  # the two figures, and none of the localizers' own figures
    inner = [p for p in stage.figures if p.parent != out]
    assert inner and not any(p.stem in section.body for p in inner)


def test_neurons_mode_scores_the_trained_neurons(strong_mlp_dir, probes, tmp_path, monkeypatch, capsys):
    """Neurons mode: precision@k of each neuron ranking at the implanted layer against the trained
    neurons, in its table and in localization.md; the trained neurons' own change makes the
    ranking that reads the trained output vectors (effective) beat chance."""
    probe_file = tmp_path / "implanted.jsonl"
    probe_file.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": "idiom"})
                                  + "\n" for p in probes))
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    options = GroundTruthOptions(
        layers=(1,), seeds=(0,), mode="neurons", dataset=str(probe_file), n_scored=4, n_control=0,
        implant={**FAST, "n_neurons": 16, "train_inputs": True},
        localizers=LocalizerOptions(norms=("frozen",), knockout_controls=("whole_mlp",), window=1, noise_samples=2,
                                    noise_effects=False, lenses=("logit",)))
    run_ground_truth(str(strong_mlp_dir), tmp_path / "out", options, png=False, log=lambda line: None)
    precision = pd.read_parquet(tmp_path / "out" / "neuron_precision.parquet")
    assert set(precision["method"]) == {"effective", "magnitude", "dla", "activation"}
    assert set(precision["k"]) == {16, 32, 64}  # 16 x (1, 2, 5), at most d_mlp 64 and (precision["n"] == 4).all()
    assert precision["precision"].between(0, 1).all()
    effective = precision[(precision["method"] == "effective") & (precision["k"] == 16)].iloc[0]
    print(precision[["method", "k", "precision", "chance_precision"]])
    assert effective["precision"] > effective["chance_precision"]
    assert "Neurons mode: precision@k" in (tmp_path / "out" / "localization.md").read_text()
    # neurons only: the same implant (from the cache) and the same precision, no layer localizer
    from dataclasses import replace

    run_ground_truth(str(strong_mlp_dir), tmp_path / "only", replace(options, layer_localizers=False), png=False,
                     log=lambda line: None)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "only" / "neuron_precision.parquet"), precision)
    assert not (tmp_path / "only" / "base").exists() and not (tmp_path / "only" / "L1-s0").exists()
    assert "No layer-level localizers ran" in (tmp_path / "only" / "localization.md").read_text()
    from idiom_lens.cli import main

    capsys.readouterr()
    assert main(["localize", "--out", str(tmp_path / "only"), "--rescore", "--no-png"]) == 0
    printed = capsys.readouterr().out
    assert "effective" in printed and "chance_precision" in printed


def test_published_claims_are_the_tables_numbers(benchmark, tmp_path):
    """`make results` publishes the benchmark's numbers from its own tables (experiments/publish.py)."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import publish  # noqa: E402  (experiments/publish.py)

    out, table, _ = benchmark
    shutil.copytree(out, tmp_path / publish.GROUND_TRUTH)
    claims = publish.Claims({publish.GROUND_TRUTH: "python experiments/ground_truth.py"})
    publish.ground_truth_claims(claims, tmp_path, "python experiments/ground_truth.py")
    row = table[(table["set"] == IMPLANTED) & (table["scope"] == "depth")
                & (table["measure"] == "knockout whole MLP log-p drop")].iloc[0]
    claim = claims.items[f"{publish.GROUND_TRUTH}.implanted.knockout_whole_mlp_log_p_drop.depth1.score"]
    assert claim["value"] == row["score"] and claim["n"] == row["n"] == 4
    assert claim["interval"] == [row["score_low"], row["score_high"]]
    top = claims.items[f"{publish.GROUND_TRUTH}.implanted.knockout_whole_mlp_log_p_drop.depth1.top_layer"]
    assert top["text"] == "1"
    effects = pd.read_parquet(out / "side_effects.parquet").set_index("measure")
    kl = claims.items[f"{publish.GROUND_TRUTH}.implant.L1-s0.kl_per_token"]
    assert kl["value"] == pytest.approx(effects.loc["kl_per_token", "value"]) and kl["text"] == f"{kl['value']:.2f}"
    assert claims.items[f"{publish.GROUND_TRUTH}.implant.L1-s0.rate"]["value"] == 1.0
    implants = pd.read_parquet(out / "implants.parquet")
    train = claims.items[f"{publish.GROUND_TRUTH}.implants_train_minutes"]
    assert train["value"] == pytest.approx(implants["train_seconds"].sum() / 60)
    lens = json.loads((out / "settings.json").read_text())["tuned_lens"]["settings"]["train_seconds"]
    assert claims.items[f"{publish.GROUND_TRUTH}.tuned_lens_train_minutes"]["value"] == pytest.approx(lens / 60)
    seconds = json.loads((out / "settings.json").read_text())["seconds"]
    stages = {stage: claims.items[f"{publish.GROUND_TRUTH}.{stage}_minutes"]["value"] * 60
              for stage in ("localizers", "side_effects")}
    assert stages == pytest.approx({"localizers": seconds["base"] + seconds["L1-s0"],
                                    "side_effects": seconds["side_effects"]})
    assert "tuned_lens" not in seconds  # the lens was given, not obtained: no claim of its time
    assert f"{publish.GROUND_TRUTH}.tuned_lens_obtained_minutes" not in claims.items
    publish.write_ground_truth_page(tmp_path, tmp_path / "results", "python experiments/ground_truth.py")
    page = (tmp_path / "results" / "ground_truth.md").read_text()
    assert "Implants:" in page and "Side effects" in page and "kl_per_token" in page


def test_a_rerun_benchmark_is_republished_alone(benchmark, tmp_path):
    """`regenerate.py --steps ground-truth-gemma-3-270m`: its claims, page, figures and row are
    rewritten from the run; every other claim and row stays as the last full publish wrote it."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    import publish  # noqa: E402  (experiments/publish.py)
    import regenerate  # noqa: E402  (experiments/regenerate.py)

    out, table, _ = benchmark
    published, docs = tmp_path / "published", tmp_path / "docs"
    shutil.copytree(out, published / publish.GROUND_TRUTH)
    for name in ("localization_scores.png", "localization_profiles.png"):  # png=False in the fixture's run
        (published / publish.GROUND_TRUTH / name).write_bytes(b"new " + name.encode())
    (published / ".steps").mkdir()
    (published / ".steps" / f"{publish.GROUND_TRUTH}.json").write_text(json.dumps(
        {"seconds": 600.0, "commit": "abc1234", "finished": "2026-12-07T12:00:00+00:00"}))
    steps = regenerate.steps()
    shown = {step.name: step.shown() for step in steps}
    old = publish.Claims(shown)
    old.add("other.claim", value=1.0, text="1", command=shown["compare"], source="x")
    old.add(f"{publish.GROUND_TRUTH}.stale", value=2.0, text="2", command=shown[publish.GROUND_TRUTH], source="y")
    (docs / "results").mkdir(parents=True)
    (docs / "figures").mkdir()
    old.write(docs / "claims.json")
    (docs / "regeneration.md").write_text("Per step (1 min for `make results` in all):\n\n"
                                          "| step | command |\n|---|---|\n| compare | kept |\n"
                                          f"| {publish.GROUND_TRUTH} | old row |\n")

    publish.publish_steps(published, docs, names=[publish.GROUND_TRUTH], steps=steps)

    claims = json.loads((docs / "claims.json").read_text())["claims"]
    assert claims["other.claim"]["text"] == "1" and f"{publish.GROUND_TRUTH}.stale" not in claims
    row = table[(table["set"] == IMPLANTED) & (table["scope"] == "depth")
                & (table["measure"] == "knockout whole MLP log-p drop")].iloc[0]
    assert claims[f"{publish.GROUND_TRUTH}.implanted.knockout_whole_mlp_log_p_drop.depth1.score"]["value"] == \
        row["score"]
    assert claims[f"regeneration.{publish.GROUND_TRUTH}.minutes"]["text"] == "10"
    expected = sum(step.minutes for step in steps if not step.long)
    assert claims["regeneration.expected_minutes"]["value"] == expected
    assert (docs / "figures" / "gemma-3-270m_localization_scores.png").read_bytes() == b"new localization_scores.png"
    assert "Side effects" in (docs / "results" / "ground_truth.md").read_text()
    page = (docs / "regeneration.md").read_text()
    assert "| compare | kept |" in page and "old row" not in page and "| 10.0 min | abc1234 | 2026-12-07 |" in page
    assert f"{expected:g} min for `make results` in all" in page
    with pytest.raises(ValueError, match="cannot be republished alone"):
        publish.publish_steps(published, docs, names=["compare"], steps=steps)
