"""Sweeps across workers on Ray: the same results from 1 or N workers, resumable, fault tolerant.

Optional: `pip install idiom-lens[distributed]` installs Ray. Without it (or with one worker)
every sweep runs in this process, as it always did; `WorkerOptions(workers=2)` then fails at once
with an `InputError` saying what to install.

- A `WorkerPool` starts N Ray actors (`ray.init` for a local Ray, or `address=` an existing
  cluster). Each actor loads the model once (`idiom_lens.models.loading.load_model`, the same
  spec, device and numerics as the driver's model), pins its torch threads and, on GPUs, is
  given its own device(s) by Ray (`num_gpus`); a model larger than one GPU combines with
  `n_devices` inside the actor.
- `run_parts` runs a sweep whose probes are cut into resumable parts, each a fingerprinted
  folder finished by a completion marker (`idiom_lens.io.write_marker`), the mechanism the
  single-process stages use. Finished, intact parts are reused; the others are cut into units
  (a unit is the smallest piece whose result does not depend on what else is in the call: a
  whole trajectory part, whose forward batches are sorted by length, or one probe of a
  per-probe intervention), the units go to the workers, and the driver merges each part's units
  in probe order, writes the part atomically and marks it finished. So the merged result is the
  single-process one, row for row, and the same folder comes out.
- Faults: the actors are restarted by Ray when their process dies (`max_restarts`) and their
  calls retried (`max_task_retries`); a unit whose actor is gone for good is resubmitted here.
  Units write nothing, so a retried unit recomputes only itself; a killed driver leaves the
  finished parts, which the next invocation reuses.
- Progress: one bar in the driver over all workers, in probes per second.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from idiom_lens.errors import FastPathError, InputError

INSTALL_HINT = "pip install idiom-lens[distributed]"
# Ray's object store for the local cluster `WorkerPool` starts: results travel through it, and
# they are small (tables of a few probes), so a small store keeps the memory for the models.
OBJECT_STORE_BYTES = 512 * 2**20
MAX_RESTARTS = 3  # per actor: a worker killed more often than this in one run is a real fault
MAX_ATTEMPTS = 3  # per unit, on top of Ray's own retries


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How many workers a sweep uses and where they run. Speed only: never part of a result's key.

    `workers` None or 1 with no `address`: this process, no Ray. `address`: an existing Ray
    cluster ("auto" finds the one on this machine, or "HOST:PORT"); otherwise a local Ray is
    started and stopped for the run. `threads`: torch threads per worker (default: this
    machine's cores divided among the workers, at least 1)."""

    workers: int | None = None
    address: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers must be a whole number >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"worker threads must be a whole number >= 1, got {self.threads}")
        if self.address is not None and not str(self.address).strip():
            raise InputError("ray address is empty: give 'auto' or HOST:PORT of a running Ray head")
        if self.distributed and not ray_available():
            given = " ".join(([f"--workers {self.n_workers}"] if self.workers else [])
                             + ([f"--ray-address {self.address}"] if self.address else []))
            raise InputError(f"{given} needs Ray, which is not installed: {INSTALL_HINT}")

    @property
    def distributed(self) -> bool:
        return (self.workers or 1) > 1 or self.address is not None

    @property
    def n_workers(self) -> int:
        return self.workers or 1

    def threads_per_worker(self) -> int:
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.n_workers)

    def describe(self) -> str:
        where = f" on the Ray cluster at {self.address}" if self.address else ""
        return f"{self.n_workers} worker{'s' if self.n_workers != 1 else ''}{where}"


@dataclass(frozen=True, kw_only=True)
class ModelRecipe:
    """What a worker needs to load the driver's model itself (a spec, not the weights)."""

    spec: str
    device: str = "cpu"
    n_devices: int | None = None
    # The driver's working folder: a relative model path means the same there (the spec is kept as
    # given, since it is part of every result's settings).
    cwd: str = field(default_factory=os.getcwd)

    def __post_init__(self) -> None:
        if self.device.startswith("cuda:") and not self.n_devices:
            raise InputError(f"--device {self.device}: with workers give --device cuda; Ray gives each worker "
                             "its own GPU(s) (--n-devices per worker)")

    def gpus(self) -> int:
        """GPUs each worker asks Ray for."""
        if self.n_devices and self.n_devices > 1:
            return self.n_devices
        return 1 if self.device.startswith("cuda") else 0

    def load(self, mode: str) -> Any:
        from idiom_lens.models.loading import load_model

        return load_model(self.spec, mode=mode, device=self.device, n_devices=self.n_devices,  # type: ignore[arg-type]
                          progress=False)


@dataclass(frozen=True)
class Unit:
    """One piece of work for a worker: `fn(model in mode, probes, **kwargs)`; `fn` must be a
    module-level function of an importable module (it is pickled by reference)."""

    fn: Callable[..., Any]
    probes: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    mode: str = "raw"


