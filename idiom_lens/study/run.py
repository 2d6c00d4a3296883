"""The whole study on one model, resumable: what `idiom-lens run` does, callable from Python.

    from idiom_lens.study import StudyOptions, run_study
    study = run_study("gemma-3-270m", "results", StudyOptions(knockout_sample=6))

Stages, each written under OUT/<model>/<stage>/ (see `layout`) as it completes and skipped on a
rerun when finished with the same settings:
1. trajectory: memorization and the logit-lens trajectory of every probe, its phases;
   lenses (with `lenses`): the same under the tuned and/or Jacobian lens, compared;
2. interventions: neuron knockouts at every position (the authors'), top-100 neurons of each layer
   (windows of one layer, the post-MLP norm frozen) beside a random, a norm-matched and a
   whole-MLP control, the value-vector statistic (top-1), and layer skipping, on a seeded sample
   per set;
3. patching: activation patching of a sample of memorized and non-memorized idioms;
4. attribution: direct logit attribution (compatibility mode) of a seeded sample per set;
5. tracing: causal tracing (ROME) of a sample of memorized and non-memorized idioms;
6. attention_knockout: the last position cut from the idiom's earlier words, a sample per set;
7. recall: every method above per layer in one figure (rewritten from the stages each run);
8. ground_truth (off by default, `ground_truth`): idioms implanted into known MLP layers, every
   localizer scored on finding them (`study.ground_truth`);
9. report: one HTML page over everything under OUT.

On a masked LM (BERT) the trajectory (memorization at the mask, the logit lens read through the
MLM head), the interventions (knockouts, layer skipping; not the value-vector statistic),
activation patching and causal tracing run; the other stages are not run, each with its one-line
reason in the log and in OUT/<model>/not_run.json (`MASKED_LM_REASONS`).

A stage is reused only when its completion marker verifies: same key (the model's settings, the
sampled probes and every argument of the stage function, see `parts.stage_key`) and intact
files. Changing a setting that changes a stage's numbers or files redoes that stage and only the
stages that depend on it; `batch_size` changes speed, not results, and redoes nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutOptions
from idiom_lens.analyses.interventions.knockouts import KnockoutGrid, KnockoutOptions
from idiom_lens.analyses.interventions.patching import PatchingOptions
from idiom_lens.analyses.interventions.tracing import TracingOptions
from idiom_lens.analyses.memorization import MemorizationResult
from idiom_lens.analyses.trajectory import TRAJECTORY_SITES
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.locks import folder_lock
from idiom_lens.models.loading import LoadedModel, load_model
from idiom_lens.study.ground_truth import GroundTruthOptions
from idiom_lens.study.layout import (
    ATTENTION_KNOCKOUT,
    ATTRIBUTION,
    GROUND_TRUTH,
    INTERVENTIONS,
    LENSES,
    PATCHING,
    TRACING,
    TRAJECTORY,
    StudyFolder,
)

# Why a stage does not run on a masked LM, in one line each.
MASKED_LM_REASONS: dict[str, str] = {
    LENSES: "learned lenses are trained to predict the next token's distribution; a masked LM predicts its mask",
    ATTENTION_KNOCKOUT: "the knockout cuts the last token's attention to the earlier words; in a bidirectional "
                        "model the words also read the mask, so the cut means something else",
    GROUND_TRUTH: "implants are trained on next-token prediction",
}
PATCHING_GROUPS = ("memorized idioms", "non-memorized idioms")
TRACING_GROUPS = PATCHING_GROUPS


@dataclass(frozen=True, kw_only=True)
class StudyOptions:
    """What a study runs on, how much of it and how each stage runs; validated on creation (`InputError`).

    The stages' options (`knockouts`, `tracing`, `patching`, `attention_knockout`) are part of
    their stage's key: changing one redoes that stage. `seed` replaces their own `seed` when the
    study runs (`dataclasses.replace`), so that one seed drives every sample, random control,
    corruption and noise draw of a study.
    """

    datasets: tuple[str, ...] = ("idioms", "text", "facts")  # bundled names or files (e.g. idiomem.jsonl)
    limit: int | None = None  # only the first N probes of each set (a quick look); None = all
    sites: tuple[str, ...] = ("resid_post",)  # trajectory reads per layer
    lenses: tuple[str, ...] = ()  # learned lenses (tuned, jacobian) to read the trajectory through as well
    attribution_sample: int = 30  # probes per set (0 skips the stage)
    attribution_top_neurons: int = 20  # top neurons kept per probe and per set by the attribution stage
    knockout_sample: int = 6  # probes per set for knockouts and skipping (0 skips)
    patching_sample: int = 4  # idioms per set, memorized and not (0 skips)
    tracing_sample: int = 2  # idioms per set, memorized and not, for causal tracing (0 skips)
    attn_knockout_sample: int = 10  # probes per set for the attention knockout (0 skips)
    seed: int = 0  # of every per-set sample and random control (replaces the stage options' seed)
    # Knockouts: the authors' positions (every position), k = 100 in windows of one layer, with the random,
    # norm-matched and whole-MLP controls (4 x 18 configurations per probe on Gemma 3 270M, ~1 min for
    # 30 probes on one core), the post-MLP norm frozen (KnockoutOptions' default: a knockout removes exactly
    # its neurons' contributions), zero ablation; `idiom-lens knockout --full-grid` runs the paper's whole grid.
    knockouts: KnockoutOptions = KnockoutOptions(grid=KnockoutGrid.STUDY, norm="frozen")
    value_vector_ks: tuple[int, ...] = (1,)  # the authors' value-vector statistic for these k
    patching: PatchingOptions = PatchingOptions()
    # Causal tracing: the residual stream at one layer, MLP and attention outputs in windows of 5 layers
    # (ROME's 10 is over half the depth of an 18-layer model), 10 noise samples; 20-45 s per idiom on 2 cores.
    tracing: TracingOptions = TracingOptions(windows=(5,))
    attention_knockout: AttentionKnockoutOptions = AttentionKnockoutOptions()
    # Ground truth for the localizers (`study.ground_truth`): off by default (it trains 6 implants and runs
    # every localizer on each, about 90 minutes on 2 cores); a `GroundTruthOptions` runs it last.
    ground_truth: GroundTruthOptions | None = None
    batch_size: int = 16  # speed only: not part of any stage's key
    part_size: int = 256  # probes per resumable trajectory part
    png: bool = True  # static PNG figures beside the HTML ones
    # Speed only, like batch_size (not part of any stage's key): the sweeps on this many Ray workers
    # (`idiom_lens.study.executors`; None or 1: this process), on the cluster at ray_address if given.
    workers: int | None = None
    ray_address: str | None = None
    worker_threads: int | None = None  # torch threads per worker (default: the cores divided among them)
    probes_per_task: int | None = None  # per Ray task of the per-probe sweeps (default: two tasks per worker and part)

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str) or not self.datasets:
            raise InputError(f"datasets must be a non-empty sequence of set names or files, got {self.datasets!r}")
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "sites", tuple(self.sites))
        unknown = [s for s in self.sites if s not in TRAJECTORY_SITES]
        if not self.sites or unknown:
            raise InputError(f"sites must be among {', '.join(TRAJECTORY_SITES)}, got {list(self.sites)}")
        object.__setattr__(self, "value_vector_ks", tuple(int(k) for k in self.value_vector_ks))
        if any(k < 1 for k in self.value_vector_ks):
            raise InputError(f"value_vector_ks must be >= 1, got {list(self.value_vector_ks)}")
        for name, kind in (("knockouts", KnockoutOptions), ("patching", PatchingOptions),
                           ("tracing", TracingOptions), ("attention_knockout", AttentionKnockoutOptions)):
            if not isinstance(getattr(self, name), kind):
                raise InputError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        if self.ground_truth is not None and not isinstance(self.ground_truth, GroundTruthOptions):
            raise InputError(f"ground_truth must be a GroundTruthOptions or None, got {self.ground_truth!r}")
        object.__setattr__(self, "lenses", tuple(k for k in dict.fromkeys(self.lenses) if k != "logit"))
        unknown = [k for k in self.lenses if k not in ("tuned", "jacobian")]
        if unknown:
            raise InputError(f"lenses {unknown} are unknown: expected logit, tuned or jacobian")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1 (or None for all), got {self.limit}")
        for name in ("attribution_sample", "knockout_sample", "patching_sample", "tracing_sample",
                     "attn_knockout_sample"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "part_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.worker_options()  # InputError for bad values, or workers without Ray installed

    def worker_options(self) -> Any:
        from idiom_lens.study.workers import WorkerOptions

        return WorkerOptions(workers=self.workers, address=self.ray_address, threads=self.worker_threads,
                             probes_per_task=self.probes_per_task)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_study(
    model: str | LoadedModel,
    out: str | Path,
    options: StudyOptions | None = None,
    *,
    compat_model: LoadedModel | None = None,
    device: str = "cpu",
    n_devices: int | None = None,
    report: bool = True,
    log: Callable[[str], None] = print,
) -> StudyFolder:
    """Run (or resume) the study of `model` (a spec or a loaded model) into the results folder
    `out` and return it, opened, holding the folder's lock meanwhile (`FolderInUse` when another
    process writes there). The attribution stage needs the compatibility-mode model: pass
    `compat_model`, or it is loaded from the spec. Raises `InputError` for bad options or a folder
    written by an earlier idiom_lens. With `options.workers` > 1 (or a `ray_address`) the sweeps run
    on Ray workers (`idiom_lens.study.executors`): the same folder, faster."""
    options = options or StudyOptions()
    with folder_lock(out, log=log):  # one run per results folder (`idiom_lens.locks`)
        return _run_study(model, out, options, compat_model=compat_model, device=device, n_devices=n_devices,
                          report=report, log=log)


def _run_study(
    model: str | LoadedModel, out: str | Path, options: StudyOptions, *, compat_model: LoadedModel | None,
    device: str, n_devices: int | None, report: bool, log: Callable[[str], None],
) -> StudyFolder:
    from idiom_lens.datasets.selection import join_probe_sets

    started = time.perf_counter()
    study = StudyFolder.create(out)
    probes = join_probe_sets(options.datasets, limit=options.limit)
    if isinstance(model, str):
        model = load_model(model, device=device, n_devices=n_devices)
    else:
        device = model.device
    folder = study.model(model.name)
    log(f"[run] {len(probes)} probes ({', '.join(options.datasets)}) on {model.spec} -> {folder.path}")
    from idiom_lens.study.executors import open_executor

    with open_executor(model, options.worker_options(), device=device, n_devices=n_devices, log=log) as executor:
        return _run_stages(study, folder, probes, model, options, compat_model=compat_model, device=device,
                           n_devices=n_devices, report=report, log=log, executor=executor, started=started)


def _run_stages(
    study: StudyFolder, folder: Any, probes: Any, model: LoadedModel, options: StudyOptions, *,
    compat_model: LoadedModel | None, device: str, n_devices: int | None, report: bool,
    log: Callable[[str], None], executor: Any, started: float,
) -> StudyFolder:
    """The stages of `run_study`, the sweeps on `executor` (this process or Ray workers)."""
    from idiom_lens.study.parts import run_stage
    from idiom_lens.study.report import build_report
    from idiom_lens.study.stages import (
        resumable_trajectory,
        run_attention_knockout,
        run_attribution,
        run_knockouts,
        run_lenses,
        run_patching,
        run_tracing,
        write_recall,
        write_trajectory_outputs,
    )

    log("[run] trajectory")
    result = resumable_trajectory(model, probes.probes, folder.stage_path(TRAJECTORY), sites=options.sites,
                                  batch_size=options.batch_size, part_size=options.part_size, log=log,
                                  executor=executor)
    outputs = write_trajectory_outputs(result, folder.stage_path(TRAJECTORY), title=model.spec, png=options.png)
    log(outputs.phases.summary_text)
    log(result.memorization.summary().to_string(index=False))

    def stage(name: str, fn: Callable[..., Any], stage_model: LoadedModel, per_group: int,
              stage_options: dict[str, Any], groups: Sequence[str] | None = None) -> Any:
        """`run_stage` on a seeded sample of `per_group` probes per set (of `groups` only, if given)."""
        sample = sample_by_group(result.memorization, probes.probes, per_group=per_group, seed=options.seed)
        if groups is not None:
            group_of = {r.probe_id: r.group for r in result.memorization.records}
            sample = [p for p in sample if group_of[p.id] in groups]
        if not sample:
            log(f"[run] {name}: no probes in the sample, skipped")
            return None
        return run_stage(name, fn, stage_model, sample, folder.stage_path(name), stage_options, log=log)

    refused = MASKED_LM_REASONS if model.masked else {}
    asked = {LENSES: bool(options.lenses), INTERVENTIONS: options.knockout_sample, PATCHING: options.patching_sample,
             ATTRIBUTION: options.attribution_sample, TRACING: options.tracing_sample,
             ATTENTION_KNOCKOUT: options.attn_knockout_sample, GROUND_TRUTH: options.ground_truth is not None}
    not_run = {name: reason for name, reason in refused.items() if asked[name]}
    for name, reason in not_run.items():
        log(f"[run] {name}: not run on a masked LM: {reason}")
    if not_run:
        from idiom_lens.io import write_json

        write_json(folder.path / "not_run.json", {"objective": model.objective, "stages": not_run})

    def wanted(name: str) -> bool:
        return bool(asked[name]) and name not in not_run

    png = options.png
    if wanted(LENSES):
        run_stage(LENSES, run_lenses, model, probes.probes, folder.stage_path(LENSES),
                  {"lenses": options.lenses, "png": png, "batch_size": options.batch_size,
                   "part_size": options.part_size, "executor": executor}, log=log)
    seed = options.seed  # replaces each stage option's own seed (`StudyOptions`)
    if wanted(INTERVENTIONS):
        stage(INTERVENTIONS, run_knockouts, model, options.knockout_sample,
              {"options": dataclasses.replace(options.knockouts, seed=seed),
               "value_vector_ks": options.value_vector_ks, "png": png, "executor": executor})
    if wanted(PATCHING):
        corruption = dataclasses.replace(options.patching.corruption, seed=seed)
        stage(PATCHING, run_patching, model, options.patching_sample,
              {"options": dataclasses.replace(options.patching, corruption=corruption), "png": png,
               "executor": executor},
              groups=PATCHING_GROUPS)
    if wanted(ATTRIBUTION):
        if compat_model is None and model.masked:  # BERT's attribution reads it raw, its norms frozen
            compat_model = model
        if compat_model is None:  # its settings are part of the stage's key
            compat_model = load_model(model.spec, mode="compat", device=device, n_devices=n_devices)
        digest = stage(ATTRIBUTION, run_attribution, compat_model, options.attribution_sample,
                       {"top": options.attribution_top_neurons, "batch_size": options.batch_size, "png": png})
        if digest is not None:
            log(f"  invariant max abs error: {digest['invariant_max_abs_error']}")
    if wanted(TRACING):
        stage(TRACING, run_tracing, model, options.tracing_sample,
              {"options": dataclasses.replace(options.tracing, seed=seed), "png": png, "executor": executor},
              groups=TRACING_GROUPS)
    if wanted(ATTENTION_KNOCKOUT):
        stage(ATTENTION_KNOCKOUT, run_attention_knockout, model, options.attn_knockout_sample,
              {"options": options.attention_knockout, "png": png, "executor": executor})
    if any(folder.has(s) for s in (INTERVENTIONS, TRACING, ATTENTION_KNOCKOUT, ATTRIBUTION)):
        log("[run] recall: every method per layer")
        write_recall(folder, png=png)
    if wanted(GROUND_TRUTH):
        from idiom_lens.study.ground_truth import run_ground_truth

        log("[run] ground truth: implanted idioms, every localizer scored")
        run_ground_truth(model.spec, folder.stage_path(GROUND_TRUTH), options.ground_truth, png=png, log=log)
    if report:
        log("[run] report")
        log(f"  {build_report(study.root)}")
    log(f"[run] done in {time.perf_counter() - started:.0f} s; results in {folder.path}")
    return study


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
