"""`idiom-lens attribute-prompt` and `idiom-lens attribute-set` through `idiom_lens.cli.main`, and their
old names `attribute` and `attribution` (deprecated aliases: they work and say so on stderr)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from tolerances import logit_atol  # tests/tolerances.py: why each bound

import idiom_lens.cli as cli


@pytest.fixture(autouse=True)
def only_attribution_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_COMMANDS", ("attribute", "attribution"))


def test_attribute_prints_tables(tiny_model_dir, capsys):
    assert cli.main(["attribute-prompt", "once in a blue", "--model", str(tiny_model_dir), "--rows", "4",
                     "--target", "moon"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "deprecated" not in captured.err
    assert "predicted" in out and "target 'moon'" in out
    assert "components ranked" in out and "top neurons" in out and "promoted tokens" in out
    lines = out.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("rank  component"))
    assert len([l for l in lines[start + 1 : start + 5] if l.strip()]) == 4
    assert "check: embed + attn + mlp" in out


def test_attribute_bad_top(tiny_model_dir, capsys):
    assert cli.main(["attribute-prompt", "once in a blue", "--model", str(tiny_model_dir), "--rows", "0"]) == 2
    assert "--rows must be >= 1" in capsys.readouterr().err
    assert cli.main(["attribute-prompt", "once in a blue", "--model", str(tiny_model_dir), "--top", "0"]) == 2
    err = capsys.readouterr().err  # the old spelling: understood, and said to be old
    assert "--top is deprecated; use --rows (the old spelling goes in 0.2)" in err and "--rows must be >= 1" in err


def test_attribution_writes_outputs(tiny_model_dir, tiny_model, probes, tmp_path, capsys):
    data = tmp_path / "probes.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": p.kind}) + "\n"
                            for p in probes), encoding="utf-8")
    out = tmp_path / "out"
    assert cli.main(["attribute-set", "--dataset", str(data), "--model", str(tiny_model_dir), "--limit", "6",
                     "--out", str(out), "--no-png"]) == 0
    digest = json.loads((out / "summary.json").read_text())
    assert digest["n_probes"] == 6
    # sums of fp32 components against the forward's logit: noise relative to the terms summed
    frame = pd.read_parquet(out / "attribution.parquet")
    parts = frame[frame["component"].isin(["embed", "attn", "mlp"])]
    terms = float(parts.groupby("probe_id")["contribution"].apply(lambda v: v.abs().sum()).max())
    assert all(v < logit_atol(tiny_model, terms) for v in digest["invariant_max_abs_error"].values())
    for name in ("attribution.parquet", "attribution_probes.parquet", "attribution_neurons.parquet",
                 "layer_stats_logit.parquet", "cumulative_share_logit_diff.parquet", "layers_logit.html"):
        assert (out / name).is_file(), name
    assert "attributed 6 probes" in capsys.readouterr().out


def _probe_file(tmp_path, probes):
    data = tmp_path / "probes.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": p.kind}) + "\n"
                            for p in probes), encoding="utf-8")
    return data


def test_old_name_attribute_still_works_and_warns(tiny_model_dir, capsys):
    """`attribute` is the deprecated name of `attribute-prompt`: same output, one note on stderr."""
    args = ["once in a blue", "--model", str(tiny_model_dir), "--rows", "3"]
    assert cli.main(["attribute-prompt", *args]) == 0
    new = capsys.readouterr()
    assert cli.main(["attribute", *args]) == 0
    old = capsys.readouterr()
    assert old.out == new.out
    assert old.err.strip().splitlines() == [
        "idiom-lens: `attribute` is deprecated and will be removed in the next release; "
        "use `idiom-lens attribute-prompt`"
    ]


def test_old_name_attribution_still_works_and_warns(tiny_model_dir, probes, tmp_path, capsys):
    """`attribution` is the deprecated name of `attribute-set`: it writes the same outputs and says so on stderr."""
    data = _probe_file(tmp_path, probes)
    assert cli.main(["attribution", "--dataset", str(data), "--model", str(tiny_model_dir), "--limit", "2",
                     "--out", str(tmp_path / "old"), "--no-png"]) == 0
    err = capsys.readouterr().err
    assert ("idiom-lens: `attribution` is deprecated and will be removed in the next release; "
            "use `idiom-lens attribute-set`") in err
    assert json.loads((tmp_path / "old" / "summary.json").read_text())["n_probes"] == 2


def test_attribute_set_sample_is_seeded_per_set(tiny_model_dir, probes, tmp_path, capsys):
    """`--sample N --seed S`: the same N probes for the same seed (the shared option, as in knockout)."""
    data = _probe_file(tmp_path, probes)
    for name in ("a", "b"):
        assert cli.main(["attribute-set", "--dataset", str(data), "--model", str(tiny_model_dir), "--sample", "3",
                         "--seed", "4", "--out", str(tmp_path / name), "--no-png"]) == 0
    import pandas as pd

    ids = [sorted(set(pd.read_parquet(tmp_path / name / "attribution_probes.parquet")["probe_id"])) for name in "ab"]
    assert len(ids[0]) == 3 and ids[0] == ids[1]
    assert "deprecated" not in capsys.readouterr().err


def test_help_lists_new_names_with_old_aliases(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "attribute-prompt (attribute)" in out and "attribute-set (attribution)" in out
    assert out.count("deprecated") == 2
