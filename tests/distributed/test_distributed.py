"""Sweeps on Ray workers (`idiom_lens.study.executors`) give the files of one process, survive a
killed worker and a killed driver. Every comparison is against the plain single-process path's
files, never a path with itself.

Two local CPU workers, one torch thread each, in one small Ray session per module (no dashboard,
a 200 MiB object store). Skipped only where Ray is not installed.

torch's fp32 CPU kernels give results that depend on the number of threads in the last bits
(measured: up to 1.5e-7 in knockout probabilities at the last position, with a prefix cache).
So the single-process reference runs with the workers' one thread, and then every parquet file
must be equal to the last bit: what sharding and merging must not change. One more test compares
with a reference at this process's default thread count, within fp32 noise.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions

ray = pytest.importorskip("ray")

from folders import comparable, result_files  # noqa: E402  (tests/folders.py)
from tolerances import probes_prob_atol  # noqa: E402  (tests/tolerances.py: why each bound)

import idiom_lens.cli as cli  # noqa: E402
from idiom_lens.analyses.saved import decode_array  # noqa: E402
from idiom_lens.faults import ENV  # noqa: E402
from idiom_lens.study.executors import RayExecutor  # noqa: E402
from idiom_lens.study.stages import resumable_trajectory, run_knockouts, write_trajectory_outputs  # noqa: E402
from idiom_lens.study.workers import ModelRecipe, WorkerOptions  # noqa: E402

# One local Ray at a time: under pytest-xdist (`make test`) these tests share one worker.
pytestmark = pytest.mark.xdist_group("ray")

# A small knockout grid: 2 k x windows of 1-2 layers, both modes, every control, both positions.
GRID = dict(options=KnockoutOptions(grid=KnockoutGrid(ks=(1, 10), windows=(1, 2), modes=("zero_top", "keep_top"),
                                                     keep_top_ks=(10,), keep_top_windows=(1,))),
            compare_positions=True, value_vector_ks=(1,), png=False)


@contextlib.contextmanager
def threads(n: int):
    """torch threads of this process (where the single-process reference runs) for a block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module: 2 CPUs, no dashboard, a small object store, quiet."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="ERROR",
             log_to_driver=False)
    yield
    ray.shutdown()


def pool_for(spec: str, **kwargs: Any) -> RayExecutor:
    """Two workers of one torch thread each on the module's Ray."""
    return RayExecutor(ModelRecipe(spec=spec), WorkerOptions(workers=2, threads=1), log=lambda line: None, **kwargs)


def assert_same_folder(got: Path, want: Path) -> None:
    """The same visible files; every parquet equal (rows, order, dtypes, exact values); every
    JSON equal but for timings; Markdown equal."""
    names = result_files(want)
    assert result_files(got) == names, set(result_files(got)) ^ set(names)
    assert any(n.endswith(".parquet") for n in names)
    for name in names:
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(got / name), pd.read_parquet(want / name),
                                          check_exact=True, obj=name)
        elif name.endswith(".json"):
            assert comparable(json.loads((got / name).read_text())) == \
                comparable(json.loads((want / name).read_text())), name
        elif name.endswith(".md"):
            assert (got / name).read_text() == (want / name).read_text(), name


def assert_close_folder(got: Path, want: Path, noise: float) -> None:
    """The same files; every parquet with the same rows and columns, non-float columns equal,
    float columns within fp32 noise (another thread count's): `noise` (a probability's, see
    tests/tolerances.py) times the column's scale, for logits, effects and ratios alike."""
    names = result_files(want)
    assert result_files(got) == names
    for name in (n for n in names if n.endswith(".parquet")):
        a, b = pd.read_parquet(got / name), pd.read_parquet(want / name)
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for column in a.columns:
            if pd.api.types.is_float_dtype(a[column]):
                scale = max(1.0, float(np.nanmax(np.abs(b[column].to_numpy()), initial=0.0)))
                np.testing.assert_allclose(a[column], b[column], rtol=0, atol=noise * scale,
                                           err_msg=f"{name}: {column}")
            elif column == "data" and {"dtype", "shape"} <= set(a.columns):  # arrays saved by `encode_array`
                for row in range(len(a)):
                    left, right = (decode_array(t["dtype"].iloc[row], t["shape"].iloc[row], t["data"].iloc[row])
                                   for t in (a, b))
                    scale = max(1.0, float(np.abs(right).max(initial=0.0)))
                    np.testing.assert_allclose(left, right, rtol=0, atol=noise * scale, err_msg=f"{name}: data[{row}]")
            else:
                pd.testing.assert_series_equal(a[column], b[column], obj=f"{name}: {column}")


