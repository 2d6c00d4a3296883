"""`idiom-lens attribute` and `idiom-lens attribution` through `idiom_lens.cli.main`."""

from __future__ import annotations

import json

import pytest

import idiom_lens.cli as cli


@pytest.fixture(autouse=True)
def only_attribution_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_COMMANDS", ("attribute", "attribution"))


def test_attribute_prints_tables(tiny_model_dir, capsys):
    assert cli.main(["attribute", "once in a blue", "--model", str(tiny_model_dir), "--top", "4",
                     "--target", "moon"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "target 'moon'" in out
    assert "components ranked" in out and "top neurons" in out and "promoted tokens" in out
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("rank  component"))
    assert len([l for l in lines[start + 1 : start + 5] if l.strip()]) == 4
    assert "check: embed + attn + mlp" in out


def test_attribute_bad_top(tiny_model_dir, capsys):
    assert cli.main(["attribute", "once in a blue", "--model", str(tiny_model_dir), "--top", "0"]) == 2
    assert "--top" in capsys.readouterr().err


def test_attribution_writes_outputs(tiny_model_dir, probes, tmp_path, capsys):
    data = tmp_path / "probes.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": p.kind}) + "\n"
                            for p in probes), encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["attribution", "--dataset", str(data), "--model", str(tiny_model_dir), "--limit", "6",
                     "--out", str(out), "--no-png"]) == 0
    digest = json.loads((out / "summary.json").read_text())
    assert digest["n_probes"] == 6
    assert all(v < 1e-3 for v in digest["invariant_max_abs_error"].values())
    for name in ("attribution.parquet", "attribution_probes.parquet", "attribution_neurons.parquet",
                 "layer_stats_logit.parquet", "cumulative_share_logit_diff.parquet", "layers_logit.html"):
        assert (out / name).is_file(), name
    assert "attributed 6 probes" in capsys.readouterr().out
