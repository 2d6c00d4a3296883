"""Ground truth for the localizers (issue 25; method.md section 7): implant new idioms into an MLP
layer we choose, run every localizer on them, and score how well each finds that layer.

For each depth (`layers`, default an early, a middle and a late layer) and seed: the bundled
implanted idioms (`datasets.implanted`) are trained into that layer only (`models.implant`,
stored in the model cache and reused), the implanted model's side effects are measured (held-out
KL on ordinary text, the bundled idioms' memorization rate before and after), and every
localizer of `study.localizers` runs on a seeded sample of the implanted idioms the implanted
model now predicts. Two controls sit beside it, both scored against the same true layer:
- the same idioms on the base model (no implant): what a method says without the implant, i.e.
  its prior for that layer;
- bundled idioms the base model memorizes, on the implanted model (first seed of each depth):
  whether a method points at the implanted layer whatever the probe.
Scores (`analyses.localization.layer_scores`): per measure and implant, the true layer's rank
among the layers per probe, as a score in [0, 1] (1 = first, chance 0.5) with a bootstrap
interval over idioms, pooled over seeds per depth (tracing's restored shares rank a probe's
layers as its raw effects do, so only the raw effects are scored); in neurons mode, the precision of each neuron
ranking's top k against the trained neurons (`neuron_precision`: the knockouts' effective,
magnitude and DLA rankings and |activation| at the implanted layer, per scored idiom).

The order: the base model's localizers, every implant (trained or read from the model cache), their
side effects together (the base model's pass over the text once for all), then each implanted
model's localizers. Everything is written under OUT as it completes (each localizer stage
resumable, each implant reused from the cache, the side effects reused while the implants and
probes are the same): implants.parquet, side_effects.parquet, neuron_precision.parquet (neurons
mode), localization*.parquet (every set), localization.md, and the figures localization_scores
and localization_profiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from idiom_lens.errors import InputError
from idiom_lens.study.localizers import LocalizerOptions

IMPLANTED = "implanted"
NO_IMPLANT = "no implant (base model)"
MEMORIZED = "memorized idioms (implanted model)"
SETS = (IMPLANTED, NO_IMPLANT, MEMORIZED)
DEFAULT_LOCALIZERS = LocalizerOptions(norms=("frozen",), knockout_controls=("whole_mlp",), noise_effects=False,
                                      single_layer_attention=False, lenses=("logit", "tuned"), patching=True)


def default_layers(n_layers: int) -> tuple[int, ...]:
    """An early, a middle and a late layer: 2, 8 and 14 of Gemma 3 270M's 18, the same depth
    fractions in another model."""
    return tuple(sorted({round(f * n_layers / 18) for f in (2, 8, 14)}))


@dataclass(frozen=True, kw_only=True)
class GroundTruthOptions:
    """What the benchmark runs: implant `layers` (None: `default_layers`) x `seeds` in `mode`
    (``layer`` or ``neurons``, `models.implant.ImplantOptions`) from the probe set `dataset`;
    every localizer of `localizers` on `n_scored` of the implanted idioms (a sample seeded by
    `sample_seed`, the same for every implant where they are predicted) and on `n_control`
    memorized bundled idioms (first seed of each depth); tracing's total-effect floor
    `min_total_effect`; `implant`: any other `ImplantOptions` field (lr, max_epochs, ...;
    default: theirs). `layer_localizers=False` (neurons mode only) skips the layer-level
    localizers and their controls: implants, side effects and neuron precision only, for a quick
    neuron-level benchmark. Raises `InputError` for a bad value."""

    layers: tuple[int, ...] | None = None
    seeds: tuple[int, ...] = (0, 1)
    mode: str = "layer"
    dataset: str = "implanted"
    n_scored: int = 20
    n_control: int = 10
    localizers: LocalizerOptions = field(default_factory=lambda: DEFAULT_LOCALIZERS)
    implant: dict[str, Any] = field(default_factory=dict)  # other `ImplantOptions` (lr, max_epochs, ...)
    min_total_effect: float = 0.05
    sample_seed: int = 0
    layer_localizers: bool = True

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or min(self.layers) < 0:
                raise InputError(f"layers must be whole numbers >= 0, got {list(self.layers)}")
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds:
            raise InputError("seeds names no seed: expected e.g. (0, 1)")
        if self.mode not in ("layer", "neurons"):
            raise InputError(f"mode must be 'layer' or 'neurons', got {self.mode!r}")
        if not self.layer_localizers and self.mode != "neurons":
            raise InputError("layer_localizers=False leaves nothing to score in mode 'layer': neuron precision needs "
                             "mode 'neurons'")
        for name in ("n_scored", "n_control"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_scored" else 0):
                raise InputError(f"{name} must be a whole number >= {1 if name == 'n_scored' else 0}, got {value!r}")
        known = {"n_neurons", "train_inputs", "loss", "lr", "max_epochs", "stop_loss", "batch_size", "preserve",
                 "preserve_sentences"}
        if set(self.implant) - known:
            raise InputError(f"implant options {sorted(set(self.implant) - known)} are unknown: expected some of "
                             f"{sorted(known)}")
        if not isinstance(self.localizers, LocalizerOptions):
            raise InputError(f"localizers must be a LocalizerOptions, got {type(self.localizers).__name__}")

    def describe(self) -> dict[str, Any]:
        import dataclasses

        out = dataclasses.asdict(self)
        out["localizers"] = dataclasses.asdict(self.localizers)
        return out


def _group(set_name: str, layer: int, seed: int) -> str:
    return f"{set_name} | L{layer} s{seed}"


def _sample(ids: Sequence[str], n: int, seed: int) -> list[str]:
    import random

    ids = list(ids)
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))), key=ids.index)


def run_ground_truth(
    base_spec: str,
    out: str | Path,
    options: GroundTruthOptions = GroundTruthOptions(),
    *,
    png: bool = True,
    tuned_lens: Any | None = None,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Implant, run every localizer, score; everything written under `out` as it completes (see
    the module docstring). Returns the scores (`LocalizationScores.to_dataframe()`).

    The tuned-lens gains (``tuned`` among the localizers' lenses) read every model, implanted or
    not, through the BASE model's tuned lens (`tuned_lens`, default: the cached one,
    `lenses.cache.obtain_lens`, trained first if missing): the implant changes one layer, and a lens
    per implanted model would cost a lens training (about 10 minutes) per implant."""
    from idiom_lens.analyses.localization import layer_neuron_scores, neuron_precision
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_json, write_parquet
    from idiom_lens.models.implant import ImplantOptions, ensure_implant
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.localizers import run_localizers

    out = Path(out)
    started = time.perf_counter()
    base = load_model(base_spec)
    layers = options.layers if options.layers is not None else default_layers(base.n_layers)
    if max(layers) >= base.n_layers:
        raise InputError(f"layers {list(layers)} are outside {base.spec}'s {base.n_layers} layers")
    implanted = {p.id: p for p in load_probes(options.dataset)}
    idioms = list(load_probes("idioms"))
    text = list(load_probes("text"))
    memo = score_memorization(base, idioms, batch_size=32).to_dataframe()
    memorized = _sample(memo.loc[memo["memorized"], "probe_id"].tolist(), options.n_control, options.sample_seed)
    by_id = {p.id: p for p in idioms}
    # Candidates to score: twice as many as scored, so that n_scored remain where an implant misses some.
    scored = _sample(list(implanted), 2 * options.n_scored, options.sample_seed)
    localizers = options.localizers
    seconds: dict[str, float] = {}
    if "tuned" in localizers.lenses and tuned_lens is None and options.layer_localizers:
        from idiom_lens.lenses.cache import obtain_lens

        t = time.perf_counter()
        tuned_lens = obtain_lens(base, "tuned", log=log)
        seconds["tuned_lens"] = round(time.perf_counter() - t, 1)  # once per model: trained here or read

    def lens_for(model: Any) -> Any:
        """The base model's tuned lens, named for `model` (its layers and width are the base's)."""
        if tuned_lens is None or "tuned" not in localizers.lenses:
            return None
        tuned_lens.check_model(base)
        return replace(tuned_lens, model_name=model.name)

    compat_of: dict[str, Any] = {}

    def compat(spec: str) -> Callable[[], Any]:
        def load() -> Any:
            if spec not in compat_of:
                compat_of.clear()  # one compatibility-mode model in memory at a time
                compat_of[spec] = load_model(spec, mode="compat")
            return compat_of[spec]
        return load

    implants, precision, sets_of = [], [], {}
    base_ids = scored[:options.n_scored]

    def save_settings() -> None:
        write_json(out / "settings.json", {"base": base.settings(), "options": options.describe(),
                                           "layers": list(layers), "sets": sets_of, "base_ids": base_ids,
                                           "tuned_lens": None if tuned_lens is None else
                                           {**tuned_lens.describe(), "note": "the base model's tuned lens, "
                                            "read on every implanted model"},
                                           "seconds": seconds,
                                           "total_seconds": round(time.perf_counter() - started, 1)})

    t = time.perf_counter()
    if options.layer_localizers:
        run_localizers(base, [implanted[i] for i in base_ids], out / "base", replace(localizers, seed=0),
                       compat=compat(base.spec), tuned_lens=lens_for(base), log=log)
    seconds["base"] = round(time.perf_counter() - t, 1)
    # 1. Every implant, trained or read from the model cache.
    results: dict[str, tuple[int, int, Any]] = {}
    for layer in layers:
        for seed in options.seeds:
            name = f"L{layer}-s{seed}"
            t = time.perf_counter()
            result = ensure_implant(base, ImplantOptions(layer=layer, seed=seed, mode=options.mode,
                                                         **options.implant), dataset=options.dataset)
            results[name] = (layer, seed, result)
            implants.append({"implant": name, "layer": layer, "seed": seed, "spec": result.spec,
                             "rate": result.rate, "n_probes": result.n_probes, "epochs": result.epochs,
                             "train_seconds": result.seconds, "converged": result.converged,
                             "neurons": list(result.neurons) if result.neurons is not None else None})
            write_parquet(out / "implants.parquet", pd.DataFrame(implants))
            seconds[f"{name} implant"] = round(time.perf_counter() - t, 1)
            save_settings()
            log(f"[ground truth] {name}: implanted, rate {result.rate:.2f}, {seconds[f'{name} implant']:.0f} s")
    # 2. Their side effects, the base model's pass over the text once for all.
    t = time.perf_counter()
    _side_effects(base, results, out, text=text, idioms=[by_id[i] for i in memo["probe_id"]],
                  base_memorized=memo["memorized"].tolist(), log=log)
    seconds["side_effects"] = round(time.perf_counter() - t, 1)
    save_settings()
    # 3. The localizers on each implanted model.
    for name, (layer, seed, result) in results.items():
        t = time.perf_counter()
        model = load_model(result.spec)
        now = score_memorization(model, [implanted[i] for i in scored], batch_size=32).to_dataframe()
        ids = now.loc[now["memorized"], "probe_id"].tolist()[:options.n_scored]
        if not ids:
            raise InputError(f"the implant {result.spec} predicts none of the scored idioms: nothing to localize")
        controls = memorized if seed == options.seeds[0] and options.layer_localizers else []
        if options.layer_localizers:
            run_localizers(model, [implanted[i] for i in ids] + [by_id[i] for i in controls], out / name,
                           replace(localizers, seed=seed), compat=compat(result.spec),
                           tuned_lens=lens_for(model), log=log)
        if result.neurons is not None:
            rankings = layer_neuron_scores(model, [implanted[i] for i in ids], layer=layer)
            precision.append(neuron_precision(rankings, result.neurons, implant=name).to_dataframe()
                             .assign(layer=layer, seed=seed))
            write_parquet(out / "neuron_precision.parquet", pd.concat(precision, ignore_index=True))
        sets_of[name] = {_group(IMPLANTED, layer, seed): ids} if options.layer_localizers else {}
        if controls:
            sets_of[name][_group(MEMORIZED, layer, seed)] = controls
        seconds[name] = round(time.perf_counter() - t, 1)
        save_settings()
        log(f"[ground truth] {name}: {len(ids)} scored, {seconds[name]:.0f} s")
        del model
    return score_ground_truth(out, png=png)


