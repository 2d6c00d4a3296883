"""Where recall lives: the per-layer effects of every causal method and of the direct logit
attribution, per comparison set, in one tidy table, and fair per-layer comparisons between sets
(from results, never recomputing a forward pass).

Every measure is first a per-probe table (`RecallProfile.per_probe`: measure, group, probe_id,
layer, num, den), and each set's value per layer is one statistic of it (`MEASURES`):
- ``share``: share of probes with num = 1 (a prediction changed), Wilson 95% interval;
- ``ratio``: sum(num) / sum(den) over probes = mean num / mean den, a ratio of means (the
  restored share of causal tracing, IE / total effect; the DLA share, MLP logit / final logit),
  percentile bootstrap over probes (numerator and denominator resampled together);
- ``mean``, ``median``: of num, percentile bootstrap over probes.
The primary measures (`PRIMARY`) are the ones a comparison between sets of unequal confidence
can rest on: the knockouts with a frozen post-MLP norm and a control matched on the removed
vector, tracing normalized by each set's total effect, the attention knockout as a change in
log-probability (median), and the DLA share. Kept beside them as secondary measures: the raw
tracing AIE, the live-norm knockouts, the whole-MLP knockout (the ceiling), every knockout's
median drop in the log-probability of the clean prediction (continuous, where a share over few
probes ties many layers) and the lens gains (how much a block raises the target's
log-probability read through the logit lens or a tuned lens), and the restored shares that
attribution patching estimates (MLP and attention outputs, clean prompt into corrupted ones).

`compare_sets` tests, per measure, a reference set against another: per layer, the difference
of the statistic with a bootstrap interval and a permutation p-value adjusted over the layers of
the measure (single-step max-|difference|, Westfall-Young: the family is the measure's layers for
one pair of sets, so choosing the peak by argmax is accounted for); and per pre-specified depth
band (thirds of the depth), Holm-adjusted over every band test of the table (the family is the
table: all measures, pairs and bands). Matched sets are compared in pairs (swap within pairs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Self

import numpy as np
import pandas as pd

from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.analyses.stats import adjust, depth_bands, percentile_interval, wilson_interval
from idiom_lens.errors import InputError
from idiom_lens.groups import MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS

Statistic = Literal["share", "ratio", "mean", "median"]


@dataclass(frozen=True)
class Measure:
    """One per-layer measure: its statistic, whether it is primary, and what it is, in words."""

    statistic: Statistic
    primary: bool
    what: str


MEASURES: dict[str, Measure] = {
    "knockout top-100": Measure("share", True, "share of predictions changed when the top-100 neurons of the "
                                "layer (ranked by `rank_by`) are zeroed at every position, post-MLP norm frozen"),
    "knockout matched": Measure("share", True, "the same for a random set of the layer's other neurons matched "
                                "on the norm of the vector it removes (frozen norm)"),
    "knockout top-100 (live norm)": Measure("share", False, "top-100 knockout under the live post-MLP norm "
                                            "(which rescales what remains: a rotation more than a removal)"),
    "knockout matched (live norm)": Measure("share", False, "matched control under the live post-MLP norm"),
    "tracing MLP share (last)": Measure("ratio", True, "causal tracing: mean IE / mean total effect of restoring "
                                        "the MLP output in the window centered on the layer, at the last token, over "
                                        "probes whose total effect reaches the floor"),
    "tracing attention share (last)": Measure("ratio", True, "the same for the attention output, last token"),
    "tracing MLP share (last noised)": Measure("ratio", True, "the same for the MLP output at the last noised "
                                               "token (ROME's last subject token)"),
    "tracing MLP (last)": Measure("mean", False, "causal tracing's raw average indirect effect (probability), "
                                  "MLP, last token: not comparable between sets of unequal total effect"),
    "tracing attention (last)": Measure("mean", False, "raw AIE, attention, last token"),
    "tracing MLP (last noised)": Measure("mean", False, "raw AIE, MLP, last noised token"),
    "attention knockout": Measure("median", True, "attention knockout: median drop in the log-probability of "
                                  "the clean prediction (-(log p_cut - log p_clean), nats) when the last token is "
                                  "cut from the earlier words in the window centered on the layer"),
    "attention knockout changed": Measure("share", False, "attention knockout: share of predictions changed"),
    "DLA MLP share": Measure("ratio", True, "direct logit attribution: mean logit the layer's MLP writes / mean "
                             "final logit (compatibility mode)"),
    "knockout top-100 log-p drop": Measure("median", False, "top-100 knockout (frozen norm): median drop in the "
                                           "log-probability of the clean prediction (log p_clean - log p_knocked, "
                                           "nats); continuous where a share over few probes ties many layers"),
    "knockout matched log-p drop": Measure("median", False, "the same for the matched control (frozen norm)"),
    "knockout top-100 log-p drop (live norm)": Measure("median", False, "the top-100 log-p drop, live norm"),
    "knockout matched log-p drop (live norm)": Measure("median", False, "the matched log-p drop, live norm"),
    "knockout whole MLP": Measure("share", False, "share of predictions changed when every neuron of the layer's "
                                  "MLP is zeroed at every position (the whole_mlp control: k = d_mlp, window 1; the "
                                  "ceiling of the top-k knockouts), post-MLP norm frozen"),
    "knockout whole MLP log-p drop": Measure("median", False, "whole-MLP knockout: median drop in the "
                                             "log-probability of the clean prediction (nats), frozen norm"),
    "knockout whole MLP (live norm)": Measure("share", False, "whole-MLP knockout under the live post-MLP norm "
                                              "(a zeroed output stays zero: as the frozen norm)"),
    "knockout whole MLP log-p drop (live norm)": Measure("median", False, "the whole-MLP log-p drop, live norm"),
    "logit lens gain": Measure("mean", False, "logit lens: mean increase of the target's log-probability through "
                               "the block, log p read after block l minus after block l - 1 (resid_post); layer 0 has "
                               "no value (the trajectory does not read the embedding), nor has a probe whose "
                               "probability underflows float32 at either read-out"),
    "logit lens MLP gain": Measure("mean", False, "logit lens: mean increase of the target's log-probability "
                                   "through the layer's MLP alone, read after the block minus after its attention "
                                   "(resid_post - resid_mid), every layer"),
    "tuned lens gain": Measure("mean", False, "the logit lens gain read through a tuned lens (resid_post; no "
                               "value at layer 0)"),
    "attribution patching MLP share (last)": Measure("ratio", False, "attribution patching (a first-order estimate "
                                                     "of activation patching, clean prompt into a corrupted one): the "
                                                     "estimated restored target logit of the layer's MLP output at "
                                                     "the last token / the clean-minus-corrupted logit gap, summed "
                                                     "over a probe's corruptions, over pairs whose gap reaches "
                                                     "min_gap"),
    "attribution patching MLP share (all positions)": Measure("ratio", False, "the same, summed over every "
                                                              "position of the layer's MLP output (first order: the "
                                                              "whole layer's output patched)"),
    "attribution patching attention share (last)": Measure("ratio", False, "the same for the attention output at "
                                                           "the last token"),
}
PRIMARY: tuple[str, ...] = tuple(name for name, m in MEASURES.items() if m.primary)


def measure_info(name: str) -> Measure:
    """The `Measure` of a measure name (a knockout of another k than 100 is described as top-100's)."""
    if name in MEASURES:
        return MEASURES[name]
    if name.startswith("knockout top-"):
        drop = " log-p drop" if " log-p drop" in name else ""
        return MEASURES["knockout top-100" + drop + (" (live norm)" if name.endswith("(live norm)") else "")]
    raise InputError(f"unknown recall measure {name!r}; known: {', '.join(MEASURES)}")
COLUMNS = ["measure", "group", "layer", "n", "value", "value_low", "value_high"]
PER_PROBE_COLUMNS = ["measure", "group", "probe_id", "layer", "num", "den"]
COMPARISON_COLUMNS = ["measure", "statistic", "reference", "versus", "paired", "scope", "layer", "band",
                      "n_reference", "n_versus", "value_reference", "value_versus", "diff", "diff_low", "diff_high",
                      "p_value", "p_adjusted", "correction", "family"]
MIN_TOTAL_EFFECT = 0.05  # the tracing floor: probes whose noise removes less than this are not normalized


@dataclass(frozen=True)
class RecallProfile(Saved):
    """Per-layer effects of each measure per set (`COLUMNS`), the per-probe values they come from
    (`PER_PROBE_COLUMNS`) and what each was computed with. Saved as recall_profile.parquet,
    recall_per_probe.parquet, recall_peaks.parquet (`peaks()`, for readers) and recall.result.json."""

    frame: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    per_probe: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PER_PROBE_COLUMNS))

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    default_name: ClassVar[str] = "recall"

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"profile": self.frame, "per_probe": self.per_probe}

    def derived_tables(self) -> dict[str, pd.DataFrame]:
        return {"peaks": self.peaks()}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        per_probe = saved.tables.get("per_probe", pd.DataFrame(columns=PER_PROBE_COLUMNS))
        return cls(frame=saved.tables["profile"], settings=saved.settings, per_probe=per_probe)

    def peaks(self) -> pd.DataFrame:
        """Per measure and set: the layer of the largest value, the value with its interval, n.
        Descriptive: a peak chosen by argmax is selection-biased; `compare_sets` tests it."""
        if self.frame.empty:
            return pd.DataFrame(columns=["measure", "group", "peak_layer", "n", "value", "value_low", "value_high"])
        idx = self.frame.dropna(subset=["value"]).groupby(["measure", "group"], sort=False)["value"].idxmax()
        out = self.frame.loc[idx].rename(columns={"layer": "peak_layer"})
        return out[["measure", "group", "peak_layer", "n", "value", "value_low", "value_high"]].reset_index(drop=True)


