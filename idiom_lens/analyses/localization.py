"""Scoring localizers against a known answer (issue 25; method.md section 7).

Idioms implanted by fine-tuning into one chosen MLP layer (`idiom_lens.models.implant`) give a
ground truth: the layer (and, with neurons-only training, the neurons) that now carries them.
Every per-layer measure of `idiom_lens.analyses.recall` (its per-probe table, `PER_PROBE_COLUMNS`)
can then be scored on how well it finds that layer, and every neuron ranking on how well it
finds the trained neurons.

Layers (`layer_scores`), per measure, implant and probe: the probe's value per layer (num, or
num / den for a ratio measure: the same order, as den is one per probe) ranks the layers, higher
= more evidence; ties share their average rank. The true layer's rank r among the n layers with
a value gives the score 1 - (r - 1) / (n - 1): 1 when the true layer is first, 0 when last, 0.5 on
average by chance, and exactly 0.5 for a method whose values are the same everywhere (a share
over one probe is 0 or 1: a tie-prone measure is not rewarded for its ties). hit@1 is 1 when the
true layer alone is first, 1 / t when it ties with t - 1 others at the top (its chance of being
picked by a random tie-break; 1 / n for a constant method). Window measures (tracing, the
attention knockout: a window of layers centred on a layer) are scored on the layer their window
is centred on. Per implant: the mean score with a 95% percentile bootstrap interval over probes,
the hit@1 share with a Wilson interval, and the set's own profile (the measure's statistic per
layer): the layer it ranks first (none when tied) and the true layer's rank in it. Per depth
(scope "depth"), the implants of that layer (seeds) pooled: probes resampled within each implant.

Neurons (`neuron_precision`): per method, the scores it gives each neuron of the true layer (per
probe or one vector); precision of its top k against the trained neurons, and recall@k in Chang
et al.'s sense (trained neurons among the top k / trained neurons; chance k / d_mlp within the
layer), ties at the k-th place broken at random in expectation (a constant method scores chance).
`layer_neuron_scores` gives the toolkit's neuron rankings of one layer for a model and probes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float

from idiom_lens.analyses.recall import COLUMNS, PER_PROBE_COLUMNS, measure_info, profile_from_per_probe
from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.analyses.stats import bootstrap, bootstrap_mean_ci, wilson_interval
from idiom_lens.errors import InputError

SCORE_COLUMNS = ["measure", "statistic", "scope", "implant", "depth", "seed", "n_implants", "n", "n_layers",
                 "score", "score_low", "score_high", "chance_score", "hit", "hit_low", "hit_high", "chance_hit",
                 "profile_top_layer", "profile_rank", "profile_score"]
PROBE_SCORE_COLUMNS = ["measure", "implant", "depth", "seed", "probe_id", "n_layers", "top_layer", "rank", "score",
                       "hit"]
PROFILE_COLUMNS = ["scope", "implant", "depth", *COLUMNS]
NEURON_COLUMNS = ["method", "implant", "k", "k_share", "n_trained", "d_mlp", "n", "hits", "precision",
                  "precision_low", "precision_high", "recall", "recall_low", "recall_high", "chance_precision",
                  "chance_recall"]


@dataclass(frozen=True, kw_only=True)
class Implant:
    """What is known about one implanted model: the MLP layer its idioms were trained into, and
    the seed of the implant (implants of one layer with other seeds are pooled per depth)."""

    layer: int
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int | np.integer) or self.layer < 0:
            raise InputError(f"an implant's layer must be a whole number >= 0, got {self.layer!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer)):
            raise InputError(f"an implant's seed must be a whole number or None, got {self.seed!r}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))


@dataclass(frozen=True)
class LocalizationScores(Saved):
    """How well each measure finds the implanted layer: per measure x implant (scope "implant")
    and per measure x depth, the implants of that layer pooled (scope "depth") (`SCORE_COLUMNS`),
    the per-probe ranks they come from (`PROBE_SCORE_COLUMNS`) and the profiles the set-level
    columns read (`PROFILE_COLUMNS`: recall's per-layer table per implant and per depth).
    Saved as localization.parquet, localization_per_probe.parquet, localization_profile.parquet."""

    frame: pd.DataFrame
    per_probe: pd.DataFrame
    profile: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    default_name: ClassVar[str] = "localization"

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.frame, "per_probe": self.per_probe, "profile": self.profile}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        return cls(frame=saved.tables[""], per_probe=saved.tables["per_probe"], profile=saved.tables["profile"],
                   settings=saved.settings)


# --------------------------------------------------------------------------------------
# Ranks of the true layer
# --------------------------------------------------------------------------------------


def _true_rank(values: Float[np.ndarray, "row layer"], true: int) -> dict[str, np.ndarray]:
    """Per row: layers with a value, the first-ranked column (-1 when several share the top), the true
    column's average rank (1 = first), its score 1 - (rank - 1) / (n - 1) and its hit@1 (1 / t
    when t layers tie at the top with it). NaN where the true column has no value or n < 2."""
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    masked = np.where(finite, values, -np.inf)
    v = masked[:, [true]]
    above = (finite & (masked > v)).sum(axis=1)
    ties = (finite & (masked == v)).sum(axis=1)  # the true column included
    ok = finite[:, true] & (n >= 2)
    rank = np.where(ok, 1 + above + (ties - 1) / 2, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(ok, 1 - (rank - 1) / (n - 1), np.nan)
        hit = np.where(ok, np.where(above == 0, 1 / ties, 0.0), np.nan)
    at_top = (finite & (masked == masked.max(axis=1, keepdims=True))).sum(axis=1)
    top = np.where(at_top == 1, masked.argmax(axis=1), -1)
    return {"n_layers": n, "top": top, "rank": rank, "score": score, "hit": hit}


def _implants(true_layers: Mapping[str, int | Implant]) -> dict[str, Implant]:
    if not true_layers:
        raise InputError("true_layers names no implant: expected {implant (a group of the table): layer or Implant}")
    return {str(name): (v if isinstance(v, Implant) else Implant(layer=v)) for name, v in true_layers.items()}


def _probe_values(part: pd.DataFrame, statistic: str) -> pd.DataFrame:
    """[probe, layer] values of one measure and implant: num, or num / den for a ratio."""
    value = part["num"] / part["den"] if statistic == "ratio" else part["num"]
    table = part.assign(value=value.astype(np.float64)).pivot(index="probe_id", columns="layer", values="value")
    return table.sort_index(axis=1)


def _profile_row(profile: pd.DataFrame, true: int) -> dict[str, Any]:
    """The set-level columns: the layer the profile ranks first (None when several share the top),
    the true layer's rank and score."""
    layers, values = profile["layer"].to_numpy(), profile["value"].to_numpy(np.float64)
    if true not in set(layers.tolist()):
        return {"profile_top_layer": None, "profile_rank": np.nan, "profile_score": np.nan}
    got = _true_rank(values[None], int(np.flatnonzero(layers == true)[0]))
    top = int(got["top"][0])
    return {"profile_top_layer": int(layers[top]) if top >= 0 else None, "profile_rank": float(got["rank"][0]),
            "profile_score": float(got["score"][0])}


