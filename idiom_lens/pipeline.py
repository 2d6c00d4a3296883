"""Long jobs that write results as they go and resume: the trajectory job and the full study.

Probes are processed in parts; each finished part is written atomically under
`DIR/parts/` with a fingerprint of everything that determines it (model settings, sites,
the part's probes). A rerun loads the parts whose fingerprint matches and computes the rest,
so an interrupted run loses at most one part.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from idiom_lens.datasets.probes import Probe, ProbeSet
from idiom_lens.io import write_json, write_text
from idiom_lens.models import LoadedModel
from idiom_lens.phases import PhaseAnalysis, analyse_phases
from idiom_lens.trajectory import (
    SITES,
    TrajectoryResult,
    layer_trajectory,
    load_trajectory,
    save_trajectory,
)


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_key(model: LoadedModel) -> dict[str, Any]:
    settings = dict(model.settings())
    settings.pop("versions", None)
    return settings


def resumable_trajectory(
    model: LoadedModel,
    probes: Sequence[Probe],
    out_dir: str | Path,
    *,
    sites: Sequence[str] = SITES,
    batch_size: int = 16,
    part_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrajectoryResult:
    """`layer_trajectory` in parts saved under `out_dir/parts/`; finished parts are reused."""
    out_dir = Path(out_dir)
    probes = list(probes)
    parts: list[TrajectoryResult] = []
    n_parts = (len(probes) + part_size - 1) // part_size
    for i in range(n_parts):
        chunk = probes[i * part_size : (i + 1) * part_size]
        key = _fingerprint(
            {"model": _model_key(model), "sites": list(sites),
             "probes": [(p.id, p.prompt, p.target, p.kind) for p in chunk]}
        )
        part_dir = out_dir / "parts" / f"trajectory-{key}"
        if (part_dir / "trajectory_memorization.parquet").is_file() and (part_dir / "trajectory.parquet").is_file():
            log(f"  part {i + 1}/{n_parts}: reusing {part_dir.name}")
            parts.append(load_trajectory(part_dir, settings=model.settings()))
            continue
        started = time.perf_counter()
        result = layer_trajectory(model, chunk, sites=sites, batch_size=batch_size, progress=progress)
        # The memorization file is written last: its presence marks a complete part.
        save_trajectory(result, part_dir)
        log(f"  part {i + 1}/{n_parts}: {len(chunk)} probes in {time.perf_counter() - started:.1f} s")
        parts.append(result)
    return TrajectoryResult.concat(parts)


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
    files = list(save_trajectory(result, out_dir))
    files.append(write_parquet(out_dir / "phases_per_probe.parquet", phases.probes))
    files.append(write_parquet(out_dir / "phases_curves.parquet", phases.curves))
    memo = result.memorization.summary()
    files.append(write_parquet(out_dir / "memorization_summary.parquet", memo))
    summary = {
        "settings": result.settings,
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


def summary_markdown(result: TrajectoryResult, phases: PhaseAnalysis) -> str:
    s = result.settings
    memo = result.memorization.summary()
    lines = [
        f"# Recall trajectory: {s.get('model_spec')}",
        "",
        f"Model `{s.get('model_name')}`, {s.get('n_layers')} layers, numerics `{s.get('numerics_mode')}`, "
        f"BOS prepended: {s.get('prepend_bos')}, sites: {', '.join(result.sites)}.",
        "",
        "## Memorization (greedy next token == first token of the target word)",
        "",
        markdown_table(memo),
        "",
        "## Two phases",
        "",
        phases.summary_text,
        "",
        markdown_table(phases.group_table()),
        "",
    ]
    return "\n".join(lines)


def markdown_table(frame: Any, *, digits: int = 3) -> str:
    """A pipe table (pandas' `to_markdown` would need tabulate for these few lines)."""
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [list(map(str, frame.columns))] + [[fmt(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(frame.columns))
    return "\n".join(lines)


def study_probes(names: Sequence[str] = ("idioms", "text", "facts"), *, limit: int | None = None) -> ProbeSet:
    """The bundled sets the study compares, joined (optionally the first `limit` of each)."""
    from idiom_lens.datasets import load_probes

    sets = []
    for name in names:
        ps = load_probes(name)
        sets.append(ProbeSet(ps.name, ps.probes[:limit] if limit else ps.probes))
    return ProbeSet.concat("study", sets)
