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
import inspect
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pandas as pd

from idiom_lens.datasets.probes import Probe, ProbeSet
from idiom_lens.errors import InputError
from idiom_lens.faults import maybe_fail
from idiom_lens.groups import ordered
from idiom_lens.io import check_marker, key_digest, write_json, write_marker, write_text
from idiom_lens.analyses.memorization import MemorizationResult
from idiom_lens.lenses.lens import Lens
from idiom_lens.models.loading import LoadedModel
from idiom_lens.analyses.phases import PhaseAnalysis, analyse_phases
from idiom_lens.study.layout import FORMAT
if TYPE_CHECKING:
    from idiom_lens.distributed import WorkerPool
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


def _fingerprint(obj: Any) -> str:
    return key_digest(obj)[:16]


def _model_key(model: LoadedModel) -> dict[str, Any]:
    settings = dict(model.settings())
    settings.pop("versions", None)
    return settings


PART_MARKER = ".part.json"


def _probe_key(probes: Sequence[Probe]) -> list[dict[str, Any]]:
    """Every field of every probe, in order (a changed flag or prompt changes the key)."""
    return [dataclasses.asdict(p) for p in probes]


def _part_key(model: LoadedModel, probes: Sequence[Probe], sites: Sequence[str],
              lens: Lens | None = None) -> dict[str, Any]:
    """What determines a trajectory part: model settings, sites, the part's probes (and the lens,
    when it is not the logit lens: logit-lens parts keep the keys they always had)."""
    key = {"format": FORMAT, "model": _model_key(model), "sites": list(sites), "probes": _probe_key(probes)}
    if lens is not None and lens.kind != "logit":
        key["lens"] = lens.describe()
    return key


def part_name(model: LoadedModel, probes: Sequence[Probe], sites: Sequence[str], lens: Lens | None = None) -> str:
    """The folder name (under `parts/`) of the trajectory part of `probes`."""
    return f"trajectory-{_fingerprint(_part_key(model, probes, sites, lens))}"


def _clear(folder: Path, marker: Path, *, keep: str | None = None) -> None:
    """Empty a job's folder before (re)computing it: the marker goes first, then everything else,
    so no stale or half-written output of an earlier run survives into the new one. `keep` names
    a subfolder left in place (a stage's hidden parts, each verified by its own marker)."""
    marker.unlink(missing_ok=True)
    if not folder.exists():
        return
    if keep is None or not (folder / keep).is_dir():
        shutil.rmtree(folder)
        return
    for path in folder.iterdir():
        if path.name != keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


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
    pool: "WorkerPool | None" = None,
) -> TrajectoryResult:
    """`layer_trajectory` (through `lens`, default the logit lens) in parts saved under
    `out_dir/parts/`; finished, intact parts are reused.

    With a `pool` (`idiom_lens.distributed`), the unfinished parts run on its workers, one part
    per task (a part's forward batches are sorted by length within the part, so a part is the
    smallest piece that gives the single-process numbers); the same part folders come out."""
    out_dir = Path(out_dir)
    probes = list(probes)
    parts: list[TrajectoryResult] = []
    n_parts = (len(probes) + part_size - 1) // part_size
    if pool is not None:
        return TrajectoryResult.concat(_trajectory_on_pool(pool, model, probes, out_dir, sites=sites, lens=lens,
                                                           batch_size=batch_size, part_size=part_size, log=log))
    for i in range(n_parts):
        chunk = probes[i * part_size : (i + 1) * part_size]
        key = _part_key(model, chunk, sites, lens)
        part_dir = out_dir / "parts" / part_name(model, chunk, sites, lens)
        marker = part_dir / PART_MARKER
        reason = check_marker(marker, key)
        if reason is None:
            log(f"  part {i + 1}/{n_parts}: reusing {part_dir.name}")
            parts.append(load_trajectory(part_dir, settings=model.settings()))
            continue
        if part_dir.exists():
            log(f"  part {i + 1}/{n_parts}: recomputing {part_dir.name}, {reason}")
        _clear(part_dir, marker)
        started = time.perf_counter()
        result = layer_trajectory(model, chunk, sites=sites, batch_size=batch_size, lens=lens, progress=progress)
        save_trajectory(result, part_dir)
        write_marker(marker, key)  # last: the part is finished only once its marker exists
        maybe_fail("trajectory.part")
        log(f"  part {i + 1}/{n_parts}: {len(chunk)} probes in {time.perf_counter() - started:.1f} s")
        parts.append(result)
    return TrajectoryResult.concat(parts)