class _Worker:
    """A Ray actor: loads the model (per numerics mode) once and runs units on it."""

    def __init__(self, recipe: ModelRecipe, threads: int) -> None:
        torch.set_num_threads(threads)
        if os.path.isdir(recipe.cwd):
            os.chdir(recipe.cwd)
        self.recipe = recipe
        self.models: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def load(self, mode: str) -> bool:
        if mode not in self.models:
            self.models[mode] = self.recipe.load(mode)
        return True

    def run(self, unit: Unit) -> Any:
        self.load(unit.mode)
        return unit.fn(self.models[unit.mode], list(unit.probes), **unit.kwargs)

    def memory(self) -> int:
        """Resident set size of this worker, in bytes (Linux)."""
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


class WorkerPool:
    """N Ray actors holding the model; `map` runs units on them in any order and returns the
    results in the units' order. Use as a context manager: a local Ray it started is stopped.

    `on_result(pool, n_done)` is called in the driver after each finished unit (progress
    monitors and the fault tests use it)."""

    def __init__(self, recipe: ModelRecipe, options: WorkerOptions, *,
                 on_result: Callable[["WorkerPool", int], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        if not options.distributed:
            raise InputError("a WorkerPool needs more than one worker or a Ray address")
        self.recipe = recipe
        self.options = options
        self.on_result = on_result
        self.log = log
        self.actors: list[Any] = []
        self._started_ray = False

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> "WorkerPool":
        return self  # started by the first `map`: a run that only reuses finished parts starts no Ray

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start (or join) Ray and the workers, and wait until every worker holds the model."""
        import ray

        if self.actors:
            return
        threads = self.options.threads_per_worker()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            if self.options.address is None:
                cpus = max(os.cpu_count() or 1, self.options.n_workers * threads)
                kwargs |= dict(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES)
            else:
                kwargs |= dict(address=self.options.address)
            try:
                ray.init(**kwargs)
            except ConnectionError as err:
                raise InputError(f"--ray-address {self.options.address}: no Ray cluster there ({err}); start one "
                                 "with `ray start --head`") from err
            self._started_ray = True
        actor = ray.remote(_Worker).options(num_cpus=threads, num_gpus=self.recipe.gpus(),
                                            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        self.actors = [actor.remote(self.recipe, threads) for _ in range(self.options.n_workers)]
        started = time.perf_counter()
        ray.get([a.load.remote("raw") for a in self.actors])  # every worker holds the model before timing starts
        self.log(f"  {self.options.describe()}, {threads} torch thread{'s' if threads != 1 else ''} each, "
                 f"model loaded in {time.perf_counter() - started:.1f} s")

    def close(self) -> None:
        if not self.actors and not self._started_ray:
            return
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    def pids(self) -> list[int]:
        """The worker processes' ids, in actor order."""
        import ray

        self.start()
        return ray.get([a.pid.remote() for a in self.actors])

    def memory(self) -> list[int]:
        """Each worker's resident set size in bytes."""
        import ray

        self.start()
        return ray.get([a.memory.remote() for a in self.actors])

    # -- work -----------------------------------------------------------------------

    def map(self, units: Sequence[Unit], *, on_unit: Callable[[int, Any], None] | None = None,
            progress: Any = None) -> list[Any]:
        """Run `units` on the workers, one at a time per worker, the next unit to whichever
        worker is free; `on_unit(i, result)` as each finishes (in finishing order); results in
        the units' order. A task's error is raised as itself (`InputError`, `FastPathError`)."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        self.start()
        results: list[Any] = [None] * len(units)
        pending = list(range(len(units)))[::-1]  # popped from the end: unit order
        attempts = [0] * len(units)
        running: dict[Any, tuple[int, int]] = {}  # object ref -> (unit, actor)
        free = list(range(len(self.actors)))[::-1]
        done = 0

        def submit() -> None:
            while pending and free:
                i, a = pending.pop(), free.pop()
                attempts[i] += 1
                running[self.actors[a].run.remote(units[i])] = (i, a)

        submit()
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            i, a = running.pop(ref)
            free.append(a)
            try:
                result = ray.get(ref)
            except RayTaskError as err:
                cause = getattr(err, "cause", None)
                if isinstance(cause, (InputError, FastPathError)):
                    raise cause from None
                raise
            except RayActorError:
                if attempts[i] >= MAX_ATTEMPTS:
                    raise
                self.log(f"  worker {a} died; unit {i + 1}/{len(units)} resubmitted")
                pending.append(i)
                submit()
                continue
            results[i] = result
            done += 1
            if on_unit is not None:
                on_unit(i, result)
            if progress is not None:
                progress.update(len(units[i].probes))
            if self.on_result is not None:
                self.on_result(self, done)
            submit()
        return results


# --------------------------------------------------------------------------------------
# Resumable parts across workers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A resumable part of a sweep: its probes, folder and key (what determines its files)."""

    probes: tuple[Any, ...]
    folder: Path
    key: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class PartsPlan:
    """How a sweep's parts are computed, merged, written and read back.

    `units(part)` cuts a part's probes into units (their results joined by `merge` equal one
    call on the whole part); `save(result, folder)` writes a part; `load(folder)` reads it."""

    label: str  # in log lines: "part", "tracing part", ...
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    mode: str = "raw"
    units: Callable[[Part], list[tuple[Any, ...]]]
    merge: Callable[[list[Any]], Any]
    save: Callable[[Any, Path], Any]
    load: Callable[[Path], Any]
    fault_point: str | None = None


def per_probe(part: Part) -> list[tuple[Any, ...]]:
    """Units of one probe each: for analyses that treat every probe on its own."""
    return [(p,) for p in part.probes]


def whole_part(part: Part) -> list[tuple[Any, ...]]:
    """One unit per part: for analyses whose batches depend on the call's probes (trajectory)."""
    return [tuple(part.probes)]


def run_parts(pool: WorkerPool, parts: Sequence[Part], plan: PartsPlan, *, desc: str,
              log: Callable[[str], None] = print) -> list[Any]:
    """Every part's result, in order: finished, intact parts loaded, the others computed on the
    pool and written (files, then the marker) as soon as their last unit is in."""
    from tqdm.auto import tqdm

    from idiom_lens.faults import maybe_fail
    from idiom_lens.io import check_marker, write_marker

    n_parts = len(parts)
    results: list[Any] = [None] * n_parts
    units: list[Unit] = []
    owner: list[int] = []  # unit -> part
    todo: dict[int, list[int]] = {}  # part -> its units
    for i, part in enumerate(parts):
        marker = part.folder / PART_MARKER
        reason = check_marker(marker, part.key)
        if reason is None:
            log(f"  {plan.label} {i + 1}/{n_parts}: reusing {part.folder.name}")
            results[i] = plan.load(part.folder)
            continue
        if part.folder.exists():
            log(f"  {plan.label} {i + 1}/{n_parts}: recomputing {part.folder.name}, {reason}")
        clear(part.folder, marker)
        todo[i] = []
        for probes in plan.units(part):
            todo[i].append(len(units))
            owner.append(i)
            units.append(Unit(plan.fn, tuple(probes), plan.kwargs, plan.mode))
    if not units:
        return results
    pool.start()  # before the bar and the clock: its log line, the workers' model loading
    unit_results: dict[int, Any] = {}
    started = time.perf_counter()

    def finished(u: int, result: Any) -> None:
        unit_results[u] = result
        i = owner[u]
        if all(v in unit_results for v in todo[i]):
            part = parts[i]
            merged = plan.merge([unit_results.pop(v) for v in todo[i]])
            plan.save(merged, part.folder)
            write_marker(part.folder / PART_MARKER, part.key)  # last: the part is finished only now
            if plan.fault_point:
                maybe_fail(plan.fault_point)
            bar.write(f"  {plan.label} {i + 1}/{n_parts}: {len(part.probes)} probes in "
                      f"{time.perf_counter() - started:.1f} s of the sweep")
            results[i] = merged

    n_total = sum(len(p.probes) for p in parts)
    with tqdm(total=n_total, initial=n_total - sum(len(u.probes) for u in units), desc=desc, unit="probe",
              smoothing=0.1) as bar:
        pool.map(units, on_unit=finished, progress=bar)
    return results


PART_MARKER = ".part.json"


def clear(folder: Path, marker: Path) -> None:
    """Empty a part's folder before (re)computing it: the marker first, then everything else."""
    import shutil

    marker.unlink(missing_ok=True)
    if folder.exists():
        shutil.rmtree(folder)


# --------------------------------------------------------------------------------------
# Merging results of units computed apart
# --------------------------------------------------------------------------------------


def _concat(frames: Sequence[Any]) -> Any:
    """Frames in order; empty ones left out (their all-object columns would change dtypes)
    unless every one is empty."""
    import pandas as pd

    kept = [f for f in frames if len(f)] or list(frames[:1])
    return pd.concat(kept, ignore_index=True)


COUNTS = ("n_probes", "n_pairs", "n_skipped")


def merged_settings(parts: Sequence[Any]) -> dict[str, Any]:
    """The first unit's settings (its first probe is the whole call's first probe, which is all
    a call's settings depend on besides its counts), counts summed, seconds summed."""
    settings = dict(parts[0].settings)
    for name in COUNTS:
        if name in settings:
            settings[name] = sum(int(p.settings[name]) for p in parts)
    if "seconds" in settings:
        settings["seconds"] = round(sum(float(p.settings["seconds"]) for p in parts), 2)
    return settings


def merge_probe_rows(parts: Sequence[Any]) -> Any:
    """Knockouts, layer skipping, attention knockout, causal tracing (`ProbeRowsResult`s)."""
    return type(parts[0])(rows=_concat([p.rows for p in parts]), probes=_concat([p.probes for p in parts]),
                          settings=merged_settings(parts))


def merge_patching(parts: Sequence[Any]) -> Any:
    """Activation patching (exact or attribution): rows, pairs and skipped probes in order."""
    return type(parts[0])(rows=_concat([p.rows for p in parts]), pairs=_concat([p.pairs for p in parts]),
                          skipped=_concat([p.skipped for p in parts]), settings=merged_settings(parts))
