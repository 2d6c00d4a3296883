"""One writer per folder: a second process is refused (one line naming the folder and the holder's
PID, exit 2), a dead holder's lock is taken over with one log line, and a process may nest its
own locks. Every test holds the lock in a real second process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import idiom_lens.cli as cli
from idiom_lens.locks import LOCK_FILE, FolderInUse, folder_lock, lock_file

HOLDER = textwrap.dedent("""
    import sys, time
    from idiom_lens.locks import lock_file
    with lock_file(sys.argv[1], what="the test folder", log=print):
        print("locked", flush=True)
        sys.stdin.readline()  # hold until the test closes stdin (or kills this process)
""")


class Holder:
    """A second Python process holding the lock of `lock` until `release` (or `kill`)."""

    def __init__(self, lock: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "locked"
        self.pid = self.process.pid

    def release(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)


@pytest.fixture
def holder(tmp_path):
    """`holder(folder)`: a second process holding `folder`'s lock; released after the test."""
    started: list[Holder] = []

    def start(folder: Path) -> Holder:
        started.append(Holder(folder / LOCK_FILE))
        return started[-1]

    yield start
    for h in started:
        if h.process.poll() is None:
            h.kill()


def test_a_second_process_is_refused_naming_the_folder_and_the_holder(tmp_path, holder):
    first = holder(tmp_path / "out")
    with pytest.raises(FolderInUse) as refused:
        with folder_lock(tmp_path / "out"):
            pytest.fail("two processes held one folder's lock")
    message = str(refused.value)
    assert str(tmp_path / "out") in message and f"PID {first.pid}" in message and "\n" not in message
    first.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # a clean release leaves no file behind
    with folder_lock(tmp_path / "out", log=pytest.fail):  # and nothing to take over
        pass


def test_the_lock_of_a_dead_process_is_taken_over_with_one_line(tmp_path, holder):
    dead = holder(tmp_path / "out")
    dead.kill()
    lines: list[str] = []
    with folder_lock(tmp_path / "out", log=lines.append):
        assert (tmp_path / "out" / LOCK_FILE).read_text().startswith(f"pid={os.getpid()}\n")
    assert len(lines) == 1 and f"PID {dead.pid}" in lines[0] and "no longer running" in lines[0]
    assert not (tmp_path / "out" / LOCK_FILE).exists()  # released cleanly: no file left


def test_a_process_nests_its_own_locks(tmp_path, holder):
    with folder_lock(tmp_path / "out"):
        with folder_lock(tmp_path / "out"):  # run_study inside a locked `idiom-lens run`
            pass
        # still held after the inner block: another process is refused
        probe = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path / "out" / LOCK_FILE)],
                               input="", capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0 and "FolderInUse" in probe.stderr and f"PID {os.getpid()}" in probe.stderr
    holder(tmp_path / "out").release()  # and free once the outer block ends