def _trajectory_on_pool(
    pool: "WorkerPool", model: LoadedModel, probes: list[Probe], out_dir: Path, *, sites: Sequence[str],
    lens: Lens | None, batch_size: int, part_size: int, log: Callable[[str], None],
) -> list[TrajectoryResult]:
    from idiom_lens.distributed import Part, PartsPlan, run_parts, whole_part

    chunks = [probes[i : i + part_size] for i in range(0, len(probes), part_size)]
    parts = [Part(tuple(c), out_dir / "parts" / part_name(model, c, sites, lens), _part_key(model, c, sites, lens))
             for c in chunks]
    if len(parts) < pool.options.n_workers:
        log(f"  {len(parts)} part{'s' if len(parts) != 1 else ''} for {pool.options.n_workers} workers: smaller parts "
            "(--part-size) would keep them all busy")
    settings = model.settings()
    plan = PartsPlan(label="part", fn=layer_trajectory,
                     kwargs={"sites": tuple(sites), "batch_size": batch_size, "lens": lens},
                     units=whole_part, merge=lambda results: results[0], save=save_trajectory,
                     load=lambda folder: load_trajectory(folder, settings=settings), fault_point="trajectory.part")
    return run_parts(pool, parts, plan, desc="trajectory", log=log)


# Parts of the sweeps that have none in one process (knockouts, skipping, patching, attention
# knockout) when they run on workers: hidden (`.parts/`, beside the stage's files), so that the
# visible files equal a single-process run's; each is a resumable part like the trajectory's.
SHARDS = ".parts"
SHARD_PROBES = 8  # probes per hidden part: what a killed driver loses at most, per sweep


def _swept(
    pool: "WorkerPool | None", model: LoadedModel, probes: Sequence[Probe], out: Path, name: str,
    fn: Callable[..., Any], options: dict[str, Any], *, merge: Callable[[list[Any]], Any], load: Callable[[Path], Any],
) -> Any:
    """`fn(model, probes, **options, progress=True)` in this process without a pool; with one, on
    its workers one probe per task, in hidden resumable parts under `out/.parts/` (reused when
    finished and intact), merged in probe order: the single-process result, row for row."""
    if pool is None:
        return fn(model, probes, **options, progress=True)
    from idiom_lens.distributed import Part, PartsPlan, per_probe, run_parts

    probes = list(probes)
    option_key = {k: keyed(v) for k, v in options.items() if k not in NOT_IN_KEY}
    parts = []
    for i in range(0, len(probes), SHARD_PROBES):
        chunk = probes[i : i + SHARD_PROBES]
        key = {"format": FORMAT, "analysis": f"{fn.__module__}.{fn.__qualname__}", "model": _model_key(model),
               "options": option_key, "probes": _probe_key(chunk)}
        parts.append(Part(tuple(chunk), Path(out) / SHARDS / f"{name}-{_fingerprint(key)}", key))
    plan = PartsPlan(label=f"{name} part", fn=fn, kwargs=options, units=per_probe, merge=merge,
                     save=lambda result, folder: result.save(folder), load=load)
    return merge(run_parts(pool, parts, plan, desc=name, log=lambda line: None))


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
    files = list(save_trajectory(result, out_dir))
    files.append(write_parquet(out_dir / "phases_per_probe.parquet", phases.probes))
    files.append(write_parquet(out_dir / "phases_curves.parquet", phases.curves))
    for name in ("promotion_tests", "boundary_sensitivity", "matching", "matched_pairs"):
        frame = getattr(phases, name)
        if frame is not None:
            files.append(write_parquet(out_dir / f"phases_{name}.parquet", frame))
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


