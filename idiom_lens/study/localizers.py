"""The localizers: every method that says at which layer a prediction is carried, run as resumable
stages on one model and one probe list, and read back as one per-layer table (`RecallProfile`).

Used by the "where recall lives" experiment (memorized against non-memorized idioms and text) and
by the ground-truth benchmark (idioms implanted into a known MLP layer, `study.ground_truth`), so
that both score exactly the same methods with the same settings:
- MLP knockouts: the top-100 neurons of one layer (`rank_by`) zeroed at every position, post-MLP
  norm frozen (primary) and live, beside `knockout_controls` (default: a control matched on the
  norm of the vector it removes; ``whole_mlp``: the whole layer's MLP);
- causal tracing: MLP and attention outputs restored in windows of `window` layers at the last
  noised and the last token, normalized by each probe's total effect;
- the noise designs without restoration (`noise_effects`);
- attention knockout: the last position cut from the earlier words, windows of `window` (and 1);
- direct logit attribution (compatibility mode);
- (`lenses`) the layer trajectory read through the logit lens (and a tuned lens): the lens gains;
- (`patching`) attribution patching of the MLP and attention outputs, each prompt patched into
  its corrupted versions (`analyses.interventions.patching`'s word and prefix swaps).
Each stage writes under FOLDER/<stage>/ and is reused when its key (model, probes, options) is
unchanged (`study.parts.run_stage`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel

LENS_KINDS = ("logit", "tuned")
NORMS = ("frozen", "live")


@dataclass(frozen=True, kw_only=True)
class LocalizerOptions:
    """Which localizers run and how: the knockouts' post-MLP `norms` (the first is primary),
    neuron ranking and controls (`analyses.interventions.knockouts.CONTROLS`), the tracing and
    attention-knockout `window`, the `noise_samples`, whether the noise designs run, whether
    attention knockout also runs layer by layer (`single_layer_attention`: windows of 1, for a
    reader of single layers; the profile reads `window`), the lens
    trajectories (`lenses`: among ``logit``, ``tuned``; the tuned lens is passed to
    `run_localizers`), whether attribution patching runs (`patching`) and the `seed` of the random
    controls, the noise and the corruptions. Raises `InputError` for a bad value."""

    norms: tuple[str, ...] = NORMS
    rank_by: str = "effective"
    knockout_controls: tuple[str, ...] = ("matched",)
    window: int = 5
    noise_samples: int = 10
    noise_effects: bool = True
    single_layer_attention: bool = True
    lenses: tuple[str, ...] = ()
    patching: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "norms", tuple(self.norms))
        object.__setattr__(self, "lenses", tuple(self.lenses))
        object.__setattr__(self, "knockout_controls", tuple(self.knockout_controls))
        if not self.norms or any(n not in NORMS for n in self.norms):
            raise InputError(f"norms must be among {list(NORMS)}, got {list(self.norms)}")
        if any(k not in LENS_KINDS for k in self.lenses):
            raise InputError(f"lenses must be among {list(LENS_KINDS)}, got {list(self.lenses)}")
        for name in ("window", "noise_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class LocalizerStage:
    """One stage: its folder name, function, which model it needs (``model`` or ``compat``) and options."""

    name: str
    fn: Callable[..., Any]
    model: str
    options: dict[str, Any]


def localizer_stages(options: LocalizerOptions, *, tuned_lens: Any | None = None) -> list[LocalizerStage]:
    """The stages of `options`, in the order they run (`tuned_lens`: the lens the tuned-lens
    trajectory reads through, needed when ``tuned`` is among `options.lenses`)."""
    from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions, TracingOptions
    from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutOptions
    from idiom_lens.analyses.interventions.patching import CorruptionOptions, PatchingOptions
    from idiom_lens.study.stages.attention_knockout import run_attention_knockout
    from idiom_lens.study.stages.attribution import run_attribution
    from idiom_lens.study.stages.knockouts import run_knockouts
    from idiom_lens.study.stages.patching import run_patching
    from idiom_lens.study.stages.tracing import run_noise_effects, run_tracing

    png = {"png": False}
    knock = {"compare_positions": False, "value_vector_ks": (), "skip": False} | png
    stages = [LocalizerStage(f"knockouts_{norm}", run_knockouts, "model",
                             {"options": KnockoutOptions(grid=KnockoutGrid.STUDY, controls=options.knockout_controls,
                                                         positions="all",
                                                         norm=norm, rank_by=options.rank_by, seed=options.seed)}
                             | knock)
              for norm in options.norms]
    stages.append(LocalizerStage("tracing", run_tracing, "model",
                                 {"options": TracingOptions(sites=("mlp", "attn"), windows=(options.window,),
                                                            noise_samples=options.noise_samples, positions="key",
                                                            seed=options.seed)} | png))
    if options.noise_effects:
        stages.append(LocalizerStage("noise_effects", run_noise_effects, "model",
                                     {"noise_samples": options.noise_samples, "seed": options.seed} | png))
    for window in sorted({options.window, 1} if options.single_layer_attention else {options.window}):
        stages.append(LocalizerStage(f"attention_knockout_w{window}", run_attention_knockout, "model",
                                     {"options": AttentionKnockoutOptions(window=window)} | png))
    stages.append(LocalizerStage("attribution", run_attribution, "compat", {"progress": False} | png))
    if options.patching:
        stages.append(LocalizerStage("patching_attribution", run_patching, "model",
                                     {"options": PatchingOptions(method="attribution", sites=("attn_out", "mlp_out"),
                                                                 corruption=CorruptionOptions(seed=options.seed))}
                                     | png))
    for kind in options.lenses:
        if kind == "tuned" and tuned_lens is None:
            raise InputError("the tuned-lens trajectory needs a tuned lens (tuned_lens=...)")
        stages.append(LocalizerStage(f"trajectory_{kind}", run_lens_trajectory, "model",
                                     {"lens": tuned_lens if kind == "tuned" else None}))
    return stages


def run_lens_trajectory(model: LoadedModel, probes: Sequence[Probe], out: Path, *, lens: Any | None = None,
                        batch_size: int = 16) -> Any:
    """The layer trajectory of `probes` through `lens` (None: the logit lens, at resid_mid and
    resid_post; a learned lens reads resid_post only), saved under `out`."""
    from idiom_lens.analyses.trajectory import layer_trajectory, save_trajectory

    sites = ("resid_post",) if lens is not None else ("resid_mid", "resid_post")
    result = layer_trajectory(model, probes, sites=sites, lens=lens, batch_size=batch_size)
    save_trajectory(result, out)
    return result


def run_localizers(
    model: LoadedModel,
    probes: Sequence[Probe],
    folder: Path,
    options: LocalizerOptions,
    *,
    compat: Callable[[], LoadedModel],
    tuned_lens: Any | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Every stage of `options` on `probes` under `folder`/<stage> (each resumable), the
    compatibility-mode model loaded by `compat()` when the first stage that needs it comes (a
    stage's key holds its model's settings). Returns the seconds per stage."""
    import time

    from idiom_lens.study.parts import run_stage

    seconds: dict[str, float] = {}
    compat_model: LoadedModel | None = None
    for stage in localizer_stages(options, tuned_lens=tuned_lens):
        if stage.model == "compat" and compat_model is None:
            compat_model = compat()
        started = time.perf_counter()
        run_stage(stage.name, stage.fn, compat_model if stage.model == "compat" else model, list(probes),
                  folder / stage.name, stage.options, log=log)
        seconds[stage.name] = round(time.perf_counter() - started, 1)
        log(f"{folder.name} {stage.name}: {seconds[stage.name]:.0f} s")
    return seconds