def _pooled_mean(arrays: list[np.ndarray], *, n_boot: int, seed: int) -> tuple[float, float, float]:
    """The mean over every probe of several implants, with a percentile bootstrap interval that
    resamples the probes within each implant (a stratified bootstrap: `stats.bootstrap`, unpaired)."""
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        return np.nan, np.nan, np.nan
    mean = float(np.concatenate(arrays).mean())
    if sum(len(a) for a in arrays) < 2:
        return mean, mean, mean
    low, high = bootstrap(tuple(arrays), lambda *a: np.concatenate(a, axis=1).mean(axis=1), n_boot=n_boot,
                          rng=seed, paired=False)
    return mean, float(low), float(high)


def layer_scores(
    per_probe: pd.DataFrame,
    *,
    true_layers: Mapping[str, int | Implant],
    measures: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LocalizationScores:
    """Score every measure of a recall per-probe table (`RecallProfile.per_probe`) on finding each
    implant's true layer (see the module docstring for the definitions).

    `true_layers` maps each implant (a group of the table, e.g. the set name given to
    `recall_profile(..., sets={name: implanted probe ids})` for that implanted model) to its
    layer, or to an `Implant` (layer and seed). Groups not named there are left out; an implant
    the table lacks raises `InputError`. `measures`: default every measure of the table. A measure
    with no value at the true layer (the lens gains at layer 0) scores NaN with n = 0."""
    implants = dict(sorted(_implants(true_layers).items()))  # one order, whatever the caller's: same intervals
    missing = [c for c in PER_PROBE_COLUMNS if c not in per_probe.columns]
    if missing:
        raise InputError(f"per_probe lacks the columns {missing}: expected a recall per-probe table "
                         f"({', '.join(PER_PROBE_COLUMNS)})")
    absent = sorted(set(implants) - set(per_probe["group"]))
    if absent:
        raise InputError(f"true_layers names implants the per-probe table does not have: {absent}; its groups: "
                         f"{sorted(set(per_probe['group']))}")
    have = list(dict.fromkeys(per_probe["measure"]))
    measures = have if measures is None else list(measures)
    unknown = [m for m in measures if m not in have]
    if unknown:
        raise InputError(f"measures {unknown} are not in the per-probe table; it has {have}")
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    table = per_probe[per_probe["group"].isin(list(implants)) & per_probe["measure"].isin(measures)]
    rows, probe_rows, profiles = [], [], []
    for measure in measures:
        statistic = measure_info(measure).statistic
        of = table[table["measure"] == measure]
        scored: dict[str, dict[str, np.ndarray]] = {}
        for name, implant in implants.items():
            part = of[of["group"] == name]
            if part.empty:
                continue
            values = _probe_values(part, statistic)
            layers = [int(c) for c in values.columns]
            if implant.layer in layers:
                got = _true_rank(values.to_numpy(), layers.index(implant.layer))
            else:  # no value at the true layer: nothing to score
                nan = np.full(len(values), np.nan)
                got = {"n_layers": np.isfinite(values.to_numpy()).sum(axis=1), "top": np.full(len(values), -1),
                       "rank": nan, "score": nan, "hit": nan}
            probe_rows.append(pd.DataFrame({
                "measure": measure, "implant": name, "depth": implant.layer, "seed": implant.seed,
                "probe_id": values.index.to_numpy(), "n_layers": got["n_layers"],
                "top_layer": [layers[t] if t >= 0 else None for t in got["top"]],
                "rank": got["rank"], "score": got["score"], "hit": got["hit"]}))
            kept = ~np.isnan(got["score"])
            scored[name] = {key: np.asarray(v)[kept] for key, v in got.items()}
            profile = profile_from_per_probe(part, n_boot=n_boot, seed=seed)
            profiles.append(profile.assign(scope="implant", implant=name, depth=implant.layer))
            mean, low, high = bootstrap_mean_ci(scored[name]["score"], n_boot=n_boot, seed=seed)
            rows.append(_score_row(measure, statistic, "implant", name, implant.layer, implant.seed, 1, scored[name],
                                   (float(mean), float(low), float(high)), _profile_row(profile, implant.layer)))
        for depth in sorted({i.layer for n, i in implants.items() if n in scored}):
            names = [n for n, i in implants.items() if i.layer == depth and n in scored]
            pooled = {key: np.concatenate([scored[n][key] for n in names]) for key in scored[names[0]]}
            part = of[of["group"].isin(names)]
            part = part.assign(probe_id=part["group"].astype(str) + "/" + part["probe_id"].astype(str),
                               group=f"layer {depth}")
            profile = profile_from_per_probe(part, n_boot=n_boot, seed=seed)
            profiles.append(profile.assign(scope="depth", implant=f"layer {depth}", depth=depth))
            interval = _pooled_mean([scored[n]["score"] for n in names], n_boot=n_boot, seed=seed)
            rows.append(_score_row(measure, statistic, "depth", f"layer {depth}", depth, None, len(names), pooled,
                                   interval, _profile_row(profile, depth)))
    frame = pd.DataFrame(rows, columns=SCORE_COLUMNS).astype({"seed": "Int64", "profile_top_layer": "Int64"})
    per = (pd.concat(probe_rows, ignore_index=True) if probe_rows else pd.DataFrame(columns=PROBE_SCORE_COLUMNS))
    per = per[PROBE_SCORE_COLUMNS].astype({"seed": "Int64", "top_layer": "Int64", "depth": int, "n_layers": int})
    profile = pd.concat(profiles, ignore_index=True)[PROFILE_COLUMNS] if profiles else \
        pd.DataFrame(columns=PROFILE_COLUMNS)
    settings = {"implants": {n: {"layer": i.layer, "seed": i.seed} for n, i in implants.items()},
                "measures": {m: measure_info(m).statistic for m in measures},
                "ignored_groups": sorted(set(per_probe["group"]) - set(implants)), "n_boot": n_boot, "seed": seed,
                "score": "1 - (rank - 1) / (n_layers - 1) of the true layer among the probe's layers, higher value "
                         "= more evidence, average rank on ties (chance 0.5)",
                "hit": "1 if the true layer alone ranks first, 1 / t if t layers tie at the top with it",
                "windows": "window measures are scored on the layer their window is centred on",
                "interval": "score: 95% percentile bootstrap over probes (per depth: within each implant); "
                            "hit: 95% Wilson"}
    return LocalizationScores(frame=frame, per_probe=per.reset_index(drop=True), profile=profile, settings=settings)


def _score_row(measure: str, statistic: str, scope: str, implant: str, depth: int, seed: int | None,
               n_implants: int, scored: dict[str, np.ndarray], interval: tuple[float, float, float],
               profile: dict[str, Any]) -> dict[str, Any]:
    n = len(scored["score"])
    hits = float(scored["hit"].sum())
    low, high = wilson_interval(hits, n)
    return {"measure": measure, "statistic": statistic, "scope": scope, "implant": implant, "depth": depth,
            "seed": seed, "n_implants": n_implants, "n": n,
            "n_layers": int(np.median(scored["n_layers"])) if n else 0,
            "score": interval[0], "score_low": interval[1], "score_high": interval[2], "chance_score": 0.5,
            "hit": hits / n if n else np.nan, "hit_low": float(low), "hit_high": float(high),
            "chance_hit": float(np.mean(1 / scored["n_layers"])) if n else np.nan, **profile}


# --------------------------------------------------------------------------------------
# Neurons of the true layer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronPrecision(Saved):
    """Per neuron-ranking method and k: precision of its top k against the trained neurons and
    recall@k, means over probes with 95% bootstrap intervals, chance beside (`NEURON_COLUMNS`).
    Saved as neuron_precision.parquet."""

    frame: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    default_name: ClassVar[str] = "neuron_precision"

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.frame}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        return cls(frame=saved.tables[""], settings=saved.settings)