# --------------------------------------------------------------------------------------
# Per-probe values of each result
# --------------------------------------------------------------------------------------


def _rows(measure: str, group: Any, probe_id: Any, layer: Any, num: Any, den: Any = 1.0) -> pd.DataFrame:
    return pd.DataFrame({"measure": measure, "group": group, "probe_id": probe_id, "layer": layer,
                         "num": np.asarray(num, dtype=np.float64), "den": den})


def _knockout_rows(knockouts: Any, k: int) -> tuple[list[pd.DataFrame], dict[str, Any]]:
    frame = knockouts.to_dataframe()
    keep = (frame["window"] == 1) & (frame["mode"] == "zero_top") & ((frame["k"] == k)
                                                                    | (frame["control"] == "whole_mlp"))
    if "positions" in frame:
        keep &= frame["positions"] == "all"
    if "ablation" in frame:
        keep &= frame["ablation"] == "zero"
    frame = frame[keep]
    drop = _logp_drop(frame, knockouts.probes)
    norms = sorted(set(frame["norm"])) if "norm" in frame else ["live"]
    parts = []
    for norm in norms:
        sub = frame[frame["norm"] == norm] if "norm" in frame else frame
        suffix = "" if norm == "frozen" else " (live norm)"
        for control, name in (("targeted", f"knockout top-{k}"), ("matched", "knockout matched"),
                              ("whole_mlp", "knockout whole MLP")):
            rows = sub[sub["control"] == control]
            parts.append(_rows(f"{name}{suffix}", rows["group"], rows["probe_id"], rows["start"], rows["changed"]))
            if drop is not None:
                parts.append(_rows(f"{name} log-p drop{suffix}", rows["group"], rows["probe_id"], rows["start"],
                                   drop[rows.index]))
    ranks = sorted(set(frame["rank_by"])) if "rank_by" in frame else []
    return parts, {"k": k, "window": 1, "positions": "all", "ablation": "zero", "norms": norms, "rank_by": ranks,
                   "matched_on": knockouts.settings.get("matched_on", "see the knockout settings"),
                   "log_p_drop": "log p_clean - log p_knocked of the clean prediction" if drop is not None
                   else "not measured (rows without prob_of_clean_pred)"}