def trajectory_folder(model, probes, out: Path, executor=None) -> Path:
    result = resumable_trajectory(model, probes, out, sites=("resid_post", "mlp_out"), batch_size=2, part_size=3,
                                  progress=False, log=lambda line: None, executor=executor)
    write_trajectory_outputs(result, out, png=False)
    return out


def knockout_folder(model, probes, out: Path, executor=None) -> Path:
    run_knockouts(model, probes, out, **GRID, log=lambda line: None, executor=executor)
    return out


# --------------------------------------------------------------------------------------
# 1. Two workers give the single-process files
# --------------------------------------------------------------------------------------


def test_trajectory_and_knockouts_on_two_workers_equal_one_process(ray_session, tiny_model, tiny_model_dir, probes,
                                                                    tmp_path):
    with pool_for(str(tiny_model_dir)) as pool:
        trajectory_folder(tiny_model, probes, tmp_path / "traj2", executor=pool)
        knockout_folder(tiny_model, probes[:5], tmp_path / "knock2", executor=pool)
        assert len(set(pool.pids()) | {os.getpid()}) == 3  # two worker processes besides this one
    with threads(1):
        assert_same_folder(tmp_path / "traj2", trajectory_folder(tiny_model, probes, tmp_path / "traj1"))
        assert_same_folder(tmp_path / "knock2", knockout_folder(tiny_model, probes[:5], tmp_path / "knock1"))
    assert len(list((tmp_path / "traj2" / ".parts").glob("*/.part.json"))) == 4  # 10 probes in parts of 3
    assert list((tmp_path / "knock2" / ".parts").iterdir())  # hidden parts: not among the visible files


