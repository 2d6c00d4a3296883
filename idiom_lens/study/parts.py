"""The one resume loop: sweeps in resumable parts, and stages behind completion markers.

A sweep over probes (the trajectory, knockouts, tracing, ...) is cut into parts. Each part is
a folder keyed by everything that determines it (`Part.key`: the analysis and its options, the
model's settings, every field of the part's probes) and finished by a completion marker
(`idiom_lens.io.write_marker`) written after its files. `run_parts` loads the finished, intact
parts and computes the others on an executor (`study.executors`: this process, or Ray workers),
writing each as soon as it is complete; the parts' results come back in probe order, so a
killed run loses at most the parts in flight and a rerun gives the same files.

A stage (one folder of the study) is reused likewise: `run_stage` calls its function only when
the stage's marker does not verify against `stage_key`, built from every argument the function
receives.
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idiom_lens.datasets.probes import Probe
from idiom_lens.faults import maybe_fail
from idiom_lens.io import check_marker, key_digest, write_marker
from idiom_lens.study.executors import Executor, LocalExecutor
from idiom_lens.study.layout import FORMAT

if TYPE_CHECKING:
    from idiom_lens.models.loading import LoadedModel

PART_MARKER = ".part.json"
STAGE_MARKER = ".stage.json"
PARTS = ".parts"  # a stage's parts: hidden, so that a stage's visible files are the same however it ran

# Arguments that change neither the numbers (beyond float rounding) nor the files written: left
# out of every key, so a rerun with another batch size or executor reuses finished work.
NOT_IN_KEY: frozenset[str] = frozenset({"batch_size", "progress", "log", "executor"})


# --------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------


def fingerprint(key: Any) -> str:
    """A short digest of `key`, for folder names."""
    return key_digest(key)[:16]


def model_key(model: LoadedModel) -> dict[str, Any]:
    """The model's settings that determine numbers (installed versions left out: the run-time
    self-checks guard those)."""
    settings = dict(model.settings())
    settings.pop("versions", None)
    return settings


def probe_key(probes: Sequence[Probe]) -> list[dict[str, Any]]:
    """Every field of every probe, in order (a changed flag or prompt changes the key)."""
    return [dataclasses.asdict(p) for p in probes]


def keyable(value: Any) -> Any:
    """An option as it enters a key: options dataclasses as their class name and fields, a lens
    (or anything else that describes itself) as its description."""
    if hasattr(value, "describe") and callable(value.describe):
        return value.describe()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{k: keyable(v) for k, v in dataclasses.asdict(value).items()}}
    return value


def clear(folder: Path, marker: Path, *, keep: str | None = None) -> None:
    """Empty a folder before (re)computing it: the marker goes first, then everything else, so
    no stale or half-written output of an earlier run survives into the new one. `keep` names a
    subfolder left in place (a stage's parts, each verified by its own marker)."""
    marker.unlink(missing_ok=True)
    if not folder.exists():
        return
    if keep is None or not (folder / keep).is_dir():
        shutil.rmtree(folder)
        return
    for path in folder.iterdir():
        if path.name != keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# --------------------------------------------------------------------------------------
# Sweeps in parts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """A resumable part of a sweep: its probes, folder and key (what determines its files)."""

    probes: tuple[Probe, ...]
    folder: Path
    key: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """One analysis over probes, cut into parts.

    `call(model, probes, progress=...)` computes a piece: a module-level function with its
    options bound (`functools.partial`), so it can be sent to a worker. `per_probe`: the
    analysis treats every probe on its own, so a worker may take one probe of a part at a time
    (the trajectory's batches depend on the call's probes: its parts go whole). `join` joins the
    results of a part's pieces in order; `save(result, folder)` writes a part, `load(folder)`
    reads it back."""

    name: str  # in folder names and log lines: "trajectory", "knockouts_all", ...
    call: Callable[..., Any]
    per_probe: bool
    join: Callable[[Sequence[Any]], Any]
    save: Callable[[Any, Path], Any]
    load: Callable[[Path], Any]
    fault_point: str | None = None

    def key(self, model: LoadedModel, probes: Sequence[Probe]) -> dict[str, Any]:
        """What determines a part of `probes`: the analysis, its bound options (speed-only ones
        left out), the model's settings and the probes."""
        fn = getattr(self.call, "func", self.call)
        options = {k: keyable(v) for k, v in getattr(self.call, "keywords", {}).items() if k not in NOT_IN_KEY}
        return {"format": FORMAT, "analysis": f"{fn.__module__}.{fn.__qualname__}", "options": options,
                "model": model_key(model), "probes": probe_key(probes)}

    def parts(self, model: LoadedModel, probes: Sequence[Probe], folder: Path, *, size: int) -> list[Part]:
        """`probes` in parts of `size`, each in its folder `folder/<name>-<fingerprint>`."""
        out = []
        for i in range(0, len(probes), size):
            chunk = tuple(probes[i : i + size])
            key = self.key(model, chunk)
            out.append(Part(chunk, folder / f"{self.name}-{fingerprint(key)}", key))
        return out


def run_parts(sweep: Sweep, parts: Sequence[Part], executor: Executor, *,
              log: Callable[[str], None] = print) -> list[Any]:
    """Every part's result, in order: finished, intact parts loaded, the others computed on
    `executor` and written (files, then the marker) as soon as their last piece is in."""
    n_parts = len(parts)
    results: list[Any] = [None] * n_parts
    todo: list[int] = []
    for i, part in enumerate(parts):
        marker = part.folder / PART_MARKER
        reason = check_marker(marker, part.key)
        if reason is None:
            log(f"  {sweep.name} part {i + 1}/{n_parts}: reusing {part.folder.name}")
            results[i] = sweep.load(part.folder)
            continue
        if part.folder.exists():
            log(f"  {sweep.name} part {i + 1}/{n_parts}: recomputing {part.folder.name}, {reason}")
        clear(part.folder, marker)
        todo.append(i)
    if not todo:
        return results
    started = time.perf_counter()

    def finished(i: int, pieces: Sequence[Any]) -> None:
        part = parts[i]
        result = pieces[0] if len(pieces) == 1 else sweep.join(pieces)
        sweep.save(result, part.folder)
        write_marker(part.folder / PART_MARKER, part.key)  # last: the part is finished only now
        if sweep.fault_point:
            maybe_fail(sweep.fault_point)
        log(f"  {sweep.name} part {i + 1}/{n_parts}: {len(part.probes)} probes, "
            f"{time.perf_counter() - started:.1f} s into the sweep")
        results[i] = result

    executor.run(sweep.call, [(i, parts[i].probes) for i in todo], per_probe=sweep.per_probe, name=sweep.name,
                 on_part=finished)
    return results


def sweep_in_parts(sweep: Sweep, model: LoadedModel, probes: Sequence[Probe], folder: Path, executor: Executor, *,
                   size: int, log: Callable[[str], None] = print) -> Any:
    """`sweep` over `probes` in resumable parts of `size` under `folder`, joined: the result of
    one call on all of them, row for row."""
    return sweep.join(run_parts(sweep, sweep.parts(model, probes, folder, size=size), executor, log=log))


PROBES_PER_PART = 8  # parts of the per-probe sweeps (knockouts, patching, ...): what a crash loses at most


def sweep_per_probe(
    executor: Executor | None, model: LoadedModel, probes: Sequence[Probe], out: Path, name: str,
    call: Callable[..., Any], *, join: Callable[[Sequence[Any]], Any], load: Callable[[Path], Any],
) -> Any:
    """`call(model, probes)` for an analysis that treats every probe on its own (a result with
    `save`), in resumable parts of `PROBES_PER_PART` probes under `out/.parts/` (reused when
    finished and intact), on `executor` (this process by default), joined in probe order: one
    call's result, row for row."""
    sweep = Sweep(name=name, call=call, per_probe=True, join=join, save=lambda result, folder: result.save(folder),
                  load=load)
    return sweep_in_parts(sweep, model, list(probes), Path(out) / PARTS, executor or LocalExecutor(model),
                          size=PROBES_PER_PART, log=lambda line: None)


# --------------------------------------------------------------------------------------
# Stages behind a marker
# --------------------------------------------------------------------------------------


def stage_key(
    fn: Callable[..., Any], model: LoadedModel, probes: Sequence[Probe], options: dict[str, Any]
) -> dict[str, Any]:
    """Everything that determines what `fn(model, probes, out, **options)` writes: the stage
    function, the model's settings, every field of every probe, and every other argument of `fn`
    as it will be called, defaults included (so an option added later is keyed without anyone
    remembering to), except those in `NOT_IN_KEY`."""
    signature = inspect.signature(fn)
    bound = signature.bind(model, probes, Path("."), **options)  # TypeError on an unknown option
    bound.apply_defaults()
    positional = list(signature.parameters)[:3]
    return {
        "format": FORMAT,
        "stage": f"{fn.__module__}.{fn.__qualname__}",
        "model": model_key(model),
        "probes": probe_key(probes),
        "options": {name: keyable(value) for name, value in bound.arguments.items()
                    if name not in positional and name not in NOT_IN_KEY},
    }


def run_stage(
    name: str,
    fn: Callable[..., Any],
    model: LoadedModel,
    probes: Sequence[Probe],
    stage_dir: str | Path,
    options: dict[str, Any],
    *,
    log: Callable[[str], None] = print,
) -> Any | None:
    """`fn(model, probes, stage_dir, **options)` unless `stage_dir` holds a finished run with the
    same `stage_key` and intact files. Returns `fn`'s result, or None when the stage was reused.

    A stage that fails verification (unfinished, settings changed, a file missing, truncated or
    altered, the marker unreadable) is recomputed from an empty `stage_dir` (its finished parts
    kept: each is verified by its own marker). The marker is written only after `fn` returns,
    so a crash or an error inside the stage leaves it unfinished."""
    stage_dir = Path(stage_dir)
    key = stage_key(fn, model, probes, options)
    marker = stage_dir / STAGE_MARKER
    reason = check_marker(marker, key)
    if reason is None:
        log(f"[run] {name}: already done, reusing {stage_dir}")
        return None
    if stage_dir.exists():
        log(f"[run] {name}: recomputing, {reason}")
    clear(stage_dir, marker, keep=PARTS)
    log(f"[run] {name}: {len(probes)} probes")
    result = fn(model, probes, stage_dir, **options)
    maybe_fail("stage.outputs")
    write_marker(marker, key)
    return result