def _trained_mask(trained: Sequence[int] | Bool[np.ndarray, " d_mlp"], d_mlp: int) -> np.ndarray:
    """The trained neurons as a boolean mask over the layer (from indices or a mask)."""
    given = np.asarray(trained)
    if given.dtype == bool:
        if given.shape != (d_mlp,):
            raise InputError(f"a trained-neuron mask must have d_mlp = {d_mlp} entries, got shape {given.shape}")
        mask = given.copy()
    elif given.size == 0:
        mask = np.zeros(d_mlp, dtype=bool)
    else:
        if given.ndim != 1 or not np.issubdtype(given.dtype, np.integer):
            raise InputError(f"trained neurons must be neuron indices or a boolean mask, got {trained!r}")
        if len(np.unique(given)) != len(given) or given.min() < 0 or given.max() >= d_mlp:
            raise InputError(f"trained neurons must be distinct indices in [0, {d_mlp}), got {given.tolist()[:10]}")
        mask = np.zeros(d_mlp, dtype=bool)
        mask[given] = True
    if not 0 < mask.sum() < d_mlp:
        raise InputError(f"trained neurons must be some but not all of the layer's {d_mlp}, got {int(mask.sum())}")
    return mask


def _expected_hits(scores: Float[np.ndarray, "row d_mlp"], trained: np.ndarray, k: int) -> np.ndarray:
    """Per row, the trained neurons among the top k, ties at the k-th place broken at random (in
    expectation: the k - #above places left go to the tied neurons in proportion)."""
    threshold = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]  # the k-th largest score
    above, at = scores > threshold, scores == threshold
    left = k - above.sum(axis=1)
    return (above & trained).sum(axis=1) + left * (at & trained).sum(axis=1) / at.sum(axis=1)