def _logp_drop(frame: pd.DataFrame, probes: pd.DataFrame) -> pd.Series | None:
    """Per knockout row, log p_clean - log p_knocked of the clean prediction (nats; knocked
    probabilities floored at 1e-30), or None for rows saved without the probabilities."""
    if "prob_of_clean_pred" not in frame or "clean_pred_prob" not in probes:
        return None
    clean = frame["probe_id"].map(probes.drop_duplicates("probe_id").set_index("probe_id")["clean_pred_prob"])
    knocked = frame["prob_of_clean_pred"].astype(np.float64).clip(lower=1e-30)
    return np.log(clean.astype(np.float64)) - np.log(knocked)


def _tracing_rows(tracing: Any, window: int | None, floor: float) -> tuple[list[pd.DataFrame], dict[str, Any]]:
    per_probe = tracing.per_probe(min_total_effect=floor)
    windows = sorted(set(per_probe.loc[per_probe["site"] != "resid", "window"]))
    if not windows:
        raise InputError("the tracing result restored no MLP or attention output")
    window = window if window is not None else windows[-1]
    if window not in windows:
        raise InputError(f"tracing_window {window} is not in the tracing result's windows {windows}")
    parts = []
    for site, position in (("mlp", "last noised"), ("mlp", "last"), ("attn", "last")):
        name = f"tracing {'MLP' if site == 'mlp' else 'attention'}"
        sub = per_probe[(per_probe["site"] == site) & (per_probe["window"] == window)
                        & (per_probe["position"] == position)]
        parts.append(_rows(f"{name} ({position})", sub["group"], sub["probe_id"], sub["layer"], sub["ie"]))
        kept = sub[sub["kept"]]
        parts.append(_rows(f"{name} share ({position})", kept["group"], kept["probe_id"], kept["layer"], kept["ie"],
                           kept["total_effect"]))
    return parts, {"window": int(window), "min_total_effect": floor, "noised": tracing.settings.get("noised"),
                   "noise_sigma": tracing.settings.get("noise_sigma"), "samples": tracing.settings.get("samples")}


