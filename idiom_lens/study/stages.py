"""The study's stages, resumable: the trajectory in parts, then each later stage behind a marker.

Probes are processed in parts; each finished part is written atomically under
`DIR/parts/` with a fingerprint of everything that determines it (model settings, sites,
the part's probes). A rerun loads the parts whose fingerprint matches and computes the rest,
so an interrupted run loses at most one part.

The study's later stages run through `run_stage`: a stage is reused only when its folder holds
a completion marker (`idiom_lens.io.write_marker`) with the same key, built by `stage_key` from
every argument the stage function receives, and every file the marker lists is intact.
A part, likewise, is reused only when its marker verifies. Anything else is recomputed from an
empty folder, with one log line saying why.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd

from idiom_lens.datasets.probes import Probe, ProbeSet
from idiom_lens.errors import InputError
from idiom_lens.faults import maybe_fail
from idiom_lens.groups import ordered
from idiom_lens.io import write_json, write_text
from idiom_lens.analyses.memorization import MemorizationResult
from idiom_lens.lenses.lens import Lens
from idiom_lens.models.loading import LoadedModel
from idiom_lens.analyses.phases import PhaseAnalysis, analyse_phases
from idiom_lens.study.text import markdown_table, summary_markdown
from idiom_lens.study.executors import LocalExecutor
from idiom_lens.study.parts import PARTS, Sweep, run_stage, stage_key, sweep_in_parts  # noqa: F401 (re-exported)
if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor
from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutOptions
from idiom_lens.analyses.interventions.knockouts import KnockoutOptions
from idiom_lens.analyses.interventions.patching import PatchingOptions
from idiom_lens.analyses.interventions.tracing import TracingOptions
from idiom_lens.analyses.interventions.value_vectors import VALUE_VECTOR_KS
from idiom_lens.analyses.trajectory import (
    TRAJECTORY_SITES,
    TrajectoryResult,
    layer_trajectory,
    load_trajectory,
    save_trajectory,
)


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
    executor: "Executor | None" = None,
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


PROBES_PER_PART = 8  # parts of the per-probe sweeps (knockouts, patching, ...): what a crash loses at most


def _swept(
    executor: "Executor | None", model: LoadedModel, probes: Sequence[Probe], out: Path, name: str,
    call: Callable[..., Any], *, join: Callable[[Sequence[Any]], Any], load: Callable[[Path], Any],
) -> Any:
    """`call(model, probes)` for an analysis that treats every probe on its own, in resumable
    parts of `PROBES_PER_PART` probes under `out/.parts/` (reused when finished and intact),
    on `executor` (this process by default), joined in probe order: one call's result, row for row."""
    sweep = Sweep(name=name, call=call, per_probe=True, join=join, save=lambda result, folder: result.save(folder),
                  load=load)
    return sweep_in_parts(sweep, model, list(probes), Path(out) / PARTS, executor or LocalExecutor(model),
                          size=PROBES_PER_PART, log=lambda line: None)


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


def run_attribution(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    top: int = 20,
    batch_size: int = 16,
    png: bool = True,
    progress: bool = True,
) -> dict:
    """Attribute `probes`, write parquet + figures + summary.json under `out`; return the summary."""
    from idiom_lens.analyses import attribution_stats as stats
    from idiom_lens.analyses.attribution import attribute_probes
    from idiom_lens.io import write_json, write_parquet
    from idiom_lens.plots.attribution import layer_contribution_figure, top_neurons_table
    from idiom_lens.plots.export import save_figure

    result = attribute_probes(model, probes, batch_size=batch_size, top_neurons=top, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in result.save(out)]
    maybe_fail("attribution.written")
    for measure in ("logit", "logit_diff"):
        files.append(str(write_parquet(out / f"layer_stats_{measure}.parquet", stats.layer_stats(result, measure=measure))))
        files.append(str(write_parquet(out / f"cumulative_share_{measure}.parquet",
                                       stats.cumulative_share(result, measure=measure))))
        files += [str(p) for p in save_figure(layer_contribution_figure(result, measure=measure),
                                              out / f"layers_{measure}", png=png, width=1500, height=560)]
    for group, neurons in result.set_neurons.items():
        fig = top_neurons_table(neurons, title=f"Top neurons, {group} (mean over set)",
                                value_vector_final_norm=result.settings["value_vector_final_norm"])
        stem = out / f"neurons_{group.replace(' ', '_')}"
        files += [str(p) for p in save_figure(fig, stem, png=png, width=1100, height=120 + 26 * max(1, len(neurons)))]
    digest = stats.summary(result)
    digest["files"] = sorted(files)
    write_json(out / "summary.json", digest)
    return digest