def neuron_precision(
    rankings: Mapping[str, Float[np.ndarray, "*probe d_mlp"]],
    trained: Sequence[int] | Bool[np.ndarray, " d_mlp"],
    *,
    ks: Sequence[int] | None = None,
    implant: str = "",
    n_boot: int = 1000,
    seed: int = 0,
) -> NeuronPrecision:
    """Precision@k and recall@k of each method's neuron scores of the true layer against the
    trained neurons (indices or a boolean mask over the layer's d_mlp neurons).

    `rankings[method]`: the score of every neuron of the layer (higher = more implicated), one
    vector [d_mlp] or one per probe [probe, d_mlp] (then means over probes, with bootstrap
    intervals). precision@k = trained in the top k / k (chance n_trained / d_mlp); recall@k =
    trained in the top k / n_trained (chance k / d_mlp), Chang et al.'s Recall@k% within the
    layer. `ks` default: n_trained x (1, 2, 5), their k = r, 2r, 5r at r = 0.1%. `implant`
    labels the rows (to concatenate several implants' tables)."""
    if not rankings:
        raise InputError("rankings names no method: expected {method: neuron scores [d_mlp] or [probe, d_mlp]}")
    arrays = {str(m): np.atleast_2d(np.asarray(v, dtype=np.float64)) for m, v in rankings.items()}
    widths = {m: a.shape[-1] for m, a in arrays.items()}
    if len(set(widths.values())) != 1 or any(a.ndim != 2 or not len(a) for a in arrays.values()):
        raise InputError(f"rankings must be [d_mlp] or [probe, d_mlp] arrays of one d_mlp, got shapes "
                         f"{ {m: a.shape for m, a in arrays.items()} }")
    bad = [m for m, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise InputError(f"the neuron scores of {bad} are not all finite")
    d_mlp = next(iter(widths.values()))
    mask = _trained_mask(trained, d_mlp)
    n_trained = int(mask.sum())
    ks = tuple(min(d_mlp, n_trained * f) for f in (1, 2, 5)) if ks is None else tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or not 1 <= k <= d_mlp for k in ks):
        raise InputError(f"ks must be whole numbers in [1, {d_mlp}], got {list(ks)}")
    rows = []
    for method, scores in arrays.items():
        for k in dict.fromkeys(int(k) for k in ks):
            hits = _expected_hits(scores, mask, k)
            p, p_low, p_high = bootstrap_mean_ci(hits / k, n_boot=n_boot, seed=seed)
            r, r_low, r_high = bootstrap_mean_ci(hits / n_trained, n_boot=n_boot, seed=seed)
            rows.append({"method": method, "implant": implant, "k": k, "k_share": k / d_mlp, "n_trained": n_trained,
                         "d_mlp": d_mlp, "n": len(scores), "hits": float(hits.mean()), "precision": float(p),
                         "precision_low": float(p_low), "precision_high": float(p_high), "recall": float(r),
                         "recall_low": float(r_low), "recall_high": float(r_high),
                         "chance_precision": n_trained / d_mlp, "chance_recall": k / d_mlp})
    settings = {"trained": np.flatnonzero(mask).tolist(), "ks": list(dict.fromkeys(int(k) for k in ks)),
                "implant": implant, "n_boot": n_boot, "seed": seed,
                "ties": "at the k-th place broken at random, in expectation"}
    return NeuronPrecision(frame=pd.DataFrame(rows, columns=NEURON_COLUMNS), settings=settings)