@pytest.mark.parametrize("command", [
    ["run", "--limit", "2"],
    ["trace", "--dataset", "idioms", "--limit", "2"],
    ["knockout", "--dataset", "idioms", "--limit", "2"],
    ["attn-knockout", "--dataset", "idioms", "--limit", "2"],
    ["trajectory", "--dataset", "idioms", "--limit", "2"],
    ["patch", "--dataset", "idioms", "--limit", "2"],
    ["attribute-set", "--dataset", "idioms", "--limit", "2"],
])
def test_commands_that_write_a_folder_exit_2_while_another_process_writes_it(tmp_path, holder, capsys, command,
                                                                               tiny_model_dir):
    first = holder(tmp_path / "out")
    assert cli.main([*command, "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "out") in err and f"PID {first.pid}" in err


def test_compare_and_report_lock_the_results_folder(tmp_path, holder, capsys):
    (tmp_path / "results").mkdir()
    first = holder(tmp_path / "results")
    for command in (["compare"], ["report"]):
        assert cli.main([*command, "--results", str(tmp_path / "results")]) == 2
        assert f"PID {first.pid}" in capsys.readouterr().err


def test_idiom_lens_run_in_a_second_process_exits_2(tmp_path, holder, tiny_model_dir):
    """The whole command line, as a user runs it twice into one folder."""
    first = holder(tmp_path / "out")
    second = subprocess.run([sys.executable, "-m", "idiom_lens", "run", "--model", str(tiny_model_dir), "--limit", "2",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"idiom-lens run: error: the folder {tmp_path / 'out'} is in use by another "
                                     f"idiom-lens process, PID {first.pid} (-c {tmp_path / 'out' / LOCK_FILE}): "
                                     "wait for it to finish or write somewhere else")


def test_run_study_holds_the_lock_from_python(tmp_path, holder, tiny_model):
    from idiom_lens.study import StudyOptions, run_study

    holder(tmp_path / "out")
    with pytest.raises(FolderInUse):
        run_study(tiny_model, tmp_path / "out", StudyOptions(limit=2), report=False, log=lambda s: None)
    assert not (tmp_path / "out" / "study.json").exists()  # refused before writing anything


def test_lens_training_locks_its_cache_entry(tmp_path, holder, tiny_model, monkeypatch):
    from idiom_lens.lenses.cache import LensSettings, lens_path, train_lens

    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    settings = LensSettings(corpus="samples", steps=2, n_samples=4)
    path = lens_path(tiny_model, "tuned", settings, ["a prompt"])
    first = Holder(path.with_suffix(".lock"))
    try:
        with pytest.raises(FolderInUse, match=f"PID {first.pid}"):
            train_lens(tiny_model, "tuned", settings=settings, prompts=["a prompt"], progress=False, log=lambda s: None)
        assert not path.with_suffix(".work").exists()
    finally:
        first.release()
    lens = train_lens(tiny_model, "tuned", settings=settings, prompts=["a prompt"], progress=False, log=lambda s: None)
    assert path.is_file() and lens.kind == "tuned"


def test_the_lock_file_is_hidden_from_result_listings_while_held(tmp_path):
    from folders import result_files

    with lock_file(tmp_path / LOCK_FILE, what="x"):
        (tmp_path / "summary.json").write_text("{}")
        assert (tmp_path / LOCK_FILE).is_file() and result_files(tmp_path) == ["summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_waiting_lock_waits_for_the_holder_then_takes_it(tmp_path, holder):
    first = holder(tmp_path / "cache")
    lines: list[str] = []
    released: list[bool] = []
    timer = threading.Timer(1.0, lambda: released.append(True) or first.release())
    timer.start()
    with lock_file(tmp_path / "cache" / LOCK_FILE, what="the cache entry", wait=True, log=lines.append):
        assert released  # the lock came only after the holder let it go
    timer.join()  # the holder has exited (0)
    assert len(lines) == 1 and lines[0].startswith("waiting for the cache entry") and f"PID {first.pid}" in lines[0]


def test_a_model_cache_entry_being_built_is_waited_for_not_built_twice(tmp_path, monkeypatch, capsys):
    """Two processes that need the converted model at once (two test workers, a notebook beside a
    run): the second waits for the first's build and uses it."""
    from idiom_lens.models import loading

    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    entry = loading.cache_dir() / "models" / "m"
    first = Holder(entry.parent / ".m.lock")  # the first process, building the entry
    monkeypatch.setattr(loading, "_is_complete", lambda target: (target / "built").is_file())
    monkeypatch.setattr(loading, "_loads", lambda target: True)
    monkeypatch.setattr(loading, "_convert_gguf", lambda *a, **k: pytest.fail("the model was built twice"))

    def finish() -> None:
        entry.mkdir(parents=True)
        (entry / "built").touch()
        first.release()

    timer = threading.Timer(1.0, finish)
    timer.start()
    assert loading.ensure_converted_gguf(tmp_path / "x.gguf", name="m", progress=False) == entry
    timer.join()
    assert f"waiting for the model cache entry {entry}" in capsys.readouterr().err