def _side_effects(base: Any, results: dict[str, tuple[int, int, Any]], out: Path, *, text: Sequence[Any],
                  idioms: Sequence[Any], base_memorized: list[bool], log: Callable[[str], None]) -> pd.DataFrame:
    """side_effects.parquet: every implant's side effects (`analyses.implant_effects.implants_side_effects`),
    reused when side_effects.json holds the same key (the implants' deltas, the probes, the base)."""
    import json

    from idiom_lens.analyses.implant_effects import implants_side_effects
    from idiom_lens.io import key_digest, write_json, write_parquet
    from idiom_lens.models.implant_store import probes_digest, tensors_digest

    # sorted: a trained implant and one read from the cache list their tensors in different orders
    key = {"base": base.settings(), "implants": {name: tensors_digest(dict(sorted(r.deltas.items())))
                                                for name, (_, _, r) in results.items()},
           "text": probes_digest(text), "idioms": probes_digest(idioms), "base_memorized": key_digest(base_memorized)}
    table, marker = out / "side_effects.parquet", out / "side_effects.json"
    if table.is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == key_digest(key):
        log("[ground truth] side effects: reusing side_effects.parquet (same implants, probes and base model)")
        return pd.read_parquet(table)
    marker.unlink(missing_ok=True)
    effects = implants_side_effects(base, {name: r.deltas for name, (_, _, r) in results.items()},
                                    text_probes=text, idioms=idioms, base_memorized=base_memorized)
    frame = pd.concat([effects[name].to_dataframe().assign(implant=name, layer=layer, seed=seed)
                       for name, (layer, seed, _) in results.items()], ignore_index=True)
    write_parquet(table, frame)
    write_json(marker, {"key": key_digest(key), "settings": key})  # written last: the table is complete
    return frame