def run_knockouts(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: KnockoutOptions = KnockoutOptions(),
    compare_positions: bool = False,
    value_vector_ks: Sequence[int] = VALUE_VECTOR_KS,
    skip: bool = True,
    batch_size: int = 128,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: "Executor | None" = None,
) -> dict:
    """Neuron knockouts (`options`: the grid, targeted, random and magnitude-matched controls,
    whole-MLP ceiling), the value-vector statistic and layer skipping of `probes`; parquet,
    figures and summary.json under `out`, each written as soon as its step completes.

    `compare_positions` also runs the other positions ("last" beside "all", or the reverse), written
    as knockouts_<positions>*.parquet, with side-by-side figures (`knockout_positions_heatmaps`).
    Layer skipping takes the grid's window lengths that fit the model, at every position.
    The knockouts and layer skipping run in resumable parts (`_swept`), on `executor`'s workers
    when given: the same files."""
    from idiom_lens.analyses.interventions import KnockoutResult, SkipOptions, knockout_grid, skip_layers
    from idiom_lens.analyses.interventions import value_vector_ranks
    from idiom_lens.analyses.interventions.skipping import SkipResult
    from idiom_lens.io import write_parquet
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import (
        knockout_heatmaps,
        knockout_layer_curves,
        knockout_positions_heatmaps,
        skip_curves,
    )

    out = Path(out)
    summary: dict[str, Any] = {"n_probes": len(probes)}
    started = time.perf_counter()
    positions = options.positions

    def grid_run(opts: KnockoutOptions) -> KnockoutResult:
        return _swept(executor, model, probes, out, f"knockouts_{opts.positions}",
                      partial(knockout_grid, options=opts, batch_size=batch_size), join=KnockoutResult.join_parts,
                      load=KnockoutResult.load)

    knock = grid_run(options)
    knock.save(out)
    summary["knockouts"] = knock.settings
    write_json(out / "summary.json", summary)
    maybe_fail("knockouts.written")
    log(f"  knockouts ({positions} positions): {len(probes)} probes x {knock.settings['n_configs']} configurations in "
        f"{knock.settings['seconds']:.1f} s ({1000 * knock.settings['seconds'] / max(1, len(knock.rows)):.1f} ms "
        "per configuration)")
    table = knock.summary()
    for mode in sorted(set(table["mode"])):
        for k in sorted(set(table.loc[(table["mode"] == mode) & (table["control"] != "whole_mlp"), "k"])):
            save_figure(knockout_heatmaps(knock, k=k, mode=mode), out / f"knockout_{mode}_k{k}", png=png, height=900)
    zero_ks = sorted(set(table.loc[(table["mode"] == "zero_top") & (table["control"] == "targeted"), "k"]))
    if zero_ks and 1 in set(table["window"]):
        k_curve = 100 if 100 in zero_ks else zero_ks[-1]
        layers = knock.layer_table(k=k_curve, window=1)
        write_parquet(out / "knockout_layers.parquet", layers)
        summary["share_changed_by_layer"] = {"k": k_curve, "window": 1, "rows": layers.to_dict(orient="records")}
        save_figure(knockout_layer_curves(knock, k=k_curve, window=1), out / f"knockout_layers_k{k_curve}", png=png,
                    height=500)
    if compare_positions:
        other = "last" if positions == "all" else "all"
        second = grid_run(dataclasses.replace(options, positions=other))
        second.save(out, name=f"knockouts_{other}")
        summary[f"knockouts_{other}"] = second.settings
        both = KnockoutResult.stack_runs([knock, second])
        present = list(dict.fromkeys(knock.probes["group"]))
        memorized = [g for g in ("memorized idioms", "memorized facts") if g in present] or present[:1]
        for group in memorized:
            for k in zero_ks:
                save_figure(knockout_positions_heatmaps(both, k=k, group=group),
                            out / f"knockout_positions_{group.replace(' ', '_')}_k{k}", png=png, height=500)
        log(f"  knockouts ({other} positions): {second.settings['seconds']:.1f} s")
    if value_vector_ks:
        vv = value_vector_ranks(model, probes, ks=value_vector_ks, rank_by=options.rank_by)
        vv.save(out)
        summary["value_vectors"] = vv.settings
    if skip:
        skip_windows = tuple(w for w in options.grid.windows if w <= model.n_layers) or (1,)
        skipped = _swept(executor, model, probes, out, "skipping",
                         partial(skip_layers, options=SkipOptions(windows=skip_windows), batch_size=min(batch_size, 64)),
                         join=SkipResult.join_parts, load=SkipResult.load)
        skipped.save(out)
        maybe_fail("skipping.written")
        summary["skipping"] = skipped.settings
        save_figure(skip_curves(skipped), out / "skip_curves", png=png, height=550)
        log(f"  layer skipping: {skipped.settings['n_spans']} spans in {skipped.settings['seconds']:.1f} s")
    summary["total_seconds"] = round(time.perf_counter() - started, 2)
    best = table[(table["mode"] == "zero_top")].groupby(["group", "control"])["changed"].max().reset_index()
    summary["max_share_changed_zero_top"] = best.to_dict(orient="records")
    write_json(out / "summary.json", summary)
    return summary


