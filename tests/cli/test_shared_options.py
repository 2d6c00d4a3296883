"""One meaning per CLI option: every command that takes a shared option (`--dataset`, `--limit`,
`--sample`, `--seed`, `--out`, `--batch-size`, `--no-png`, `--results`) takes it from
`idiom_lens.cli.common`, with the same help, the same parsing and the same error message.

The commands are found by walking the real parser (all modules of `idiom_lens.cli._COMMANDS`), so a
new command is covered without editing this file. Bad values are rejected before any handler runs:
no model is loaded here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import idiom_lens.cli as cli
from idiom_lens.cli import common

SHARED = ("--dataset", "--limit", "--sample", "--seed", "--out", "--batch-size", "--no-png", "--results")


def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every runnable (sub)command, each once (aliases skipped)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    seen: set[int] = set()
    for name, sub in subs[0].choices.items():
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        yield from _leaf_parsers(sub, (*path, name))


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


def _commands_with(flag: str) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    return [(path, p) for path, p in _leaf_parsers(cli.build_parser()) if _option(p, flag) is not None]


def _argv(path: tuple[str, ...], parser: argparse.ArgumentParser, tmp_path: Path, **given: str) -> list[str]:
    """A command line of `path` with every required argument filled in, plus `given` options."""
    argv = list(path)
    for action in parser._actions:
        flag = action.option_strings[0] if action.option_strings else None
        if flag is not None and flag.lstrip("-").replace("-", "_") in given:
            continue
        if not action.option_strings and action.required and action.nargs != argparse.PARSER:
            argv.append("x")  # TEXT / NAME|PATH
        elif action.option_strings and action.required:
            argv += [flag, str(tmp_path / "out") if flag == "--out" else "idioms"]
    for name, value in given.items():
        argv += [f"--{name.replace('_', '-')}", value]
    return argv


def _error(capsys: pytest.CaptureFixture[str], path: tuple[str, ...]) -> str:
    """The one error line of a failed command, without its `idiom-lens CMD: error: ` prefix."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    prefix = f"idiom-lens {path[0]}: error: "
    assert err[0].startswith(prefix), err
    return err[0][len(prefix):]


def test_every_probe_set_command_has_the_shared_options():
    """The commands that read probe sets take --dataset, --limit and --seed; those that draw figures, --no-png."""
    names = {path: p for path, p in _leaf_parsers(cli.build_parser())}
    for command in ("trajectory", "attribute-set", "knockout", "patch", "run"):
        for flag in ("--dataset", "--limit", "--seed", "--out", "--batch-size", "--no-png"):
            assert _option(names[(command,)], flag) is not None, (command, flag)
    for command in ("trajectory", "attribute-set", "knockout", "patch"):
        assert _option(names[(command,)], "--sample") is not None, command
    assert _option(names[("run",)], "--sample") is None  # run samples per comparison set per stage
    assert _option(names[("data", "show")], "--limit") is not None
    assert _option(names[("compare",)], "--no-png") is not None


@pytest.mark.parametrize("flag", SHARED)
def test_shared_option_is_parsed_and_documented_the_same_everywhere(flag):
    actions = {path: _option(p, flag) for path, p in _commands_with(flag)}
    assert len(actions) >= 2, f"{flag} is in fewer than two commands: {sorted(actions)}"
    base_help = {"--dataset": common.DATASET_HELP, "--limit": common.LIMIT_HELP, "--sample": common.SAMPLE_HELP,
                 "--seed": common.SEED_HELP, "--out": common.OUT_HELP, "--batch-size": common.BATCH_HELP,
                 "--no-png": common.PNG_HELP, "--results": common.RESULTS_HELP}[flag]
    for path, action in actions.items():
        assert action.help.startswith(base_help), (path, action.help)
        if flag == "--dataset":
            assert action.nargs == "+" and action.metavar == "NAME|PATH", path
        if flag in ("--out", "--results"):
            assert action.type is Path and action.metavar == "DIR", path  # a folder, everywhere
        if flag in ("--limit", "--sample"):
            assert action.default is None and action.type is int, path  # absent = all
        if flag == "--seed":
            assert action.default == 0 and action.type is int, path
        if flag == "--batch-size":
            assert action.type is int and action.default >= 1, path
        if flag == "--no-png":
            assert isinstance(action, argparse._StoreTrueAction) and action.dest == "no_png", path