def score_ground_truth(out: str | Path, *, png: bool = True) -> pd.DataFrame:
    """The scores, tables and figures from the results saved under `out` (no model)."""
    import json

    from idiom_lens.analyses.localization import Implant, layer_scores
    from idiom_lens.analyses.recall import PER_PROBE_COLUMNS
    from idiom_lens.io import write_json, write_parquet, write_text
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.localization import localization_heatmap, localization_profiles
    from idiom_lens.study.localizers import localizer_profile
    from idiom_lens.study.text import markdown_table

    out = Path(out)
    if not (out / "settings.json").is_file():
        raise InputError(f"{str(out)!r} holds no ground-truth results (no settings.json): run `idiom-lens localize "
                         f"--out {out}` first")
    settings = json.loads((out / "settings.json").read_text())
    window = settings["options"]["localizers"]["window"]
    floor = settings["options"]["min_total_effect"]
    parts = [localizer_profile(out / name, sets=sets, window=window, min_total_effect=floor).per_probe
             for name, sets in settings["sets"].items() if sets]
    # The base model's values once per depth (not once per seed), on the idioms its first implant scored.
    first_seed = settings["options"]["seeds"][0]
    base_sets = {}
    for layer in settings["layers"]:
        implanted_ids = settings["sets"].get(f"L{layer}-s{first_seed}", {}).get(_group(IMPLANTED, layer, first_seed))
        if implanted_ids:
            base_sets[_group(NO_IMPLANT, layer, first_seed)] = [i for i in settings["base_ids"] if i in implanted_ids]
    if base_sets:
        parts.append(localizer_profile(out / "base", sets=base_sets, window=window,
                                       min_total_effect=floor).per_probe)
    per_probe = pd.concat(parts, ignore_index=True)[PER_PROBE_COLUMNS] if parts else \
        pd.DataFrame(columns=PER_PROBE_COLUMNS)
    tables = []
    for set_name in SETS:
        groups = sorted({g for g in per_probe["group"].unique() if g.startswith(set_name + " | ")})
        if not groups:
            continue
        true = {}
        for g in groups:
            layer, seed = g.split("| L")[1].split(" s")
            true[g] = Implant(layer=int(layer), seed=int(seed))
        part = per_probe[per_probe["group"].isin(groups)]
        # A probe's tracing share (effect / its total effect) ranks the layers as its raw effect does:
        # scored once, as the raw effect (the share differs only in which probes pass the floor).
        measures = [m for m in dict.fromkeys(part["measure"]) if not (m.startswith("tracing ") and " share " in m)]
        scores = layer_scores(part, true_layers=true, measures=measures)
        scores.save(out, name=f"localization_{set_name.split(' ')[0]}")
        tables.append(scores.to_dataframe().assign(set=set_name))
        if set_name == IMPLANTED:
            save_figure(localization_heatmap(scores, title="Does each localizer find the implanted layer?"),
                        out / "localization_scores", png=png)
            save_figure(localization_profiles(scores), out / "localization_profiles", png=png)
    columns = ["set", "measure", "depth", "n", "score", "score_low", "score_high", "hit", "profile_top_layer"]
    if tables:
        table = pd.concat(tables, ignore_index=True)
        write_parquet(out / "localization.parquet", table)
        shown = table.loc[table["scope"] == "depth", columns]
        text = markdown_table(shown) + "\n"
    else:  # neurons only (layer_localizers=False): no layer scores
        table = pd.DataFrame(columns=[*columns, "scope"])
        shown, text = table[columns], "No layer-level localizers ran (layer_localizers=False).\n"
    summary = {"settings": settings, "scores": shown.to_dict("records")}
    if (out / "neuron_precision.parquet").is_file():
        neurons = pd.read_parquet(out / "neuron_precision.parquet")
        neurons = neurons[["implant", "method", "k", "n", "precision", "precision_low", "precision_high",
                           "chance_precision", "recall", "chance_recall"]]
        text += "\nNeurons mode: precision@k of each ranking's top k neurons of the implanted layer against the " \
                "trained neurons\n\n" + markdown_table(neurons) + "\n"
        summary["neuron_precision"] = neurons.to_dict("records")
    write_text(out / "localization.md", text)
    write_json(out / "summary.json", summary)
    return table
