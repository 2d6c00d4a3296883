"""`idiom-lens data ...` through `idiom_lens.cli.main` (only the data subcommand is loaded)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import idiom_lens.cli as cli
from idiom_lens.datasets import ProbeSet, load_probes

# Two idioms in the authors' published IdioMem format that share a prompt and, as published, an id.
PUBLISHED_PAIR = (
    '{"idiom":"sick as a parrot","id":"b0117bc748d35fe2dc73","source":"MAGPIE","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}\n'
    '{"idiom":"sick as a dog","id":"b0117bc748d35fe2dc73","source":"MAGPIE","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}\n'
    '{"idiom":"turn a blind eye","id":"b05e010ca3576fbf6e81","source":"LIdiom","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}\n'
)


@pytest.fixture(autouse=True)
def only_data_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_COMMANDS", ("data",))


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:3] == ["name", "probes", "similarity_ind"]
    column = header.index("not_single_target")
    for name in ("idioms", "text", "facts", "implanted"):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert int(row.split()[1]) == len(load_probes(name))
        assert int(row.split()[column]) == 0


def test_show_bundled_with_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "show", "facts", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["id", "kind", "prompt", "target"]
    assert len(lines) == 5 and lines[-1].startswith("(3 of ")


def test_show_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.csv"
    path.write_text("text\nonce in a blue moon\n", encoding="utf-8")
    assert cli.main(["data", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "mine-2" in out and "moon" in out


def test_show_published_idiomem_counts_not_single_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "idiomem.jsonl"
    path.write_text(PUBLISHED_PAIR, encoding="utf-8")
    with pytest.warns(UserWarning, match="renamed 1 repeated id"):
        assert cli.main(["data", "show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[-2:] == ["hard", "single"]
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert set(rows) == {"b0117bc748d35fe2dc73", "b0117bc748d35fe2dc73-2", "b05e010ca3576fbf6e81"}
    assert [rows["b0117bc748d35fe2dc73-2"][-2:], rows["b05e010ca3576fbf6e81"][-2:]] == [["0", "0"], ["1", "1"]]
    assert "; 2 not single-target" in lines[-1]


def test_trajectory_gets_past_loading_a_published_idiomem_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`idiom-lens trajectory --dataset FILE` up to loading the model (stubbed: no model runs)."""
    import idiom_lens.cli.trajectory_cmd as trajectory_cmd
    import idiom_lens.datasets.selection as selection

    class ReachedModel(Exception):
        pass

    loaded: list[ProbeSet] = []
    real_load = selection.load_probes

    def recording_load(*args, **kwargs) -> ProbeSet:
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    def stop(args: SimpleNamespace) -> None:
        raise ReachedModel

    monkeypatch.setattr(cli, "_COMMANDS", ("trajectory",))
    monkeypatch.setattr(selection, "load_probes", recording_load)
    monkeypatch.setattr(trajectory_cmd, "load_from_args", stop)
    path = tmp_path / "idiomem.jsonl"
    path.write_text(PUBLISHED_PAIR, encoding="utf-8")
    with pytest.warns(UserWarning, match="renamed 1 repeated id"), pytest.raises(ReachedModel):
        cli.main(["trajectory", "--dataset", str(path), "--out", str(tmp_path / "out")])
    (probes,) = loaded
    assert [p.id for p in probes] == ["b0117bc748d35fe2dc73", "b0117bc748d35fe2dc73-2", "b05e010ca3576fbf6e81"]
    assert [(p.single_target, p.hard_to_guess) for p in probes] == [(False, False), (False, False), (True, True)]


def test_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idioms.csv"
    assert cli.main(["data", "export", "idioms", str(out)]) == 0
    assert load_probes(out).probes == load_probes("idioms").probes
    assert "wrote" in capsys.readouterr().out


def test_input_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "show", "idiomz"]) == 2
    assert "known sets are facts, idioms, implanted, text" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ice"}\n', encoding="utf-8")
    assert cli.main(["data", "show", str(bad)]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err


def test_build_without_packages_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from idiom_lens.datasets import build

    monkeypatch.setattr(build, "missing_build_packages", lambda: ["countryinfo"])
    assert cli.main(["data", "build"]) == 2
    err = capsys.readouterr().err
    assert "countryinfo" in err and "idiom-lens[build-data]" in err


def test_build_and_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's plumbing, with a stand-in builder (the real one is tested in test_build.py)."""
    from idiom_lens.datasets import build

    def fake_build_all(out_dir: Path) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "idioms.jsonl").write_text('{"text": "once in a blue moon"}\n', encoding="utf-8")
        return {"idioms": out_dir / "idioms.jsonl"}

    monkeypatch.setattr(build, "missing_build_packages", lambda: [])
    monkeypatch.setattr(build, "build_all", fake_build_all)
    assert cli.main(["data", "build", "--out", str(tmp_path)]) == 0
    assert "wrote idioms" in capsys.readouterr().out
    assert cli.main(["data", "build", "--check", "--out", str(tmp_path)]) == 0
    assert "byte for byte" in capsys.readouterr().out
    (tmp_path / "idioms.jsonl").write_text("changed\n", encoding="utf-8")
    assert cli.main(["data", "build", "--check", "--out", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().out


def test_build_implanted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data build --implanted [--check]` loads --model and writes only implanted.jsonl (stand-in builder and
    model; the real ones are tested in tests/analyses/test_implant_check.py and tests/datasets/test_implanted.py)."""
    import idiom_lens.analyses.implant_check as analysis
    import idiom_lens.cli.data_cmd as data_cmd
    from idiom_lens.datasets import build
    from idiom_lens.datasets.implanted import implanted_records

    records = implanted_records()[:3]
    models: list[str] = []

    def fake_load(args: SimpleNamespace) -> SimpleNamespace:
        models.append(args.model)
        return SimpleNamespace(spec=args.model)

    monkeypatch.setattr(build, "missing_build_packages", lambda: [])
    monkeypatch.setattr(build, "build_all", lambda out: pytest.fail("the model-free sets were built"))
    monkeypatch.setattr(data_cmd, "load_from_args", fake_load)
    monkeypatch.setattr(analysis, "build_implanted", lambda model: records)
    assert cli.main(["data", "build", "--implanted", "--model", "some-model", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert models == ["some-model"] and "wrote implanted" in out and "3 implanted idioms" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["implanted.jsonl"]
    assert implanted_records(tmp_path / "implanted.jsonl") == records
    assert cli.main(["data", "build", "--implanted", "--check", "--out", str(tmp_path)]) == 0
    assert "byte for byte: implanted" in capsys.readouterr().out
    monkeypatch.setattr(analysis, "build_implanted", lambda model: records[:2])
    assert cli.main(["data", "build", "--implanted", "--check", "--out", str(tmp_path)]) == 1
    assert "differs" in capsys.readouterr().out
    assert cli.main(["data", "build", "--model", "some-model", "--out", str(tmp_path)]) == 2
    assert "only apply with --implanted" in capsys.readouterr().err