def localizer_profile(folder: Path, *, sets: Mapping[str, Sequence[str]], window: int, min_total_effect: float,
                      seed: int = 0) -> Any:
    """The `RecallProfile` of the localizer results saved under `folder` (every stage present) on
    `sets` ({set name: probe ids})."""
    from idiom_lens.analyses.attribution import AttributionResult
    from idiom_lens.analyses.interventions import AttentionKnockoutResult, KnockoutResult, TracingResult
    from idiom_lens.analyses.interventions.patching import PatchingResult
    from idiom_lens.analyses.recall import recall_profile
    from idiom_lens.analyses.trajectory import load_trajectory

    knock = [KnockoutResult.load(folder / f"knockouts_{norm}") for norm in NORMS
             if (folder / f"knockouts_{norm}").is_dir()]
    lenses = {kind: load_trajectory(folder / f"trajectory_{kind}") for kind in LENS_KINDS
              if (folder / f"trajectory_{kind}").is_dir()}
    return recall_profile(
        knockouts=(KnockoutResult.stack_runs(knock) if len(knock) > 1 else knock[0]) if knock else None,
        tracing=TracingResult.load(folder / "tracing") if (folder / "tracing").is_dir() else None,
        attention=AttentionKnockoutResult.load(folder / f"attention_knockout_w{window}")
        if (folder / f"attention_knockout_w{window}").is_dir() else None,
        attribution=AttributionResult.load(folder / "attribution") if (folder / "attribution").is_dir() else None,
        trajectory=lenses.get("logit"), tuned_trajectory=lenses.get("tuned"),
        patching=PatchingResult.load(folder / "patching_attribution")
        if (folder / "patching_attribution").is_dir() else None,
        sets=sets, min_total_effect=min_total_effect, seed=seed)