def summary_markdown(result: TrajectoryResult, phases: PhaseAnalysis) -> str:
    s = result.settings
    memo = result.memorization.summary()
    lines = [
        f"# Recall trajectory: {s.get('model_spec')}",
        "",
        f"Model `{s.get('model_name')}`, {s.get('n_layers')} layers, numerics `{s.get('numerics_mode')}`, "
        f"BOS prepended: {s.get('prepend_bos')}, sites: {', '.join(result.sites)}, read through the "
        f"{result.lens_kind} lens.",
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
    if phases.promotion_tests is not None and len(phases.promotion_tests):
        lines += ["## Are memorized probes promoted earlier? (permutation tests)", "",
                  markdown_table(phases.promotion_tests), ""]
    if phases.matching is not None and len(phases.matching):
        lines += ["## Confidence-matched control", "", markdown_table(phases.matching), ""]
    if phases.boundary_sensitivity is not None:
        lines += ["## Boundary vs its top-1 share threshold", "", markdown_table(phases.boundary_sensitivity), ""]
    return "\n".join(lines)


def markdown_table(frame: Any, *, digits: int = 3) -> str:
    """A pipe table (pandas' `to_markdown` would need tabulate for these few lines)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else f"{v:.{digits}f}"
        return str(v)

    rows = [list(map(str, frame.columns))] + [[fmt(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(frame.columns))
    return "\n".join(lines)


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
    pool: "WorkerPool | None" = None,
) -> dict:
    """Neuron knockouts (`options`: the grid, targeted, random and magnitude-matched controls,
    whole-MLP ceiling), the value-vector statistic and layer skipping of `probes`; parquet,
    figures and summary.json under `out`, each written as soon as its step completes.

    `compare_positions` also runs the other positions ("last" beside "all", or the reverse), written
    as knockouts_<positions>*.parquet, with side-by-side figures (`knockout_positions_heatmaps`).
    Layer skipping takes the grid's window lengths that fit the model, at every position.
    With a `pool` the knockouts and layer skipping run on its workers (`_swept`): the same files."""
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
    from idiom_lens.distributed import merge_probe_rows

    def grid_run(opts: KnockoutOptions) -> KnockoutResult:
        return _swept(pool, model, probes, out, f"knockouts_{opts.positions}", knockout_grid,
                      {"options": opts, "batch_size": batch_size}, merge=merge_probe_rows, load=KnockoutResult.load)

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
        both = KnockoutResult.concat([knock, second])
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
        skipped = _swept(pool, model, probes, out, "skipping", skip_layers,
                         {"options": SkipOptions(windows=skip_windows), "batch_size": min(batch_size, 64)},
                         merge=merge_probe_rows, load=SkipResult.load)
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
    pool: "WorkerPool | None" = None,
) -> Any:
    """Activation patching of `probes` (clean idiom -> corrupted prompt), exact or estimated by
    attribution patching (`options.method`); parquet, mean heatmaps per set and summary.json under
    `out`. Returns the `PatchingResult`. With a `pool`, the probes run on its workers: the same files."""
    from idiom_lens.analyses.interventions import patch
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    out = Path(out)
    from idiom_lens.analyses.interventions.patching import PatchingResult
    from idiom_lens.distributed import merge_patching

    result = _swept(pool, model, probes, out, f"patching_{options.method}", patch,
                    {"options": options, "batch_size": batch_size}, merge=merge_patching, load=PatchingResult.load)
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
    pool: "WorkerPool | None" = None,
) -> Any:
    """Causal tracing (`options`) of `probes` in parts of `part_size` probes under `out/parts/` (finished,
    intact parts are reused: an interrupted run loses at most one part); then the joined result,
    its summary, heatmaps per set, layer curves and summary.json under `out`. Returns the
    `TracingResult`. With a `pool`, the unfinished parts' probes run on its workers, one probe per
    task: the same parts and files."""
    from idiom_lens.analyses.interventions.tracing import TracingResult, causal_trace, noise_scale
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.tracing import tracing_curves, tracing_heatmaps

    out = Path(out)
    if part_size < 1:
        raise InputError(f"part_size must be >= 1, got {part_size}")
    scale = noise_scale(model, multiplier=options.multiplier)
    part_options = {"sites": list(options.sites), "windows": list(options.windows), "samples": options.noise_samples,
                    "seed": options.seed, "noise_words": list(options.noise_words) if options.noise_words else None,
                    "scale": dataclasses.asdict(scale)}
    parts = []
    n_parts = (len(probes) + part_size - 1) // part_size
    if pool is not None:
        from idiom_lens.distributed import Part, PartsPlan, per_probe, run_parts

        pool_parts = []
        for i in range(n_parts):
            chunk = list(probes[i * part_size : (i + 1) * part_size])
            key = {"format": FORMAT, "analysis": "causal_tracing", "model": _model_key(model), "options": part_options,
                   "probes": _probe_key(chunk)}
            pool_parts.append(Part(tuple(chunk), out / "parts" / f"tracing-{_fingerprint(key)}", key))
        plan = PartsPlan(label="tracing part", fn=causal_trace,
                         kwargs=dict(options=options, scale=scale, batch_size=batch_size),
                         units=per_probe, merge=TracingResult.concat, save=lambda r, folder: r.save(folder),
                         load=TracingResult.load, fault_point="tracing.part")
        parts = run_parts(pool, pool_parts, plan, desc="causal tracing", log=log)
        n_parts = 0  # every part is done: the loop below has nothing left to do
    for i in range(n_parts):
        chunk = list(probes[i * part_size : (i + 1) * part_size])
        key = {"format": FORMAT, "analysis": "causal_tracing", "model": _model_key(model), "options": part_options,
               "probes": _probe_key(chunk)}
        part_dir = out / "parts" / f"tracing-{_fingerprint(key)}"
        marker = part_dir / PART_MARKER
        reason = check_marker(marker, key)
        if reason is None:
            log(f"  tracing part {i + 1}/{n_parts}: reusing {part_dir.name}")
            parts.append(TracingResult.load(part_dir))
            continue
        if part_dir.exists():
            log(f"  tracing part {i + 1}/{n_parts}: recomputing {part_dir.name}, {reason}")
        _clear(part_dir, marker)
        part = causal_trace(model, chunk, options, scale=scale, batch_size=batch_size, progress=True)
        part.save(part_dir)
        write_marker(marker, key)
        maybe_fail("tracing.part")
        log(f"  tracing part {i + 1}/{n_parts}: {len(chunk)} probes in {part.settings['seconds']:.1f} s")
        parts.append(part)
    result = TracingResult.concat(parts)
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
    pool: "WorkerPool | None" = None,
) -> Any:
    """Attention knockout of `probes` (`options`: the last position cut from each source in windows
    of `options.window` layers); result, summary CSV, figure and summary.json under `out`. With a `pool`,
    the probes run on its workers: the same files."""
    from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutResult, attention_knockout
    from idiom_lens.distributed import merge_probe_rows
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.attention_knockout import attention_knockout_curves

    out = Path(out)
    result = _swept(pool, model, probes, out, "attention_knockout", attention_knockout,
                    {"options": options, "batch_size": batch_size}, merge=merge_probe_rows,
                    load=AttentionKnockoutResult.load)
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
    pool: "WorkerPool | None" = None,
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
                                      part_size=part_size, lens=lens, log=log, pool=pool)
        write_trajectory_outputs(result, out / kind, title=model.spec, png=png)
        trajectories[kind] = result
        if kind != "logit":
            table = heldout_table(model, kind, settings=settings, prompts=prompts)
            kl_tables.append(table if not kl_tables else table[table["lens"] != "logit"])
    heldout = pd.concat(kl_tables, ignore_index=True) if kl_tables else None
    comparison = compare_lenses(trajectories, heldout_kl=heldout)
    write_parquet(out / "lens_promotion.parquet", comparison.promotion)
    write_parquet(out / "lens_tests.parquet", comparison.tests)
    write_parquet(out / "lens_boundaries.parquet", comparison.boundaries.astype(str))
    if heldout is not None:
        write_parquet(out / "lens_heldout_kl.parquet", heldout)
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
    write_parquet(out / "recall_profile.parquet", profile.to_dataframe())
    peaks = profile.peaks()
    write_parquet(out / "recall_peaks.parquet", peaks)
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


STAGE_MARKER = ".stage.json"

# Stage-function arguments that change neither the numbers (beyond float rounding) nor the files
# a stage writes: left out of its key, so a rerun with another batch size reuses finished stages.
NOT_IN_KEY: frozenset[str] = frozenset({"batch_size", "progress", "log", "pool"})


def keyed(value: Any) -> Any:
    """`value` as a key holds it: an options dataclass as its class name and fields (readable in
    the marker, stable across releases that keep the fields), anything else as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": type(value).__name__, **{f.name: keyed(getattr(value, f.name))
                                                  for f in dataclasses.fields(value)}}
    return value


