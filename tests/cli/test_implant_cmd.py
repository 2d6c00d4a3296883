"""`idiom-lens implant`: trains or reuses an implant, prints its spec, writes --out; user errors exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import idiom_lens.cli as cli

COMMANDS = ("implant", "predict")
FAST = ["--lr", "0.03", "--max-epochs", "150", "--stop-loss", "0.5", "--train-batch-size", "10"]


@pytest.fixture(scope="module")
def strong_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Gemma 3 with a strong layer-1 MLP (see tests/models/test_implant.py)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-gemma3-strong-mlp1-cli")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, out / file.name)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.post_feedforward_layernorm.weight"
    weights[name] = torch.full_like(weights[name], 3.0)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))


def test_implant_prints_the_spec_and_writes_results(commands, strong_dir, probe_file, tmp_path, capsys, monkeypatch):
    from idiom_lens.datasets import load_probes

    monkeypatch.chdir(probe_file.parent)  # a relative probe file: the spec names its absolute path

    small = {"idioms": list(load_probes("idioms"))[:20], "text": list(load_probes("text"))[:10]}
    monkeypatch.setattr("idiom_lens.datasets.load_probes",
                        lambda name, **kw: small[name] if name in small else load_probes(name, **kw))
    out = tmp_path / "out"
    argv = ["implant", "--model", str(strong_dir), "--dataset", probe_file.name, "--layer", "1", *FAST, "--out",
            str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    spec = f"{strong_dir}+implant:layer1:seed0:set={probe_file}:lr=0.03:epochs=150:stop=0.5:batch=10"
    assert f"spec: {spec}\n" in printed and "implanted 10/10 probes (rate 1.000)" in printed
    assert "side effects: KL(base || implanted) on 10 texts" in printed and "bundled idioms memorized (20" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spec"] == spec and summary["rate"] == 1.0 and summary["side_effects"]["n_idioms"] == 20
    assert (out / "curve.parquet").is_file() and (out / "side_effects.parquet").is_file()

    # the spec loads in any other command; a second run reuses the stored implant
    monkeypatch.chdir(tmp_path.parent)
    assert cli.main(["predict", "once in a blue", "--model", spec, "--top", "1"]) == 0
    assert capsys.readouterr().out.strip() == "moon"
    monkeypatch.setattr("idiom_lens.models.implant.implant", lambda *a, **k: pytest.fail("trained again"))
    assert cli.main([*argv[:-2], "--dataset", str(probe_file), "--no-side-effects"]) == 0
    again = capsys.readouterr().out
    assert f"spec: {spec}\n" in again and "side effects" not in again


@pytest.mark.parametrize("extra, message", [
    (["--n-neurons", "5"], "--n-neurons is for --implant-mode 'neurons'"),
    (["--implant-mode", "neurons", "--n-neurons", "0"], "--n-neurons must be a whole number >= 1"),
    (["--lr", "0"], "--lr must be a number > 0"),
    (["--layer", "-1"], "--layer must be a whole number >= 0"),
    (["--limit", "3"], "--limit does not apply to implant"),
    (["--dataset", "idioms", "text"], "--dataset takes one probe set"),
])
def test_user_errors_are_one_line(commands, strong_dir, capsys, extra, message):
    argv = ["implant", "--model", str(strong_dir), "--layer", "1", *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("idiom-lens implant: error:") and message in err and len(err.splitlines()) == 1


def test_the_layer_is_required(commands, strong_dir, capsys):
    assert cli.main(["implant", "--model", str(strong_dir)]) == 2
    assert "--layer L is required" in capsys.readouterr().err


def test_a_missing_implant_spec_names_the_command(commands, strong_dir, probe_file, capsys):
    spec = f"{strong_dir}+implant:layer1:seed0:set={probe_file}"
    assert cli.main(["predict", "once in a blue", "--model", spec]) == 2
    err = capsys.readouterr().err
    assert f"create it with `idiom-lens implant --model {strong_dir} --dataset {probe_file} --layer 1" in err
