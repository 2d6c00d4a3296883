"""`--workers`, `--ray-address` and `--worker-threads`: checked before anything runs, with or
without Ray installed (these tests need neither Ray nor a model)."""

from __future__ import annotations

import pytest

import idiom_lens.cli as cli
import idiom_lens.study.workers as workers
from idiom_lens.errors import InputError
from idiom_lens.study import StudyOptions


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr(workers, "ray_available", lambda: False)


@pytest.mark.parametrize("command", [
    ["trajectory", "--dataset", "idioms", "--out", "OUT"],
    ["knockout", "--dataset", "idioms", "--out", "OUT"],
    ["patch", "--dataset", "idioms", "--out", "OUT"],
    ["trace", "--dataset", "idioms", "--out", "OUT"],
    ["attn-knockout", "--dataset", "idioms", "--out", "OUT"],
    ["run", "--out", "OUT"],
])
def test_workers_without_ray_is_one_clear_line(command, no_ray, tmp_path, capsys):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert cli.main([*args, "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "--workers 2 needs Ray, which is not installed: pip install idiom-lens[distributed]" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_ray_address_without_ray(no_ray):
    with pytest.raises(InputError, match=r"--ray-address auto needs Ray.*pip install idiom-lens\[distributed\]"):
        workers.WorkerOptions(address="auto")


def test_one_worker_needs_no_ray(no_ray):
    options = workers.WorkerOptions(workers=1)
    assert not options.distributed
    assert not StudyOptions(workers=1).worker_options().distributed


@pytest.mark.parametrize("option, value, message", [
    ("--workers", "0", "--workers must be a whole number >= 1 (Ray workers, each holding the model), got 0"),
    ("--worker-threads", "0", "--worker-threads must be a whole number >= 1 (torch threads per worker), got 0"),
    ("--probes-per-task", "0", "--probes-per-task must be a whole number >= 1 (probes per Ray task), got 0"),
])
def test_bad_worker_values(option, value, message, tmp_path, capsys):
    assert cli.main(["trajectory", "--dataset", "idioms", "--out", str(tmp_path), option, value]) == 2
    assert message in capsys.readouterr().err


def test_indexed_cuda_device_with_workers(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(workers, "ray_available", lambda: True)
    assert cli.main(["knockout", "--dataset", "idioms", "--out", str(tmp_path), "--workers", "2",
                     "--device", "cuda:1"]) == 2
    assert "--device cuda:1: with --workers give --device cuda" in capsys.readouterr().err


def test_tasks_are_one_per_worker_of_equal_work_unless_given(monkeypatch):
    monkeypatch.setattr(workers, "ray_available", lambda: True)  # sizing needs no Ray
    one, two = workers.WorkerOptions(workers=1), workers.WorkerOptions(workers=2)
    assert one.task_sizes(10) == [10] and one.task_sizes(1) == [1] and one.task_sizes(0) == []
    # 6 probes on 2 workers: one task of 3 each; 7: 4 and 3
    assert two.task_sizes(6) == [3, 3] and two.task_sizes(7) == [4, 3] and two.task_sizes(1) == [1]
    for w in (2, 3, 5):
        for n in range(1, 40):
            sizes = workers.WorkerOptions(workers=w).task_sizes(n)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert len(sizes) == min(w, n)
    options = workers.WorkerOptions(workers=1, probes_per_task=3)
    assert options.task_sizes(10) == [3, 3, 3, 1] and options.task_sizes(2) == [2]  # a short part: one task
    assert StudyOptions(probes_per_task=4).worker_options().probes_per_task == 4


def test_workers_are_in_no_stage_key():
    """Like batch_size, the pool changes speed, not results: a folder written with workers and
    one written without are interchangeable."""
    from idiom_lens.study.parts import NOT_IN_KEY

    assert "executor" in NOT_IN_KEY


def test_every_sweeping_command_has_the_worker_options():
    """--workers, --ray-address and --worker-threads, built by `add_worker_options`, in every
    command that sweeps a probe set (attribute-set runs one forward pass per batch: not a sweep)."""
    from idiom_lens.cli import common

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    for command in ("trajectory", "knockout", "patch", "trace", "attn-knockout", "run"):
        actions = {a.option_strings[0]: a for a in sub.choices[command]._actions if a.option_strings}
        assert actions["--workers"].help == common.WORKERS_HELP and actions["--workers"].default is None, command
        assert actions["--ray-address"].help == common.RAY_ADDRESS_HELP, command
        assert actions["--worker-threads"].help == common.WORKER_THREADS_HELP, command