def run_patching(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: PatchingOptions = PatchingOptions(),
    batch_size: int = 64,
    png: bool = True,
    executor: "Executor | None" = None,
) -> Any:
    """Activation patching of `probes` (clean idiom -> corrupted prompt), exact or estimated by
    attribution patching (`options.method`); parquet, mean heatmaps per set and summary.json under
    `out`. Returns the `PatchingResult`. On `executor`'s workers when given: the same files."""
    from idiom_lens.analyses.interventions import patch
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    out = Path(out)
    from idiom_lens.analyses.interventions.patching import PatchingResult
    result = _swept(executor, model, probes, out, f"patching_{options.method}",
                    partial(patch, options=options, batch_size=batch_size),
                    join=PatchingResult.join_parts, load=PatchingResult.load)
    result.save(out)
    maybe_fail("patching.written")
    write_json(out / "summary.json", result.settings | {"skipped": result.skipped.to_dict(orient="records")})
    for variant in options.corruption.variants:
        valid = result.pairs[(result.pairs["variant"] == variant) & result.pairs["valid"]]
        for group in sorted(set(valid["group"])):
            save_figure(patching_heatmaps(result, variant=variant, group=group),
                        out / f"patching_{variant}_{group.replace(' ', '_')}", png=png, width=1300, height=600)
    return result


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
    executor: "Executor | None" = None,
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
                    out / f"tracing_{group.replace(' ', '_')}", png=png, height=420)
    for position in ("last noised", "last"):
        save_figure(tracing_curves(result, position=position, summary=summary),
                    out / f"tracing_curves_{position.replace(' ', '_')}", png=png, height=420)
    write_json(out / "summary.json", result.settings)
    return result


def run_attention_knockout(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: AttentionKnockoutOptions = AttentionKnockoutOptions(),
    batch_size: int = 64,
    png: bool = True,
    executor: "Executor | None" = None,
) -> Any:
    """Attention knockout of `probes` (`options`: the last position cut from each source in windows
    of `options.window` layers); result, summary CSV, figure and summary.json under `out`. On
    `executor`'s workers when given: the same files."""
    from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutResult, attention_knockout
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.attention_knockout import attention_knockout_curves

    out = Path(out)
    result = _swept(executor, model, probes, out, "attention_knockout",
                    partial(attention_knockout, options=options, batch_size=batch_size),
                    join=AttentionKnockoutResult.join_parts, load=AttentionKnockoutResult.load)
    result.save(out)
    write_text(out / "attention_knockout_summary.csv", result.summary().to_csv(index=False))
    save_figure(attention_knockout_curves(result), out / "attention_knockout", png=png, width=1300, height=520)
    write_json(out / "summary.json", {"settings": result.settings})
    return result