def _attention_rows(attention: Any, source: str) -> tuple[list[pd.DataFrame], dict[str, Any]]:
    frame = attention.to_dataframe()
    frame = frame[(frame["source"] == source) & (frame["reason"] == "")]
    if "logp_change" in frame:
        drop = -frame["logp_change"]
    else:  # results saved before the log-probability column: from the probabilities
        drop = np.log(frame["clean_prob"]) - np.log(frame["prob"].clip(lower=1e-30))
    parts = [_rows("attention knockout", frame["group"], frame["probe_id"], frame["layer"], drop),
             _rows("attention knockout changed", frame["group"], frame["probe_id"], frame["layer"], frame["changed"])]
    return parts, {"source": source, "window": attention.settings.get("window"),
                   "metric": "median of -(log p_cut - log p_clean) over probes"}


# The smallest probability a trajectory (float32 probabilities) resolves: below it (subnormal or 0,
# as the logit lens often reads the target at Gemma's first layers) its log is unknown, and the gains
# that would use it have no value (no row), rather than a value made by a floor.
LOG_P_RESOLVED = float(np.finfo(np.float32).tiny)


def _lens_rows(trajectory: Any, kind: str, sets: Mapping[str, Sequence[str]] | None
               ) -> tuple[list[pd.DataFrame], dict[str, Any]]:
    """Per probe and layer, how much the block (and, for the logit lens with `resid_mid`, its MLP
    alone) raises the lens's log-probability of the target: "<kind> lens gain" (layer 0 has no
    value: the trajectory does not read the embedding) and "logit lens MLP gain"."""
    if trajectory.lens_kind != kind:
        raise InputError(f"the {kind} lens gain needs a trajectory read through the {kind} lens, got the "
                         f"{trajectory.lens_kind} lens")
    prob = np.asarray(trajectory.target_prob, dtype=np.float64)
    logp = np.where(prob >= LOG_P_RESOLVED, np.log(np.maximum(prob, LOG_P_RESOLVED)), np.nan)
    post = logp[:, trajectory.site("resid_post")]  # [probe, layer]
    n_layers = post.shape[1]
    gains = {f"{kind} lens gain": (post[:, 1:] - post[:, :-1], np.arange(1, n_layers))}
    if kind == "logit" and "resid_mid" in trajectory.sites:
        gains["logit lens MLP gain"] = (post - logp[:, trajectory.site("resid_mid")], np.arange(n_layers))
    memo = trajectory.memorization.to_dataframe()
    ids, groups = memo["probe_id"].tolist(), memo["group"].tolist()
    if sets is None:
        members = list(enumerate(groups))
    else:
        index = {pid: i for i, pid in enumerate(ids)}
        missing = sorted({pid for names in sets.values() for pid in names} - set(index))
        if missing:
            raise InputError(f"sets name probes the trajectory result does not have: {missing[:5]}")
        members = [(index[pid], name) for name, names in sets.items() for pid in names]
    rows = [i for i, _ in members]
    parts = []
    for measure, (gain, layers) in gains.items():
        part = _rows(measure, np.repeat([g for _, g in members], len(layers)),
                     np.repeat([ids[i] for i in rows], len(layers)), np.tile(layers, len(rows)), gain[rows].reshape(-1))
        parts.append(part[part["num"].notna()])
    return parts, {"lens": trajectory.lens, "measures": list(gains), "site": "resid_post",
                   "metric": "log p(target) after the block minus before it (the previous block's resid_post); "
                             f"no value where a probability is below {LOG_P_RESOLVED:.3g} (float32 underflow)",
                   "layer_0": "no value (no embedding read)"}


