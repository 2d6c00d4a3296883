"""The trajectory stage: memorization and the layer trajectory of every probe in resumable parts,
its phases, tables and figures."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from idiom_lens.analyses.phases import PhaseAnalysis, analyse_phases
from idiom_lens.analyses.trajectory import (
    TRAJECTORY_SITES,
    TrajectoryResult,
    layer_trajectory,
    load_trajectory,
    save_trajectory,
)
from idiom_lens.datasets.probes import Probe
from idiom_lens.io import write_json, write_text
from idiom_lens.lenses.lens import Lens
from idiom_lens.models.loading import LoadedModel
from idiom_lens.study.executors import LocalExecutor
from idiom_lens.study.parts import PARTS, Sweep, sweep_in_parts
from idiom_lens.study.text import summary_markdown

if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor


def trajectory_sweep(model: LoadedModel, *, sites: Sequence[str], lens: Lens | None, batch_size: int) -> Sweep:
    """`layer_trajectory` as a sweep: parts go whole to a worker (its forward batches are sorted
    by length within the call, so a part is the smallest piece that gives the same numbers)."""
    settings = model.settings()
    return Sweep(name="trajectory",
                 call=partial(layer_trajectory, sites=tuple(sites), lens=lens, batch_size=batch_size),
                 per_probe=False, join=TrajectoryResult.join_parts, save=save_trajectory,
                 load=lambda folder: load_trajectory(folder, settings=settings), fault_point="trajectory.part")


def resumable_trajectory(
    model: LoadedModel,
    probes: Sequence[Probe],
    out_dir: str | Path,
    *,
    sites: Sequence[str] = TRAJECTORY_SITES,
    batch_size: int = 16,
    part_size: int = 256,
    lens: Lens | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> TrajectoryResult:
    """`layer_trajectory` (through `lens`, default the logit lens) in parts of `part_size` probes
    saved under `out_dir/.parts/`; finished, intact parts are reused. On `executor`'s workers
    when given (`study.executors`), else in this process: the same part folders come out."""
    executor = executor or LocalExecutor(model, progress=progress)
    n_parts = -(-len(probes) // part_size)
    if n_parts < executor.n_workers:
        log(f"  {n_parts} part{'s' if n_parts != 1 else ''} for {executor.n_workers} workers: smaller parts "
            "(--part-size) would keep them all busy")
    sweep = trajectory_sweep(model, sites=sites, lens=lens, batch_size=batch_size)
    return sweep_in_parts(sweep, model, list(probes), Path(out_dir) / PARTS, executor, size=part_size, log=log)


@dataclass(frozen=True)
class TrajectoryOutputs:
    result: TrajectoryResult
    phases: PhaseAnalysis
    files: tuple[Path, ...]


def write_trajectory_outputs(
    result: TrajectoryResult, out_dir: str | Path, *, title: str = "", png: bool = True
) -> TrajectoryOutputs:
    """Parquet tables, phase summary (JSON + Markdown) and figures for a finished trajectory."""
    from idiom_lens.io import write_parquet
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.trajectory import promotion_histogram, trajectory_figure

    out_dir = Path(out_dir)
    phases = analyse_phases(result)
    if result.lens_kind != "logit":
        title = f"{title} ({result.lens_kind} lens)".strip()
    files = list(save_trajectory(result, out_dir)) + phases.save(out_dir)
    memo = result.memorization.summary()
    files.append(write_parquet(out_dir / "memorization_summary.parquet", memo))
    summary = {
        "settings": result.settings,
        "lens": result.lens,
        "sites": list(result.sites),
        "n_probes": len(result.memorization),
        "memorization": memo.to_dict("records"),
        "phases": phases.to_dict(),
    }
    files.append(write_json(out_dir / "summary.json", summary))
    files.append(write_text(out_dir / "summary.md", summary_markdown(result, phases)))
    files += save_figure(trajectory_figure(phases, title=title), out_dir / "trajectory", png=png)
    files += save_figure(
        trajectory_figure(phases, title=(title + " (target token)").strip(), token="target"),
        out_dir / "trajectory_target", png=png,
    )
    files += save_figure(promotion_histogram(phases), out_dir / "promotion_layers", png=png, height=450)
    return TrajectoryOutputs(result=result, phases=phases, files=tuple(files))
