"""`make results`: the step runner resumes by command, and the claims are the runs' own numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import publish  # noqa: E402  (experiments/publish.py)
import regenerate  # noqa: E402  (experiments/regenerate.py)


def test_a_finished_step_is_skipped_until_its_command_changes(tmp_path, capsys):
    step = regenerate.Step("hello", ("python", "-c", "print('ran')"), 0.1)
    assert regenerate.run_step(step, tmp_path) is not None
    marker = json.loads((tmp_path / ".steps" / "hello.json").read_text())
    assert marker["command"] == step.command(tmp_path) and marker["seconds"] >= 0
    assert (tmp_path / "logs" / "hello.log").read_text() == "ran\n"
    assert regenerate.run_step(step, tmp_path) is None
    assert "done before" in capsys.readouterr().out
    changed = regenerate.Step("hello", ("python", "-c", "print('again')"), 0.1)
    assert regenerate.run_step(changed, tmp_path) is not None
    assert (tmp_path / "logs" / "hello.log").read_text() == "again\n"


def test_a_failing_step_stops_with_its_log_and_leaves_no_marker(tmp_path):
    step = regenerate.Step("broken", ("python", "-c", "import sys; print('why'); sys.exit(3)"), 0.1)
    with pytest.raises(SystemExit, match="(?s)broken failed \\(exit 3\\).*why"):
        regenerate.run_step(step, tmp_path)
    assert not (tmp_path / ".steps" / "broken.json").exists()


def test_every_step_names_a_runnable_command():
    root = Path(regenerate.__file__).resolve().parents[1]
    names = [s.name for s in regenerate.steps(idiomem=Path("idiomem.jsonl"))]
    assert len(names) == len(set(names))
    for step in regenerate.steps(idiomem=Path("idiomem.jsonl")):
        assert step.argv[0] in ("idiom-lens", "python")
        if step.argv[0] == "python":
            assert (root / step.argv[1]).is_file(), step.argv[1]
        assert "{out}" not in step.shown() and "published" in step.shown()


def test_formats():
    assert publish.share_ci(0.4178, 0.3957, 0.4402) == "0.418 [0.396, 0.440]"
    assert publish.signed_ci(1.133, 0.95, 1.299) == "+1.13 [+0.95, +1.30]"
    assert publish.p_text(1e-4) == "p < 1e-3" and publish.p_text(0.0018) == "p = 0.0018"
    assert publish.p_text(0.28) == "p = 0.28" and publish.slug("non-memorized idioms") == "non_memorized_idioms"


def test_claims_are_the_tables_numbers(tmp_path):
    """Memorization claims on a hand-written table: the share, its Wilson interval, its text."""
    from idiom_lens.analyses.stats import wilson_interval

    claims = publish.Claims({"study-m": "idiom-lens run"})
    root = tmp_path / "study" / "m" / "trajectory"
    root.mkdir(parents=True)
    pd.DataFrame({"kind": ["idiom"], "subset": ["all"], "n": [1886], "memorized": [788],
                  "fraction": [788 / 1886]}).to_parquet(root / "memorization_summary.parquet")
    with pytest.raises(FileNotFoundError, match="summary.json is missing"):
        publish.study_claims(claims, tmp_path, "m", "idiom-lens run")
    lo, hi = wilson_interval(788, 1886)
    claim = claims.items["m.memorized.idiom.all"]
    assert claim["value"] == pytest.approx(788 / 1886) and claim["interval"] == [pytest.approx(lo), pytest.approx(hi)]
    assert claim["text"] == f"{788 / 1886:.3f} [{lo:.3f}, {hi:.3f}]" and claim["n"] == 1886
    assert claims.items["m.memorized.idiom.all.count"]["text"] == "788"
    assert claim["source"] == "study/m/trajectory/memorization_summary.parquet" and claim["step"] == "study-m"
    with pytest.raises(ValueError, match="written twice"):
        claims.add("m.memorized.idiom.all", value=1, text="1", command="idiom-lens run", source="s")
    with pytest.raises(ValueError, match="no step of the regeneration"):
        claims.add("m.other", value=1, text="1", command="idiom-lens other", source="s")
    # the file holds each step's command once, and every claim's step is among them
    claims.write(tmp_path / "claims.json")
    written = json.loads((tmp_path / "claims.json").read_text())
    assert written["commands"] == {"study-m": "idiom-lens run"}
    assert written["claims"]["m.memorized.idiom.all"] == claim


def test_knockout_claims_name_each_secondary_variant_by_the_setting_that_differs(tmp_path):
    """The variants table (as experiments/knockouts.py writes it: no variant column) gives the
    primary variant's claims plain names and each secondary one its differing value."""
    root = tmp_path / "k"
    root.mkdir()
    row = {"group": "memorized idioms", "positions": "all", "control": "targeted", "layer": 3, "n": 50,
           "changed": 0.5, "changed_low": 0.36, "changed_high": 0.64, "removed_norm": 12.0}
    rows = [row | {"rank_by": "effective", "norm": "frozen", "ablation": "zero", "primary": True},
            row | {"rank_by": "effective", "norm": "live", "ablation": "zero", "primary": False, "changed": 0.6},
            row | {"rank_by": "effective", "norm": "frozen", "ablation": "mean", "primary": False},
            row | {"rank_by": "magnitude", "norm": "frozen", "ablation": "zero", "primary": False}]
    pd.DataFrame(rows).to_parquet(root / "knockout_layers_variants.parquet")
    claims = publish.Claims({"k": "python experiments/knockouts.py"})
    publish.knockout_claims(claims, tmp_path, "k", "python experiments/knockouts.py")
    names = {n for n in claims.items if not n.endswith("removed_norm")}
    assert names == {f"k.{v}memorized_idioms.all.targeted.layer3" for v in ("", "live.", "mean.", "magnitude.")}
    assert claims.items["k.live.memorized_idioms.all.targeted.layer3"]["text"] == "0.60 [0.36, 0.64]"
    assert claims.items["k.memorized_idioms.all.targeted.layer3.removed_norm"]["text"] == "12.00"


