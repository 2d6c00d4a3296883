"""How many workers a sweep uses and what each loads: options that change speed, never results.

Kept apart from `study.executors` (which runs the parts) so that the CLI and `StudyOptions` can
check worker options without starting anything.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from idiom_lens.errors import InputError

INSTALL_HINT = "pip install idiom-lens[distributed]"


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How many workers a sweep uses and where they run. Speed only: never part of a result's key.

    `workers` None or 1 with no `address`: this process, no Ray. `address`: an existing Ray
    cluster ("auto" finds the one on this machine, or "HOST:PORT"); otherwise a local Ray is
    started and stopped for the run. `threads`: torch threads per worker (default: this
    machine's cores divided among the workers, at least 1). `probes_per_task`: probes per task
    of an analysis that treats every probe on its own (default `task_sizes`: a part cut into one
    task per worker of near-equal size, so that each task's set-up, e.g. the first probe's
    self-check, is paid once for many probes while every worker gets the same work)."""

    workers: int | None = None
    address: str | None = None
    threads: int | None = None
    probes_per_task: int | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers must be a whole number >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"worker threads must be a whole number >= 1, got {self.threads}")
        if self.probes_per_task is not None and self.probes_per_task < 1:
            raise InputError(f"probes per task must be a whole number >= 1, got {self.probes_per_task}")
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

    def task_sizes(self, n_probes: int) -> list[int]:
        """How a part of `n_probes` is cut into tasks: `probes_per_task` each (the last one what is
        left), else one task per worker (fewer for a short part) of sizes that differ by at most
        one, largest first: 6 probes on 2 workers are 3, 3. Each task pays the analysis' set-up
        (self-checks, norms), and set-ups on 2 workers of 2 cores contend for memory bandwidth: the
        knockout stage of 6 idioms of the embedded model on 2 workers took 15.5-16.5 s in tasks
        of 3, 3 and 18.5-19.7 s in tasks of 2, 2, 1, 1 (docs/speed.md)."""
        if n_probes < 1:
            return []
        if self.probes_per_task is not None:
            size = self.probes_per_task
            return [min(size, n_probes - k) for k in range(0, n_probes, size)]
        n_tasks = min(self.n_workers, n_probes)
        small, extra = divmod(n_probes, n_tasks)
        return [small + 1] * extra + [small] * (n_tasks - extra)

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