def run_here(args: list[str]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(args)
    assert code == 0, buffer.getvalue()
    return buffer.getvalue()


RUN_OPTIONS = ["--limit", "3", "--part-size", "4", "--no-png", "--knockout-sample", "1", "--patching-sample", "1",
               "--attribution-sample", "1", "--tracing-sample", "1", "--attn-knockout-sample", "1"]


def test_run_with_two_workers_equals_run(ray_session, tiny_model, tiny_model_dir, probes, tmp_path):
    """`idiom-lens run --workers 2` writes the folder of `idiom-lens run`: every stage."""
    base = ["run", "--model", str(tiny_model_dir), *RUN_OPTIONS]
    with threads(1):
        run_here([*base, "--out", str(tmp_path / "one")])
    log = run_here([*base, "--out", str(tmp_path / "two"), "--workers", "2", "--worker-threads", "1"])
    assert "2 workers, 1 torch thread each" in log
    # The sweeps ran on 1-thread workers, but the attribution stage runs in this driver at its own
    # thread count, which changes the last bits under some kernels (seen with forced AVX2): the
    # whole study within fp32 noise, ids and flags exactly (the sweeps bit for bit: tests above)
    noise = probes_prob_atol(tiny_model, probes)
    assert_close_folder(tmp_path / "two" / tiny_model_dir.name, tmp_path / "one" / tiny_model_dir.name, noise=noise)
    rerun = run_here([*base, "--out", str(tmp_path / "two")])  # and the folders are interchangeable
    assert "recomputing" not in rerun and rerun.count("already done, reusing") == 5
    # against a plain run at this process's default threads: equal within fp32 noise, ids and flags exact
    run_here([*base, "--out", str(tmp_path / "default")])
    assert_close_folder(tmp_path / "two" / tiny_model_dir.name, tmp_path / "default" / tiny_model_dir.name, noise=noise)


# --------------------------------------------------------------------------------------
# 2. Faults: a worker killed mid-run, a driver killed mid-run
# --------------------------------------------------------------------------------------


def test_worker_killed_mid_run_loses_nothing(ray_session, tiny_model, tiny_model_dir, probes, tmp_path):
    killed: list[int] = []

    def kill_once(pool: RayExecutor, n_done: int) -> None:
        if n_done == 2 and not killed:  # parts and probes are still queued and running
            killed.append(pool.pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    with pool_for(str(tiny_model_dir), on_result=kill_once) as pool:
        traj = tmp_path / "traj2"
        result = resumable_trajectory(tiny_model, probes, traj, sites=("resid_post", "mlp_out"), batch_size=2,
                                      part_size=1, progress=False, log=lambda line: None, executor=pool)
        write_trajectory_outputs(result, traj, png=False)
        assert killed and killed[0] not in pool.pids()  # the worker was restarted by Ray
        killed.clear()
        knockout_folder(tiny_model, probes[:5], tmp_path / "knock2", executor=pool)
        assert killed and killed[0] not in pool.pids()

    want = tmp_path / "traj1"
    with threads(1):
        write_trajectory_outputs(resumable_trajectory(tiny_model, probes, want, sites=("resid_post", "mlp_out"),
                                                      batch_size=2, part_size=1, progress=False,
                                                      log=lambda line: None), want, png=False)
        assert_same_folder(traj, want)
        assert_same_folder(tmp_path / "knock2", knockout_folder(tiny_model, probes[:5], tmp_path / "knock1"))


def test_driver_killed_mid_run_resumes(ray_session, tiny_model_dir, tmp_path):
    """`idiom-lens trajectory --workers 2`, SIGKILLed after its first part: the next invocation
    reuses that part, computes the rest and writes the files of an uninterrupted single-process run."""
    args = ["trajectory", "--dataset", "idioms", "--limit", "9", "--part-size", "3", "--no-png",
            "--model", str(tiny_model_dir)]
    killed = subprocess.run([sys.executable, "-m", "idiom_lens", *args, "--out", str(tmp_path / "two"),
                             "--workers", "2", "--worker-threads", "1"],
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {ENV: "trajectory.part"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert len(list((tmp_path / "two" / ".parts").glob("*/.part.json"))) == 1
    log = run_here([*args, "--out", str(tmp_path / "two"), "--workers", "2", "--worker-threads", "1"])
    assert log.count(": reusing trajectory-") == 1  # the part that finished first (any of the three)
    with threads(1):
        run_here([*args, "--out", str(tmp_path / "one")])
    assert_same_folder(tmp_path / "two", tmp_path / "one")


# --------------------------------------------------------------------------------------
# 3. The embedded model
# --------------------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_on_two_workers_equals_one_process(ray_session, embedded_model, tmp_path):
    from idiom_lens.datasets import load_probes

    probes = list(load_probes("idioms"))[:6] + list(load_probes("text"))[:2]  # parts of 3: three parts
    with pool_for("gemma-3-270m") as pool:
        trajectory_folder(embedded_model, probes, tmp_path / "traj2", executor=pool)
        grid = KnockoutGrid(ks=(10,), windows=(1,), modes=("zero_top",), keep_top_ks=None, keep_top_windows=None)
        run_knockouts(embedded_model, probes[:2], tmp_path / "knock2", options=KnockoutOptions(grid=grid),
                      value_vector_ks=(), skip=False, png=False, log=lambda line: None, executor=pool)
    with threads(1):
        assert_same_folder(tmp_path / "traj2", trajectory_folder(embedded_model, probes, tmp_path / "traj1"))
        run_knockouts(embedded_model, probes[:2], tmp_path / "knock1", options=KnockoutOptions(grid=grid),
                      value_vector_ks=(), skip=False, png=False, log=lambda line: None)
    assert_same_folder(tmp_path / "knock2", tmp_path / "knock1")
