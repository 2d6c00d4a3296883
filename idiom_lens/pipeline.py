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
from idiom_lens.memorization import MemorizationResult
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
    from idiom_lens import attribution_stats as stats
    from idiom_lens.attribution import attribute_probes
    from idiom_lens.io import write_json, write_parquet
    from idiom_lens.plots.attribution import layer_contribution_figure, top_neurons_table
    from idiom_lens.plots.export import save_figure

    result = attribute_probes(model, probes, batch_size=batch_size, top_neurons=top, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in result.to_parquet(out)]
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
    ks: Sequence[int] = (1, 10, 100, 1000),
    windows: Sequence[int] = (1, 2, 3, 4, 5),
    modes: Sequence[str] = ("zero_top", "keep_top"),
    keep_top_ks: Sequence[int] | None = (100,),
    control: str | None = "random",
    rank_by: str = "magnitude",
    positions: str = "last",
    seed: int = 0,
    batch_size: int = 128,
    skip: bool = True,
    png: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Neuron knockouts (+ random control) and layer skipping of `probes`; parquet, figures and
    summary.json under `out`, each written as soon as its step completes."""
    from idiom_lens.interventions import knockout_grid, skip_layers
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import knockout_heatmaps, skip_curves

    out = Path(out)
    summary: dict[str, Any] = {"n_probes": len(probes)}
    started = time.perf_counter()
    knock = knockout_grid(
        model, probes, ks=ks, windows=windows, modes=modes, keep_top_ks=keep_top_ks, control=control,
        rank_by=rank_by, positions=positions, seed=seed, batch_size=batch_size, progress=True,
    )
    knock.write(out)
    summary["knockouts"] = knock.settings
    write_json(out / "summary.json", summary)
    log(f"  knockouts: {len(probes)} probes x {knock.settings['n_configs']} configurations in "
        f"{knock.settings['seconds']:.1f} s ({1000 * knock.settings['seconds'] / max(1, len(knock.rows)):.1f} ms "
        "per configuration)")
    for mode in modes:
        for k in sorted(set(knock.rows.loc[knock.rows["mode"] == mode, "k"])):
            save_figure(knockout_heatmaps(knock, k=k, mode=mode), out / f"knockout_{mode}_k{k}", png=png, height=900)
    if skip:
        skipped = skip_layers(model, probes, windows=windows, batch_size=min(batch_size, 64), progress=True)
        skipped.write(out)
        summary["skipping"] = skipped.settings
        save_figure(skip_curves(skipped), out / "skip_curves", png=png, height=550)
        log(f"  layer skipping: {skipped.settings['n_spans']} spans in {skipped.settings['seconds']:.1f} s")
    summary["total_seconds"] = round(time.perf_counter() - started, 2)
    table = knock.summary()
    best = table[(table["mode"] == "zero_top")].groupby(["group", "control"])["changed"].max().reset_index()
    summary["max_share_changed_zero_top"] = best.to_dict(orient="records")
    write_json(out / "summary.json", summary)
    return summary


def run_patching(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    variants: Sequence[str] = ("word_swap", "prefix_swap"),
    seed: int = 0,
    keep_last: int = 2,
    batch_size: int = 64,
    png: bool = True,
) -> Any:
    """Activation patching of `probes` (clean idiom -> corrupted prompt); parquet, mean heatmaps
    per set and summary.json under `out`. Returns the `PatchingResult`."""
    from idiom_lens.interventions import patch_probes
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    out = Path(out)
    result = patch_probes(model, probes, variants=variants, seed=seed, keep_last=keep_last,
                          batch_size=batch_size, progress=True)
    result.write(out)
    write_json(out / "summary.json", result.settings | {"skipped": result.skipped.to_dict(orient="records")})
    for variant in variants:
        valid = result.pairs[(result.pairs["variant"] == variant) & result.pairs["valid"]]
        for group in sorted(set(valid["group"])):
            save_figure(patching_heatmaps(result, variant=variant, group=group),
                        out / f"patching_{variant}_{group.replace(' ', '_')}", png=png, width=1300, height=600)
    return result


def sample_by_group(
    memorization: MemorizationResult, probes: Sequence[Probe], *, per_group: int, seed: int = 0
) -> list[Probe]:
    """Up to `per_group` probes of each comparison set (memorized idioms, ...), seeded, in input order."""
    import random

    by_id = {p.id: p for p in probes}
    chosen: set[str] = set()
    groups: dict[str, list[str]] = {}
    for record in memorization.records:
        groups.setdefault(record.group, []).append(record.probe_id)
    for group in sorted(groups):
        ids = groups[group]
        chosen.update(random.Random(f"{seed}-{group}").sample(ids, min(per_group, len(ids))))
    return [by_id[r.probe_id] for r in memorization.records if r.probe_id in chosen]


def stage_is_done(stage_dir: Path, key: dict[str, Any]) -> bool:
    """True when `stage_dir` holds a finished stage computed with exactly `key`."""
    marker = Path(stage_dir) / ".stage.json"
    return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("key") == _fingerprint(key)


def mark_stage_done(stage_dir: Path, key: dict[str, Any]) -> None:
    write_json(Path(stage_dir) / ".stage.json", {"key": _fingerprint(key)})


def study_probes(names: Sequence[str] = ("idioms", "text", "facts"), *, limit: int | None = None) -> ProbeSet:
    """The bundled sets the study compares, joined (optionally the first `limit` of each)."""
    from idiom_lens.datasets import load_probes

    sets = []
    for name in names:
        ps = load_probes(name)
        sets.append(ProbeSet(ps.name, ps.probes[:limit] if limit else ps.probes))
    return ProbeSet.concat("study", sets)
