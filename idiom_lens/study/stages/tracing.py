"""The tracing stage: causal tracing (ROME) of memorized and non-memorized idioms, in resumable parts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idiom_lens.analyses.interventions.tracing import TracingOptions
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.groups import ordered, slug
from idiom_lens.io import write_json
from idiom_lens.models.loading import LoadedModel
from idiom_lens.study.executors import LocalExecutor
from idiom_lens.study.parts import PARTS, Sweep, sweep_in_parts

if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor


def run_tracing(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: TracingOptions = TracingOptions(),
    batch_size: int = 128,
    part_size: int = 10,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> Any:
    """Causal tracing (`options`) of `probes` in parts of `part_size` probes under `out/.parts/` (finished,
    intact parts are reused: an interrupted run loses at most one part); then the joined result,
    its summary, heatmaps per set, layer curves and summary.json under `out`. Returns the
    `TracingResult`. On `executor`'s workers when given, one probe per task: the same files."""
    from idiom_lens.analyses.interventions.tracing import TracingResult, causal_trace, noise_scale
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.tracing import tracing_curves, tracing_heatmaps

    out = Path(out)
    if part_size < 1:
        raise InputError(f"part_size must be >= 1, got {part_size}")
    scale = noise_scale(model, multiplier=options.multiplier)
    sweep = Sweep(name="tracing", call=partial(causal_trace, options=options, scale=scale, batch_size=batch_size),
                  per_probe=True, join=TracingResult.join_parts, save=lambda r, folder: r.save(folder),
                  load=TracingResult.load, fault_point="tracing.part")
    result = sweep_in_parts(sweep, model, list(probes), out / PARTS, executor or LocalExecutor(model), size=part_size,
                            log=log)
    result.save(out)
    summary = result.summary()
    for group in ordered(set(summary["group"])):
        save_figure(tracing_heatmaps(result, group=group, summary=summary),
                    out / f"tracing_{slug(group)}", png=png, height=420)
    for position in ("last noised", "last"):
        save_figure(tracing_curves(result, position=position, summary=summary),
                    out / f"tracing_curves_{position.replace(' ', '_')}", png=png, height=420)
    write_json(out / "summary.json", result.settings)
    return result