def stage_key(
    fn: Callable[..., Any], model: LoadedModel, probes: Sequence[Probe], options: dict[str, Any]
) -> dict[str, Any]:
    """Everything that determines what `fn(model, probes, out, **options)` writes: the stage
    function, the model's settings, every field of every probe, and every other argument of `fn`
    as it will be called, defaults included (so an option added later is keyed without anyone
    remembering to; an options object by its class name and fields, `keyed`), except those in
    `NOT_IN_KEY`."""
    signature = inspect.signature(fn)
    bound = signature.bind(model, probes, Path("."), **options)  # TypeError on an unknown option
    bound.apply_defaults()
    positional = list(signature.parameters)[:3]
    return {
        "format": FORMAT,
        "stage": f"{fn.__module__}.{fn.__qualname__}",
        "model": _model_key(model),
        "probes": _probe_key(probes),
        "options": {name: keyed(value) for name, value in bound.arguments.items()
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
    altered, the marker unreadable) is recomputed from an empty `stage_dir`: the folder belongs
    to its stage. The marker is written only after `fn` returns, so a crash or an error inside
    the stage leaves it unfinished."""
    stage_dir = Path(stage_dir)
    key = stage_key(fn, model, probes, options)
    marker = stage_dir / STAGE_MARKER
    reason = check_marker(marker, key)
    if reason is None:
        log(f"[run] {name}: already done, reusing {stage_dir}")
        return None
    if stage_dir.exists():
        log(f"[run] {name}: recomputing, {reason}")
    _clear(stage_dir, marker, keep=SHARDS)
    log(f"[run] {name}: {len(probes)} probes")
    result = fn(model, probes, stage_dir, **options)
    maybe_fail("stage.outputs")
    write_marker(marker, key)
    return result


def study_probes(names: Sequence[str] = ("idioms", "text", "facts"), *, limit: int | None = None) -> ProbeSet:
    """The probe sets the study compares (bundled names or files, e.g. the authors' IdioMem file),
    joined, optionally the first `limit` of each. Ids must be unique across the sets."""
    from idiom_lens.datasets import load_probes

    sets = []
    for name in names:
        ps = load_probes(name)
        sets.append(ProbeSet(ps.name, ps.probes[:limit] if limit else ps.probes))
    joined = ProbeSet.concat("study", sets)
    seen: dict[str, str] = {}
    for ps in sets:
        for probe in ps.probes:
            if probe.id in seen:
                raise InputError(f"probe id {probe.id!r} is in both {seen[probe.id]!r} and {ps.name!r}: "
                                 "give each set unique ids")
            seen[probe.id] = ps.name
    return joined