def test_no_command_has_a_mode_option():
    """Numerics are fixed by each command (attribution: compat, the rest: raw): no --mode to ignore."""
    for path, parser in _leaf_parsers(cli.build_parser()):
        assert _option(parser, "--mode") is None, path


@pytest.mark.parametrize(("option", "value", "message"), [
    ("limit", "0", "--limit must be a whole number >= 1 (the first N probes of each set; leave it out for all), got 0"),
    ("limit", "-2",
     "--limit must be a whole number >= 1 (the first N probes of each set; leave it out for all), got -2"),
    ("sample", "0",
     "--sample must be a whole number >= 1 (a seeded sample of N probes of each set; leave it out for all), got 0"),
    ("batch_size", "0", "--batch-size must be a whole number >= 1 (sequences per forward pass), got 0"),
])
def test_bad_count_is_the_same_input_error_in_every_command(option, value, message, tmp_path, capsys):
    """`--limit 0` (and friends) is one clean line and exit 2 in every command, with one message."""
    commands = _commands_with(f"--{option.replace('_', '-')}")
    assert commands
    for path, parser in commands:
        assert cli.main(_argv(path, parser, tmp_path, **{option: value})) == 2, path
        assert _error(capsys, path) == message, path


def test_out_is_a_folder_in_every_command(tmp_path, capsys):
    """An existing file given as --out is refused the same way everywhere, before anything runs."""
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("not a folder\n")
    commands = _commands_with("--out")
    assert {path[0] for path, _ in commands} >= {"trajectory", "attribute-set", "knockout", "patch", "run", "report"}
    for path, parser in commands:
        assert cli.main(_argv(path, parser, tmp_path, out=str(a_file))) == 2, path
        assert _error(capsys, path) == f"--out must be a folder, but {a_file} is a file", path


def test_check_shared_options_raises_input_error():
    from idiom_lens.errors import InputError

    with pytest.raises(InputError, match="--limit must be a whole number >= 1"):
        common.check_shared_options(argparse.Namespace(limit=0))
    common.check_shared_options(argparse.Namespace(limit=None, sample=3, batch_size=1))


def test_select_probes_limit_then_seeded_sample_per_set():
    """--limit takes the first N of each set, --sample a seeded N of each set (after --limit), in file order."""
    from idiom_lens.datasets import load_probes

    ns = argparse.Namespace(dataset=["idioms", "facts"], limit=10, sample=3, seed=0)
    chosen = common.select_probes(ns)
    idioms, facts = (list(load_probes(n))[:10] for n in ("idioms", "facts"))
    assert len(chosen) == 6
    assert [p for p in chosen if p in idioms] == chosen[:3] and [p for p in chosen if p in facts] == chosen[3:]
    assert chosen[:3] == sorted(chosen[:3], key=idioms.index)
    assert common.select_probes(ns) == chosen
    assert common.select_probes(argparse.Namespace(dataset=["idioms"], limit=4, sample=None, seed=0)) == idioms[:4]


def test_report_out_is_a_folder_and_html_names_the_file(monkeypatch, tmp_path, capsys):
    """`report --out DIR` writes DIR/report.html; `--html FILE` names the file; an .html --out says to use --html."""
    import idiom_lens.study.report as report

    written: list[Path | None] = []

    def fake_build_report(results_dir, *, out_path=None):
        path = Path(out_path) if out_path is not None else Path(results_dir) / "report.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("<html></html>")
        written.append(out_path)
        return path

    monkeypatch.setattr(report, "build_report", fake_build_report)
    results = tmp_path / "results"
    assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "site")]) == 0
    assert (tmp_path / "site" / "report.html").is_file() and written[-1] == tmp_path / "site" / "report.html"
    assert cli.main(["report", "--results", str(results), "--html", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").is_file()
    assert cli.main(["report", "--results", str(results)]) == 0
    assert written[-1] is None  # the default: RESULTS/report.html
    capsys.readouterr()
    assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "mine.html")]) == 2
    assert "use --html" in _error(capsys, ("report",))
    with pytest.raises(SystemExit):  # --out and --html together: argparse usage error
        cli.main(["report", "--out", str(tmp_path / "d"), "--html", str(tmp_path / "f.html")])


def test_data_show_without_limit_shows_all(capsys):
    from idiom_lens.datasets import load_probes

    assert cli.main(["data", "show", "facts"]) == 0
    n = len(load_probes("facts"))
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"({n} of {n} ")