def layer_neuron_scores(
    model: Any, probes: Sequence[Any], *, layer: int, rank_by: Sequence[str] = ("effective", "magnitude", "dla")
) -> dict[str, Float[np.ndarray, "probe d_mlp"]]:
    """Per probe, the neuron scores of one layer by each ranking of the knockouts (`rank_neurons`:
    "effective", "magnitude", "dla", at the last prompt position of the clean pass) and the
    activation magnitude |activation| ("activation"), as `neuron_precision` takes them. One
    clean pass per probe and ranking."""
    from idiom_lens.analyses.interventions.knockouts.scores import rank_neurons

    if not 0 <= layer < model.n_layers:
        raise InputError(f"layer must be in [0, {model.n_layers}), got {layer}")
    out: dict[str, np.ndarray] = {}
    for by in rank_by:
        ranking = rank_neurons(model, probes, rank_by=by)  # type: ignore[arg-type]
        out[by] = ranking.scores[:, layer].double().numpy()
        out.setdefault("activation", ranking.activations[:, layer].abs().double().numpy())
    return out


def attribution_neuron_scores(attribution: Any, *, layer: int, group: str) -> Float[np.ndarray, " d_mlp"]:
    """The DLA neuron scores of one layer for a set: each neuron's mean direct contribution to the
    predicted token's logit over the set's probes (`AttributionResult.neuron_means`)."""
    if group not in attribution.neuron_means:
        raise InputError(f"the attribution result has no neuron means for {group!r}; it has "
                         f"{sorted(attribution.neuron_means)}")
    means = attribution.neuron_means[group]
    if not 0 <= layer < means.shape[0]:
        raise InputError(f"layer must be in [0, {means.shape[0]}), got {layer}")
    return means[layer, :, 0].double().numpy()