def run_lenses(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    lenses: Sequence[str] = ("tuned", "jacobian"),
    lens_settings: dict[str, Any] | None = None,
    batch_size: int = 16,
    part_size: int = 256,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: "Executor | None" = None,
) -> Any:
    """The trajectory of `probes` (`resid_post`) under the logit lens and each learned lens of
    `lenses` (from the cache, trained first when missing, never on a probe), each under
    `out/<lens>/` like the trajectory stage, and their comparison under `out/`: promotion layers,
    boundaries and tests per lens, the held-out KL per layer, the side-by-side figure."""
    from idiom_lens.analyses.lens_comparison import compare_lenses
    from idiom_lens.io import write_parquet
    from idiom_lens.lenses.cache import LensSettings, heldout_table, obtain_lens
    from idiom_lens.lenses.cache import bundled_prompts
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.lenses import heldout_kl_figure, lens_trajectories_figure

    out = Path(out)
    unknown = [k for k in lenses if k not in ("logit", "tuned", "jacobian")]
    if unknown:
        raise InputError(f"lenses {unknown} are unknown: expected tuned and/or jacobian")
    settings = LensSettings(**(lens_settings or {}))
    prompts = sorted(set(bundled_prompts()) | {p.prompt for p in probes})
    trajectories: dict[str, TrajectoryResult] = {}
    kl_tables = []
    for kind in ("logit", *[k for k in lenses if k != "logit"]):
        lens = obtain_lens(model, kind, settings=settings, prompts=prompts, log=log)
        result = resumable_trajectory(model, probes, out / kind, sites=("resid_post",), batch_size=batch_size,
                                      part_size=part_size, lens=lens, log=log, executor=executor)
        write_trajectory_outputs(result, out / kind, title=model.spec, png=png)
        trajectories[kind] = result
        if kind != "logit":
            table = heldout_table(model, kind, settings=settings, prompts=prompts)
            kl_tables.append(table if not kl_tables else table[table["lens"] != "logit"])
    heldout = pd.concat(kl_tables, ignore_index=True) if kl_tables else None
    comparison = compare_lenses(trajectories, heldout_kl=heldout)
    comparison.save(out)
    if heldout is not None:
        save_figure(heldout_kl_figure(comparison, title=f"{model.spec}: held-out KL to the model's output per layer"),
                    out / "heldout_kl", png=png, width=900, height=450)
    save_figure(lens_trajectories_figure(comparison, title=f"{model.spec}: the trajectory under each lens"),
                out / "lens_trajectories", png=png, width=520 * len(trajectories) + 120, height=750)
    text = comparison.summary_text()
    write_text(out / "summary.md", f"# Lenses: {model.spec}\n\n" + text.replace("\n", "\n\n") + "\n")
    write_json(out / "summary.json", {
        "settings": model.settings(), "lens_settings": dataclasses.asdict(settings),
        "lenses": {k: r.lens for k, r in trajectories.items()}, "summary": text,
        "boundaries": comparison.boundaries.to_dict("records"),
        "promotion": comparison.promotion.to_dict("records"),
        "tests": comparison.tests.to_dict("records"),
        "heldout_kl": [] if heldout is None else heldout.to_dict("records"),
    })
    return comparison


def write_recall(folder: Any, *, png: bool = True) -> Any:
    """The "where recall lives" table, peaks and figure of a model's finished stages (a
    `layout.ModelFolder`), rewritten from them every time (cheap: no forward pass)."""
    from idiom_lens.io import write_parquet
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.recall import where_recall_lives
    from idiom_lens.study.layout import RECALL

    profile = folder.recall_profile()
    out = folder.stage_path(RECALL)
    profile.save(out)
    peaks = profile.peaks()
    save_figure(where_recall_lives(profile, title=f"Where recall lives, {folder.name}"), out / "where_recall_lives",
                png=png, width=1100, height=1160)
    write_json(out / "summary.json", {"peak_per_measure_and_set": peaks.to_dict(orient="records"),
                                      "settings": profile.settings})
    return profile


def sample_by_group(
    memorization: MemorizationResult, probes: Sequence[Probe], *, per_group: int, seed: int = 0,
    whole: Sequence[str] = (),
) -> list[Probe]:
    """Up to `per_group` probes of each comparison set (memorized idioms, ...), seeded, in input
    order; the sets named in `whole` are kept entire (e.g. every memorized idiom for a figure)."""
    import random

    by_id = {p.id: p for p in probes}
    chosen: set[str] = set()
    groups: dict[str, list[str]] = {}
    for record in memorization.records:
        groups.setdefault(record.group, []).append(record.probe_id)
    unknown = set(whole) - set(groups)
    if unknown:
        raise InputError(f"whole: no probes in set(s) {sorted(unknown)}; sets present: {sorted(groups)}")
    for group in sorted(groups):
        ids = groups[group]
        n = len(ids) if group in whole else min(per_group, len(ids))
        chosen.update(random.Random(f"{seed}-{group}").sample(ids, n))
    return [by_id[r.probe_id] for r in memorization.records if r.probe_id in chosen]
