"""The tracing stage: causal tracing (ROME) of memorized and non-memorized idioms, in resumable parts;
and the noise effects (what the noise alone does under each noise design), likewise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idiom_lens.analyses.interventions.tracing import TracingOptions
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.groups import ordered, slug
from idiom_lens.io import write_json, write_parquet
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
    min_total_effect: float = 0.05,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> Any:
    """Causal tracing (`options`) of `probes` in parts of `part_size` probes under `out/.parts/` (finished,
    intact parts are reused: an interrupted run loses at most one part); then the joined result,
    its summary, the restored share (`tracing_share.parquet`: mean IE / mean TE over the probes
    whose total effect reaches `min_total_effect`), heatmaps per set, layer curves of both and
    summary.json under `out`. Returns the `TracingResult`. On `executor`'s workers when given,
    one probe per task: the same files."""
    from idiom_lens.analyses.interventions.tracing import TracingResult, causal_trace, noise_scale
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.tracing import restored_share_curves, tracing_curves, tracing_heatmaps

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
    share = result.restored_share(min_total_effect=min_total_effect)
    write_parquet(out / "tracing_share.parquet", share)
    for group in ordered(set(summary["group"])):
        save_figure(tracing_heatmaps(result, group=group, summary=summary),
                    out / f"tracing_{slug(group)}", png=png, height=420)
    for position in ("last noised", "last"):
        if position not in set(summary["position"]):  # positions="key" with the last token noised
            continue
        name = position.replace(" ", "_")
        save_figure(tracing_curves(result, position=position, summary=summary), out / f"tracing_curves_{name}",
                    png=png, height=420)
        save_figure(restored_share_curves(result, position=position, share=share), out / f"tracing_share_{name}",
                    png=png, height=420)
    write_json(out / "summary.json", result.settings | {"share_min_total_effect": float(min_total_effect)})
    return result


def run_noise_effects(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    designs: Sequence[str] | None = None,
    noise_samples: int = 10,
    multiplier: float = 3.0,
    seed: int = 0,
    batch_size: int = 32,
    part_size: int = 10,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> Any:
    """What the noise alone does (`noise_effects` under `designs`, default every design) to
    `probes`, in resumable parts of `part_size` probes under `out/.parts/` like `run_tracing`;
    then noise_effects*.parquet (rows, probes, summary per set with 95% intervals) and the figure
    noise_effects under `out`. Returns the `NoiseEffectsResult`."""
    from idiom_lens.analyses.interventions.noise_designs import (
        NOISE_DESIGNS,
        NoiseEffectsResult,
        noise_effects,
        noise_scale,
    )
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.tracing import noise_effects_figure

    out = Path(out)
    if part_size < 1:
        raise InputError(f"part_size must be >= 1, got {part_size}")
    designs = NOISE_DESIGNS if designs is None else tuple(designs)
    scale = noise_scale(model, multiplier=multiplier)
    call = partial(noise_effects, designs=designs, noise_samples=noise_samples, seed=seed, scale=scale,
                   batch_size=batch_size)
    sweep = Sweep(name="noise_effects", call=call, per_probe=True, join=NoiseEffectsResult.join_parts,
                  save=lambda r, folder: r.save(folder), load=NoiseEffectsResult.load)
    result = sweep_in_parts(sweep, model, list(probes), out / PARTS, executor or LocalExecutor(model), size=part_size,
                            log=log)
    result.save(out)
    save_figure(noise_effects_figure(result), out / "noise_effects", png=png, height=420)
    return result