def _patching_rows(patching: Any, sets: Mapping[str, Sequence[str]] | None) -> tuple[list[pd.DataFrame],
                                                                                       dict[str, Any]]:
    """Per probe and layer: the estimated restored logit (patched - corrupted) and the gap (clean -
    corrupted), each summed over the probe's pairs whose gap is at least min_gap (a corruption that
    raises the target's logit has nothing to restore)."""
    min_gap = float(patching.settings.get("min_gap", 0.0))
    pairs = patching.pairs[patching.pairs["valid"] & (patching.pairs["gap"] >= min_gap)]
    pairs = pairs[["probe_id", "variant", "group", "corrupted_logit", "gap"]]
    if sets is not None:  # one copy of a pair per set naming its probe
        pairs = pd.concat([pairs[pairs["probe_id"].isin(list(ids))].assign(group=name) for name, ids in sets.items()],
                          ignore_index=True)
    rows = patching.rows.merge(pairs, on=["probe_id", "variant"])
    rows = rows.assign(restored_logit=rows["patched_logit"] - rows["corrupted_logit"])
    gaps = pairs.groupby(["group", "probe_id"], sort=False)["gap"].sum()
    parts = []
    for site, position, name in (("mlp_out", "last", "MLP share (last)"),
                                 ("mlp_out", "all", "MLP share (all positions)"),
                                 ("attn_out", "last", "attention share (last)")):
        sub = rows[rows["site"] == site]
        if position == "last":
            sub = sub[sub["pos_from_end"] == -1]
        summed = sub.groupby(["group", "probe_id", "layer"], sort=False)["restored_logit"].sum().reset_index()
        den = gaps.loc[list(zip(summed["group"], summed["probe_id"]))].to_numpy()
        parts.append(_rows(f"attribution patching {name}", summed["group"], summed["probe_id"], summed["layer"],
                           summed["restored_logit"], den))
    return parts, {"method": patching.settings.get("method"), "variants": patching.settings.get("variants"),
                   "min_gap": min_gap, "n_pairs": int(len(pairs)),
                   "metric": "sum over a probe's pairs of (patched - corrupted target logit) / sum of (clean - "
                             "corrupted), at the last token or summed over positions"}


def _attribution_rows(attribution: Any) -> tuple[list[pd.DataFrame], dict[str, Any]]:
    parts = []
    for p in attribution.probes:
        mlp = p.mlp[:, 0].numpy().astype(np.float64)
        total = float(p.logit) - float(p.unembed_bias[0])  # what the components build (as attribution_stats)
        parts.append(_rows("DLA MLP share", p.group, p.probe_id, np.arange(len(mlp)), mlp, total))
    return parts, {"metric": "mean MLP-layer logit / mean final logit (compatibility mode)"}


def _attribution_in_sets(attribution: Any, sets: Mapping[str, Sequence[str]]) -> Any:
    by_id = {p.probe_id: p for p in attribution.probes}
    missing = sorted({pid for ids in sets.values() for pid in ids} - set(by_id))
    if missing:
        raise InputError(f"sets name probes the attribution result does not have: {missing[:5]}")
    probes = tuple(dataclasses.replace(by_id[pid], group=name) for name, ids in sets.items() for pid in ids)
    return dataclasses.replace(attribution, probes=probes)


# --------------------------------------------------------------------------------------
# Statistics of a probe x layer table
# --------------------------------------------------------------------------------------


def _matrices(part: pd.DataFrame) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """probe ids, layers, num [probe, layer] and den [probe, layer] of one measure and set."""
    num = part.pivot(index="probe_id", columns="layer", values="num")
    den = part.pivot(index="probe_id", columns="layer", values="den").reindex_like(num)
    return list(num.index), [int(c) for c in num.columns], num.to_numpy(np.float64), den.to_numpy(np.float64)


