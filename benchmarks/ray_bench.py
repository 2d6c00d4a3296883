"""Sweeps on Ray workers vs one process, on the embedded model (needs the `distributed` extra).

    python benchmarks/ray_bench.py [--trajectory N] [--knockout N] [--repeats R (default 5)]

Four ways to run the same sweep, each timed R times on fresh output folders (nothing reused),
the workers started and holding the model before the clock starts:
- plain: this process, 2 torch threads, no Ray (`--workers` left out);
- 1x1: one Ray worker with 1 thread (the unit the scaling is measured against);
- 1x2: one Ray worker with 2 threads;
- 2x1: two Ray workers with 1 thread each.
Sweeps: the trajectory (memorization + logit lens at resid_post, as `idiom-lens run`) of N
seeded idioms in parts of 32 (the parts are the workers' tasks), and the knockout stage of
`idiom-lens run` (top-100 per layer, windows of one layer, random, matched and whole-MLP
controls: 72 configurations per probe, plus layer skipping) on N seeded idioms.

Prints, per sweep, the median time and spread (min-max), probes per second, the speed-ups 2x1
over 1x1 (scaling with workers; goal >= 1.8), 2x1 over 1x2 (throughput) and 2x1 over plain
(goal >= 1 for the knockouts), each as the ratio of the median times with a 95%
percentile-bootstrap interval over the repeats (each way's runs resampled on their own, 2,000
resamples) and the range over every pair of runs (slowest over fastest and back), Ray's overhead
per probe (1x2 minus plain, per probe: tasks, transfers, the driver writing parts, each task's
self-check), the round trip of an empty task, and each worker's resident memory. Every figure is
of the runs measured here, on this machine's cores and these sweep sizes: nothing is scaled to
other core counts, worker counts or sweep sizes. Run it on an otherwise idle machine, with at
least 5 repeats (the default) for an interval worth reading.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def _empty(model: Any, probes: list) -> int:
    """A task that does nothing: the per-task round trip of the pool."""
    return len(probes)


def _timed(fn: Callable[[Path], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            fn(Path(tmp))
            times.append(time.perf_counter() - started)
    return times


@dataclass(frozen=True)
class Speedup:
    """How much faster `fast` ran than `slow`: the ratio of their median times, its 95% percentile-
    bootstrap interval over the repeats (ratio_low, ratio_high), and the range over every pair of
    one run of each (pair_min = min(slow) / max(fast), pair_max = max(slow) / min(fast))."""

    ratio: float
    ratio_low: float
    ratio_high: float
    pair_min: float
    pair_max: float
    n_slow: int
    n_fast: int

    def text(self) -> str:
        return (f"{self.ratio:.2f}x (95% bootstrap [{self.ratio_low:.2f}, {self.ratio_high:.2f}] over "
                f"{self.n_slow} and {self.n_fast} runs; every pair of runs [{self.pair_min:.2f}, {self.pair_max:.2f}])")


def speedup(slow: list[float], fast: list[float], *, n_boot: int = 2000, seed: int = 0) -> Speedup:
    """`Speedup` of the runs `fast` over the runs `slow` (seconds each; each way resampled on its
    own, as the repeats of two ways are not paired). With one run each the interval is the ratio."""
    from idiom_lens.analyses.stats import bootstrap

    if not slow or not fast or min(slow) <= 0 or min(fast) <= 0:
        raise ValueError(f"speedup needs positive times of at least one run each, got {slow} and {fast}")
    a, b = np.asarray(slow, dtype=np.float64), np.asarray(fast, dtype=np.float64)

    def ratio_of_medians(boot_a: np.ndarray, boot_b: np.ndarray) -> np.ndarray:
        return np.median(boot_a, axis=1) / np.median(boot_b, axis=1)

    low, high = bootstrap((a, b), ratio_of_medians, n_boot=n_boot, rng=seed, paired=False)
    return Speedup(ratio=float(np.median(a) / np.median(b)), ratio_low=float(low), ratio_high=float(high),
                   pair_min=float(a.min() / b.max()), pair_max=float(a.max() / b.min()), n_slow=len(a), n_fast=len(b))


def _line(name: str, times: list[float], n: int) -> str:
    med = statistics.median(times)
    return (f"  {name:<6} median {med:7.2f} s (min {min(times):.2f}, max {max(times):.2f}, n={len(times)}), "
            f"{n / med:6.2f} probes/s")


# (name, Ray workers or None for the plain loop, torch threads per worker)
WAYS: tuple[tuple[str, int | None, int], ...] = (("plain", None, 2), ("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectory", type=int, default=128, help="idioms in the trajectory sweep (default 128)")
    parser.add_argument("--knockout", type=int, default=6, help="idioms in the knockout sweep (default 6)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per way and sweep (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    import ray
    import torch

    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.selection import sample_probes
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.executors import RayExecutor, Unit
    from idiom_lens.study.run import StudyOptions
    from idiom_lens.study.stages import resumable_trajectory, run_knockouts
    from idiom_lens.study.workers import ModelRecipe, WorkerOptions

    torch.set_num_threads(2)
    model = load_model("gemma-3-270m", progress=False)
    idioms = list(load_probes("idioms"))
    traj_probes = sample_probes(idioms, args.trajectory, seed=args.seed)
    ko_probes = sample_probes(idioms, args.knockout, seed=args.seed + 1)
    quiet = lambda line: None  # noqa: E731
    study = StudyOptions(seed=args.seed)
    knock_options = {"options": dataclasses.replace(study.knockouts, seed=study.seed),
                     "value_vector_ks": study.value_vector_ks, "png": False}

    def trajectory(pool: Any) -> Callable[[Path], Any]:
        return lambda out: resumable_trajectory(model, traj_probes, out, sites=("resid_post",), batch_size=16,
                                                part_size=32, progress=False, log=quiet, executor=pool)

    def knockouts(pool: Any) -> Callable[[Path], Any]:
        return lambda out: run_knockouts(model, ko_probes, out, **knock_options, log=quiet, executor=pool)

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="ERROR",
             log_to_driver=False)
    timings: dict[tuple[str, str], list[float]] = {}
    memory: list[int] = []
    empty_ms = 0.0
    for name, workers, threads in WAYS:
        pool = None
        if workers is not None:
            options = WorkerOptions(workers=workers, threads=threads, address="auto")
            pool = RayExecutor(ModelRecipe(spec="gemma-3-270m"), options, log=quiet)
            pool.start()
        timings[("trajectory", name)] = _timed(trajectory(pool), args.repeats)
        timings[("knockouts", name)] = _timed(knockouts(pool), args.repeats)
        if name == "1x2":
            n = 64
            started = time.perf_counter()
            pool.map([Unit(_empty, (p,)) for p in traj_probes[:n]])
            empty_ms = 1000 * (time.perf_counter() - started) / n
        if name == "2x1":
            memory = pool.memory()
        if pool is not None:
            pool.close()
        print(f"{name} done", flush=True)
    ray.shutdown()

    print(f"\nEmbedded model, {torch.get_num_threads()} driver threads; repeats={args.repeats}")
    for sweep, n in (("trajectory", len(traj_probes)), ("knockouts", len(ko_probes))):
        print(f"{sweep} ({n} idioms):")
        for name, _, _ in WAYS:
            print(_line(name, timings[(sweep, name)], n))
        med = {name: statistics.median(timings[(sweep, name)]) for name, _, _ in WAYS}
        scaling = speedup(timings[(sweep, "1x1")], timings[(sweep, "2x1")], seed=args.seed)
        workers = speedup(timings[(sweep, "1x2")], timings[(sweep, "2x1")], seed=args.seed)
        plain = speedup(timings[(sweep, "plain")], timings[(sweep, "2x1")], seed=args.seed)
        print(f"  speed-up 2 workers x 1 thread over 1 worker x 1 thread (goal >= 1.8): {scaling.text()}")
        print(f"  speed-up 2 workers x 1 thread over 1 worker x 2 threads: {workers.text()}")
        print(f"  speed-up 2 workers x 1 thread over the plain loop, 2 threads (knockouts goal >= 1): {plain.text()}")
        print(f"  Ray overhead per probe (median 1x2 - median plain, over these {n} probes): "
              f"{1000 * (med['1x2'] - med['plain']) / n:+.1f} ms ({100 * (med['1x2'] / med['plain'] - 1):+.1f}%)")
    print(f"empty task round trip: {empty_ms:.2f} ms per task")
    print("worker resident memory: " + ", ".join(f"{m / 2**30:.2f} GiB" for m in memory))


if __name__ == "__main__":
    main()