def test_implant_scaling_claims_take_the_last_record_of_each_size(tmp_path):
    """A rerun appends to scaling.jsonl: the last record of a (layer, size) is the one claimed."""
    path = tmp_path / publish.IMPLANT_SCALING
    path.parent.mkdir(parents=True)
    record = {"layer": 8, "n_probes": 25, "rate": 1.0, "epochs": 62, "seconds": 105.04, "seconds_per_epoch": 1.46,
              "side_effects": {"kl_per_token": 0.0346, "text_changed": 0.179, "n_lost": 59, "n_gained": 58}}
    rerun = record | {"seconds": 99.6, "epochs": 60}
    bigger = record | {"n_probes": 100, "seconds": 187.9, "side_effects": None}
    path.write_text("\n".join(json.dumps(r) for r in (record, bigger, rerun)) + "\n")
    claims = publish.Claims({"implant-scaling": "python benchmarks/implant_bench.py"})
    publish.implant_scaling_claims(claims, tmp_path, "python benchmarks/implant_bench.py")
    assert claims.items["implant_scaling.layer8.n25.seconds"]["text"] == "100"
    assert claims.items["implant_scaling.layer8.n25.epochs"]["text"] == "60"
    assert claims.items["implant_scaling.layer8.n25.kl_per_token"]["text"] == "0.035"
    assert claims.items["implant_scaling.layer8.n25.idioms_lost"]["value"] == 59
    assert claims.items["implant_scaling.layer8.n100.seconds"]["n"] == 100
    assert "implant_scaling.layer8.n100.kl_per_token" not in claims.items