def _statistic(statistic: Statistic) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The set's value per layer from num/den [..., probe, layer] (NaN cells ignored)."""
    if statistic == "ratio":
        return lambda num, den: np.nansum(num, axis=-2) / np.nansum(np.where(np.isnan(num), np.nan, den), axis=-2)
    if statistic == "median":
        return lambda num, den: np.nanmedian(num, axis=-2)
    return lambda num, den: np.nanmean(num, axis=-2)


def _value_rows(measure: str, group: str, part: pd.DataFrame, *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    stat = measure_info(measure).statistic
    _, layers, num, den = _matrices(part)
    value = _statistic(stat)(num, den)
    n = (~np.isnan(num)).sum(axis=0)
    if stat == "share":
        low, high = wilson_interval(np.nansum(num, axis=0).round().astype(int), n)
    elif len(num) >= 2:
        idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
        low, high = percentile_interval(_statistic(stat)(num[idx], den[idx]), 0.95)
    else:
        low, high = value.copy(), value.copy()
    return [{"measure": measure, "group": group, "layer": layer, "n": int(n[j]), "value": float(value[j]),
             "value_low": float(low[j]), "value_high": float(high[j])} for j, layer in enumerate(layers)]


def profile_from_per_probe(per_probe: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The per-layer table (`COLUMNS`) of a per-probe table: each measure's statistic per set."""
    rows: list[dict[str, Any]] = []
    for (measure, group), part in per_probe.groupby(["measure", "group"], sort=False):
        rows += _value_rows(str(measure), str(group), part, n_boot=n_boot, seed=seed)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({"layer": int, "n": int}) if len(frame) else frame


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


def recall_profile(
    *,
    knockouts: Any | None = None,
    tracing: Any | None = None,
    attention: Any | None = None,
    attribution: Any | None = None,
    trajectory: Any | None = None,
    tuned_trajectory: Any | None = None,
    patching: Any | None = None,
    groups: Sequence[str] = (MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS),
    sets: Mapping[str, Sequence[str]] | None = None,
    k: int = 100,
    tracing_window: int | None = None,
    min_total_effect: float = MIN_TOTAL_EFFECT,
    attention_source: str = "context",
    n_boot: int = 1000,
    seed: int = 0,
) -> RecallProfile:
    """The per-layer table from whichever results are given (a `KnockoutResult`, a
    `TracingResult`, an `AttentionKnockoutResult`, an `AttributionResult`, a `TrajectoryResult`
    read through the logit lens as `trajectory` and one read through a tuned lens as
    `tuned_trajectory`: the lens gains; a `PatchingResult`, usually of attribution patching, as
    `patching`).

    Sets: the results' own groups among `groups`, or, with `sets` ({name: probe ids}, e.g. a
    confidence-matched sample, `study.sets`), those sets (which may share probes). `tracing_window`
    picks the MLP/attention window (default: the largest the result has); `min_total_effect` is
    the tracing floor of the restored share."""
    if not min_total_effect >= 0:
        raise InputError(f"min_total_effect must be >= 0, got {min_total_effect}")
    parts: list[pd.DataFrame] = []
    settings: dict[str, Any] = {"groups": list(sets) if sets is not None else list(groups),
                                "measures": {name: dataclasses.asdict(m) for name, m in MEASURES.items()}}
    if knockouts is not None:
        more, settings["knockouts"] = _knockout_rows(knockouts.in_sets(sets) if sets else knockouts, k)
        parts += more
    if tracing is not None:
        more, settings["tracing"] = _tracing_rows(tracing.in_sets(sets) if sets else tracing, tracing_window,
                                                  min_total_effect)
        parts += more
    if attention is not None:
        more, settings["attention_knockout"] = _attention_rows(attention.in_sets(sets) if sets else attention,
                                                               attention_source)
        parts += more
    if attribution is not None:
        more, settings["attribution"] = _attribution_rows(_attribution_in_sets(attribution, sets) if sets
                                                          else attribution)
        parts += more
    if patching is not None:
        more, settings["attribution_patching"] = _patching_rows(patching, sets)
        parts += more
    for name, result, kind in (("logit_lens", trajectory, "logit"), ("tuned_lens", tuned_trajectory, "tuned")):
        if result is not None:
            more, settings[name] = _lens_rows(result, kind, sets)
            parts += more
    if not parts:
        raise InputError("recall_profile needs at least one result (knockouts, tracing, attention, attribution, "
                         "trajectory, tuned_trajectory, patching)")
    per_probe = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else \
        pd.DataFrame(columns=PER_PROBE_COLUMNS)
    if sets is None:
        per_probe = per_probe[per_probe["group"].isin(groups)]
    per_probe = per_probe.astype({"layer": int}).reset_index(drop=True)[PER_PROBE_COLUMNS]
    frame = profile_from_per_probe(per_probe, n_boot=n_boot, seed=seed)
    settings |= {"n_boot": n_boot, "seed": seed}
    return RecallProfile(frame.reset_index(drop=True), settings, per_probe)


# --------------------------------------------------------------------------------------
# Comparisons between sets
# --------------------------------------------------------------------------------------


def _aligned(a: pd.DataFrame, b: pd.DataFrame, pairs: Mapping[str, str] | None):
    """num/den matrices of the two sets over their common layers; with `pairs` (reference probe ->
    versus probe), the rows of both in pair order, pairs with a missing member dropped."""
    ids_a, layers_a, num_a, den_a = _matrices(a)
    ids_b, layers_b, num_b, den_b = _matrices(b)
    layers = sorted(set(layers_a) & set(layers_b))
    ja, jb = [layers_a.index(x) for x in layers], [layers_b.index(x) for x in layers]
    num_a, den_a, num_b, den_b = num_a[:, ja], den_a[:, ja], num_b[:, jb], den_b[:, jb]
    if pairs is not None:
        pos_a, pos_b = {p: i for i, p in enumerate(ids_a)}, {p: i for i, p in enumerate(ids_b)}
        kept = [(pos_a[x], pos_b[y]) for x, y in pairs.items() if x in pos_a and y in pos_b]
        ia, ib = [i for i, _ in kept], [j for _, j in kept]
        num_a, den_a, num_b, den_b = num_a[ia], den_a[ia], num_b[ib], den_b[ib]
    return layers, (num_a, den_a), (num_b, den_b)


def _diff_null(stat, a, b, *, paired: bool, n: int, rng: np.random.Generator) -> np.ndarray:
    """[n, layer] differences stat(a) - stat(b) under the null: labels permuted (or swapped within pairs)."""
    (num_a, den_a), (num_b, den_b) = a, b
    if paired:
        swap = rng.random((n, len(num_a), 1)) < 0.5
        pa_num, pb_num = np.where(swap, num_b, num_a), np.where(swap, num_a, num_b)
        pa_den, pb_den = np.where(swap, den_b, den_a), np.where(swap, den_a, den_b)
        return stat(pa_num, pa_den) - stat(pb_num, pb_den)
    num, den = np.concatenate([num_a, num_b]), np.concatenate([den_a, den_b])
    order = np.argsort(rng.random((n, len(num))), axis=1)
    pa, pb = order[:, : len(num_a)], order[:, len(num_a):]
    return stat(num[pa], den[pa]) - stat(num[pb], den[pb])


def _diff_boot(stat, a, b, *, paired: bool, n: int, rng: np.random.Generator) -> np.ndarray:
    (num_a, den_a), (num_b, den_b) = a, b
    ia = rng.integers(0, len(num_a), size=(n, len(num_a)))
    ib = ia if paired else rng.integers(0, len(num_b), size=(n, len(num_b)))
    return stat(num_a[ia], den_a[ia]) - stat(num_b[ib], den_b[ib])


def _band(x: tuple[np.ndarray, np.ndarray], layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A band's per-probe values: num and den averaged over its layers (one column)."""
    num, den = x
    return np.nanmean(num[:, layers], axis=1, keepdims=True), np.nanmean(den[:, layers], axis=1, keepdims=True)


def compare_sets(
    profile: RecallProfile,
    *,
    reference: str = MEMORIZED_IDIOMS,
    versus: Sequence[str] | None = None,
    pairs: Mapping[str, Mapping[str, str]] | None = None,
    measures: Sequence[str] | None = None,
    n_layers: int | None = None,
    n_permutations: int = 2000,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """`reference` against each set of `versus` (default: every other set), per measure
    (default: the primary ones present), per layer and per depth band (`COMPARISON_COLUMNS`).

    diff = value(reference) - value(versus), with a percentile-bootstrap interval; `p_value` from
    `n_permutations` label permutations (two-sided); per layer `p_adjusted` is the max-|diff|
    (Westfall-Young single-step) adjustment over the measure's layers, per band the Holm
    adjustment over every band row of the table. `pairs[versus]` ({reference probe: versus
    probe}) makes that comparison paired (swaps within pairs). `n_layers` sets the bands (thirds
    of the depth; default: the profile's largest layer + 1)."""
    per_probe = profile.per_probe
    if per_probe.empty:
        raise InputError("the profile has no per-probe values (a profile saved before they were kept?)")
    present = list(dict.fromkeys(per_probe["group"]))
    if reference not in present:
        raise InputError(f"reference set {reference!r} is not in the profile; sets: {present}")
    versus = [g for g in present if g != reference] if versus is None else list(versus)
    unknown = [g for g in versus if g not in present]
    if unknown:
        raise InputError(f"sets {unknown} are not in the profile; sets: {present}")
    have = list(dict.fromkeys(per_probe["measure"]))
    measures = [m for m in have if measure_info(m).primary] if measures is None else list(measures)
    n_layers = n_layers if n_layers is not None else int(per_probe["layer"].max()) + 1
    bands = depth_bands(n_layers) if n_layers >= 3 else {}  # thirds of the depth
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for measure in measures:
        stat_name = measure_info(measure).statistic
        stat = _statistic(stat_name)
        of = per_probe[per_probe["measure"] == measure]
        for other in versus:
            a_part, b_part = of[of["group"] == reference], of[of["group"] == other]
            if a_part.empty or b_part.empty:
                continue
            pair_map = (pairs or {}).get(other)
            layers, a, b = _aligned(a_part, b_part, pair_map)
            paired = pair_map is not None
            if len(a[0]) < 2 or len(b[0]) < 2:
                continue
            common = {"measure": measure, "statistic": stat_name, "reference": reference, "versus": other,
                      "paired": paired, "n_reference": len(a[0]), "n_versus": len(b[0])}
            value_a, value_b = stat(*a), stat(*b)
            observed = value_a - value_b
            null = _diff_null(stat, a, b, paired=paired, n=n_permutations, rng=rng)
            boot = _diff_boot(stat, a, b, paired=paired, n=n_boot, rng=rng)
            low, high = percentile_interval(boot, 0.95)
            p = (1 + (np.abs(null) >= np.abs(observed) - 1e-12).sum(0)) / (1 + n_permutations)
            max_null = np.nanmax(np.abs(null), axis=1)
            p_max = (1 + (max_null[:, None] >= np.abs(observed) - 1e-12).sum(0)) / (1 + n_permutations)
            for j, layer in enumerate(layers):
                rows.append(common | {"scope": "layer", "layer": layer, "band": None,
                                      "value_reference": float(value_a[j]), "value_versus": float(value_b[j]),
                                      "diff": float(observed[j]), "diff_low": float(low[j]),
                                      "diff_high": float(high[j]),
                                      "p_value": float(p[j]), "p_adjusted": float(p_max[j]),
                                      "correction": "max-|diff| permutation (Westfall-Young)",
                                      "family": f"the {len(layers)} layers of this measure and pair"})
            for band, span in bands.items():
                cols = [layers.index(x) for x in span if x in layers]
                if not cols:
                    continue
                ba, bb = _band(a, cols), _band(b, cols)
                obs = float((stat(*ba) - stat(*bb))[0])
                bnull = _diff_null(stat, ba, bb, paired=paired, n=n_permutations, rng=rng)[:, 0]
                bboot = _diff_boot(stat, ba, bb, paired=paired, n=n_boot, rng=rng)[:, 0]
                blow, bhigh = percentile_interval(bboot, 0.95)
                rows.append(common | {"scope": "band", "layer": None, "band": f"{band} ({span[0]}-{span[-1]})",
                                      "value_reference": float(stat(*ba)[0]), "value_versus": float(stat(*bb)[0]),
                                      "diff": obs, "diff_low": float(blow), "diff_high": float(bhigh),
                                      "p_value": float((1 + (np.abs(bnull) >= abs(obs) - 1e-12).sum())
                                                       / (1 + n_permutations)),
                                      "p_adjusted": np.nan, "correction": "holm", "family": ""})
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    is_band = table["scope"] == "band"
    if is_band.any():
        table.loc[is_band, "p_adjusted"] = adjust(table.loc[is_band, "p_value"].to_numpy(), "holm")
        table.loc[is_band, "family"] = f"every band test of this table ({int(is_band.sum())})"
    return table.astype({"layer": "Int64"})
