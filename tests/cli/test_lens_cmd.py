"""`idiom-lens lens train|show` and `trajectory --lens`: lenses trained into the cache, then used."""

from __future__ import annotations

import json

import pytest

import idiom_lens.cli as cli


@pytest.fixture
def run_cli(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_COMMANDS", ("trajectory", "lens"))
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    return cli.main


def test_train_show_and_use_a_lens(run_cli, capsys, tmp_path, tiny_model_dir):
    model = ["--model", str(tiny_model_dir)]
    assert run_cli(["lens", "show", "--kind", "tuned", "--corpus", "samples", *model]) == 2
    assert "idiom-lens lens train" in capsys.readouterr().err
    assert run_cli(["lens", "train", "--kind", "tuned", "--corpus", "samples", "--steps", "3", *model]) == 0
    out = capsys.readouterr().out
    lens_file = next((tmp_path / "cache" / "lenses").rglob("tuned-*.pt"))
    assert str(lens_file) in out and "held-out KL" in out and "steps" in out
    # trained once: a second call reuses it (no training line)
    assert run_cli(["lens", "train", "--kind", "tuned", "--corpus", "samples", "--steps", "3", *model]) == 0
    assert "training positions" not in capsys.readouterr().out
    data = tmp_path / "probes.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"i{i}", "text": t, "kind": "idiom"})
                              for i, t in enumerate(["once in a blue moon", "turn a blind eye", "break the ice"])))
    out_dir = tmp_path / "out"
    args = ["trajectory", "--dataset", str(data), *model, "--out", str(out_dir), "--no-png", "--lens", str(lens_file)]
    assert run_cli(args) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["lens"]["kind"] == "tuned" and summary["sites"] == ["resid_post"]
    assert summary["phases"]["lens"] == "tuned"
    assert run_cli([*args, "--sites", "attn_out"]) == 2
    assert "reads block outputs (resid_post) only" in capsys.readouterr().err
    assert run_cli(["trajectory", "--dataset", str(data), *model, "--out", str(out_dir), "--lens", "magic"]) == 2
    assert "--lens 'magic'" in capsys.readouterr().err