def test_attribution_patching_is_republished_alone(tmp_path):
    """`regenerate.py --steps attribution-patching`: its claims and page come from the new run, a
    claim of another step is kept, and its stale claims are gone."""
    run = tmp_path / "published" / "attribution-patching"
    run.mkdir(parents=True)
    pd.DataFrame({"site": ["resid"], "correlation": [0.9], "correlation_low": [0.8], "correlation_high": [0.95],
                  "largest_rank_median": [1.0], "n_correlated": [20]}).to_parquet(run / "agreement.parquet")
    (run / "bench.json").write_text(json.dumps({"n_valid_pairs": 20}))
    steps = regenerate.steps()
    shown = {step.name: step.shown() for step in steps}
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "figures").mkdir()
    old = publish.Claims(shown)
    old.add("other.claim", value=1.0, text="1", command=shown["compare"], source="x")
    old.add("attribution_patching.resid.largest_rank_median", value=2.0, text="2",
            command=shown["attribution-patching"], source="y")
    old.add("attribution_patching.stale", value=3.0, text="3", command=shown["attribution-patching"], source="y")
    old.write(docs / "claims.json")
    (docs / "regeneration.md").write_text("| step | command |\n|---|---|\n| attribution-patching | old row |\n")

    publish.publish_steps(tmp_path / "published", docs, names=["attribution-patching"], steps=steps)

    claims = json.loads((docs / "claims.json").read_text())["claims"]
    assert claims["other.claim"]["text"] == "1" and "attribution_patching.stale" not in claims
    assert claims["attribution_patching.resid.largest_rank_median"]["text"] == "1"
    assert claims["attribution_patching.resid.correlation"]["text"] == "0.90 [0.80, 0.95]"
    assert claims["attribution_patching.n_valid_pairs"]["value"] == 20
    assert "largest_rank_median" in (docs / "results" / "attribution_patching.md").read_text()
    assert "old row" not in (docs / "regeneration.md").read_text()


def test_neurons_only_ground_truth_is_published_alone(tmp_path):
    """`regenerate.py --steps ground-truth-neurons-gemma-3-270m`: a neurons-only run (no layer
    scores) gives its implants', side effects' and neuron precision's claims and its page; without
    neuron_precision.parquet it fails instead of publishing nothing."""
    name = publish.GROUND_TRUTH_NEURONS
    run = tmp_path / "published" / name
    run.mkdir(parents=True)
    pd.DataFrame({"implant": ["L2-s0"], "layer": [2], "seed": [0], "rate": [0.95], "n_probes": [120], "epochs": [80],
                  "train_seconds": [200.4], "neurons": [[3, 17]]}).to_parquet(run / "implants.parquet")
    pd.DataFrame({"implant": ["L2-s0", "L2-s0"], "measure": ["kl_per_token", "idioms_lost"], "value": [0.0123, 7.0],
                  "n": [755, 1886]}).to_parquet(run / "side_effects.parquet")
    (run / "settings.json").write_text(json.dumps({"total_seconds": 600.0, "seconds": {"L2-s0": 30.0,
                                                                                      "side_effects": 120.0}}))
    (run / "localization.md").write_text("No layer-level localizers ran (layer_localizers=False).\n")
    steps = regenerate.steps()
    shown = {step.name: step.shown() for step in steps}
    assert "--neurons-only" in shown[name]
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "figures").mkdir()
    publish.Claims(shown).write(docs / "claims.json")
    (docs / "regeneration.md").write_text("| step | command |\n|---|---|\n")
    with pytest.raises(FileNotFoundError, match="neuron_precision.parquet"):
        publish.publish_steps(tmp_path / "published", docs, names=[name], steps=steps)
    pd.DataFrame({"implant": ["L2-s0"], "method": ["knockout effective"], "k": [20], "n": [20], "precision": [0.6],
                  "precision_low": [0.5], "precision_high": [0.7]}).to_parquet(run / "neuron_precision.parquet")

    publish.publish_steps(tmp_path / "published", docs, names=[name], steps=steps)

    claims = json.loads((docs / "claims.json").read_text())["claims"]
    assert claims[f"{name}.neurons.L2-s0.knockout_effective.k20"]["text"] == "0.60 [0.50, 0.70]"
    assert claims[f"{name}.implant.L2-s0.rate"]["value"] == 0.95
    assert claims[f"{name}.implant.L2-s0.kl_per_token"]["text"] == "0.01"
    assert claims[f"{name}.total_minutes"]["text"] == "10"
    assert not any(".depth" in n for n in claims)  # no layer scores in a neurons-only run
    page = (docs / "results" / "ground_truth_neurons.md").read_text()
    assert "3, 17" in page and "kl_per_token" in page and "into 2 seeded-random neurons" in page
    rows = (docs / "regeneration.md").read_text().splitlines()
    assert rows[-1].startswith(f"| {name} | `python experiments/ground_truth.py --implant-mode neurons")  # row added
