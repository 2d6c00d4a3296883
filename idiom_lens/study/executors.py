"""Where a sweep's parts run: in this process (`LocalExecutor`) or on Ray workers (`RayExecutor`).

Both take the parts `study.parts.run_parts` hands them and give back each part's pieces as soon
as they are in; `run_parts` writes and marks the part. So the same folder comes out of either,
and the merged result is the single-process one, row for row.

Ray is optional: `pip install idiom-lens[distributed]`. Without it (or with one worker) every
sweep runs in this process; `WorkerOptions(workers=2)` then fails at once with an `InputError`
saying what to install.

- A `RayExecutor` starts N Ray actors (`ray.init` for a local Ray, or `address=` an existing
  cluster). Each actor loads the model once (`idiom_lens.models.loading.load_model`, the same
  spec, device and numerics as the driver's model), pins its torch threads and, on GPUs, is
  given its own device(s) by Ray (`num_gpus`); a model larger than one GPU combines with
  `n_devices` inside the actor.
- A part goes to the workers in units: for an analysis that treats every probe on its own
  (`Sweep.per_probe`) tasks of `WorkerOptions.task_sizes` (default one per worker and part, of
  near-equal size; one-probe tasks repeated each call's set-up and made knockouts on 2 workers slower than
  one process), else the whole part (the trajectory, whose forward batches are sorted by length
  within the call). On a cluster, give `--probes-per-task` so that a task lasts at least a few
  seconds and the parts have several tasks per worker.
- Faults: the actors are restarted by Ray when their process dies (`max_restarts`) and their
  calls retried (`max_task_retries`); a unit whose actor is gone for good is resubmitted here.
  Units write nothing, so a retried unit recomputes only itself; a killed driver leaves the
  finished parts, which the next invocation reuses.
- Progress: one bar in the driver over all workers, in probes per second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from idiom_lens.errors import FastPathError, InputError
from idiom_lens.study.workers import ModelRecipe, WorkerOptions

# Ray's object store for the local cluster a `RayExecutor` starts: results travel through it, and
# they are small (tables of a few probes), so a small store keeps the memory for the models.
OBJECT_STORE_BYTES = 512 * 2**20
MAX_RESTARTS = 3  # per actor: a worker killed more often than this in one run is a real fault
MAX_ATTEMPTS = 3  # per unit, on top of Ray's own retries

if TYPE_CHECKING:
    from idiom_lens.models.loading import LoadedModel

OnPart = Callable[[int, Sequence[Any]], None]  # (part index, the part's pieces in probe order)


class Executor(Protocol):
    """Runs the unfinished parts of a sweep (`study.parts.run_parts`): `call(model, probes,
    progress=...)` on each of `todo`'s (part index, probes), calling `on_part(i, pieces)` once per
    part as soon as all its pieces are in (parts in any order). `per_probe`: the analysis treats
    every probe on its own, so a part may be cut into one-probe pieces."""

    distributed: bool
    n_workers: int

    def run(self, call: Callable[..., Any], todo: Sequence[tuple[int, Sequence[Any]]], *, per_probe: bool,
            name: str, on_part: OnPart) -> None: ...


@dataclass(frozen=True)
class LocalExecutor:
    """This process: each part in one call on `model` (with the analysis' own progress bar)."""

    model: LoadedModel
    progress: bool = True
    distributed: bool = False
    n_workers: int = 1

    def run(self, call: Callable[..., Any], todo: Sequence[tuple[int, Sequence[Any]]], *, per_probe: bool,
            name: str, on_part: OnPart) -> None:
        for i, probes in todo:
            on_part(i, [call(self.model, list(probes), progress=self.progress)])


def open_executor(model: LoadedModel, options: WorkerOptions, *, device: str = "cpu", n_devices: int | None = None,
                  log: Callable[[str], None] = print) -> Any:
    """A context manager giving the executor of `options` for `model`: this process, or Ray
    workers that each load the model from the same spec and device (stopped on exit)."""
    import contextlib

    if not options.distributed:
        return contextlib.nullcontext(LocalExecutor(model))
    return RayExecutor(ModelRecipe(spec=model.spec, device=device, n_devices=n_devices), options, log=log)


@dataclass(frozen=True)
class Unit:
    """One piece of work for a worker: `call(model in mode, probes)`; `call` must be a
    module-level function of an importable module, or a `functools.partial` of one (it is
    pickled by reference)."""

    call: Callable[..., Any]
    probes: tuple[Any, ...]
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
        return unit.call(self.models[unit.mode], list(unit.probes))

    def memory(self) -> int:
        """Resident set size of this worker, in bytes (Linux)."""
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0


class RayExecutor:
    """N Ray actors holding the model; `run` runs a sweep's parts on them (one probe or one
    part per unit, see the module docstring), `map` any units, in any order, results in the
    units' order. Use as a context manager: a local Ray it started is stopped.

    `on_result(pool, n_done)` is called in the driver after each finished unit (progress
    monitors and the fault tests use it)."""

    def __init__(self, recipe: ModelRecipe, options: WorkerOptions, *,
                 on_result: Callable[[RayExecutor, int], None] | None = None,
                 log: Callable[[str], None] = print) -> None:
        if not options.distributed:
            raise InputError("a RayExecutor needs more than one worker or a Ray address")
        self.recipe = recipe
        self.options = options
        self.on_result = on_result
        self.log = log
        self.actors: list[Any] = []
        self._started_ray = False

    distributed = True

    @property
    def n_workers(self) -> int:
        return self.options.n_workers

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> RayExecutor:
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

    def run(self, call: Callable[..., Any], todo: Sequence[tuple[int, Sequence[Any]]], *, per_probe: bool,
            name: str, on_part: OnPart) -> None:
        """The parts' units on the workers, `on_part` for each part as its last unit comes in."""
        from functools import partial

        from tqdm.auto import tqdm

        quiet = partial(call, progress=False)
        units: list[Unit] = []
        owner: list[int] = []  # unit -> part
        pieces: dict[int, list[int]] = {}  # part -> its units
        for i, probes in todo:
            pieces[i] = []
            sizes = self.options.task_sizes(len(probes)) if per_probe else [len(probes)]
            starts = [sum(sizes[:j]) for j in range(len(sizes))]
            for unit_probes in (tuple(probes[k : k + n]) for k, n in zip(starts, sizes, strict=True)):
                pieces[i].append(len(units))
                owner.append(i)
                units.append(Unit(quiet, tuple(unit_probes)))
        self.start()  # before the bar: its log line, the workers' model loading
        done: dict[int, Any] = {}

        def finished(u: int, result: Any) -> None:
            done[u] = result
            i = owner[u]
            if all(v in done for v in pieces[i]):
                on_part(i, [done.pop(v) for v in pieces[i]])

        with tqdm(total=sum(len(u.probes) for u in units), desc=name, unit="probe",
                  smoothing=0.1) as bar:
            self.map(units, on_unit=finished, progress=bar)
