"""Where recall lives: the per-layer effects of every causal method and of the direct logit
attribution, for memorized vs non-memorized idioms, in one tidy table (from results, never
recomputing a forward pass).

Measures (`MEASURES`), each per set and layer with n and a 95% interval:
- ``knockout top-100``, ``knockout matched``: share of predictions changed by zeroing the top-100
  MLP neurons of one layer at every position (the authors' variant), and by the magnitude-matched
  random control (`KnockoutResult.layer_table`; Wilson intervals);
- ``tracing MLP (last noised)``: causal tracing's average indirect effect of restoring the MLP
  output in the window centered on the layer, at the last noised token (ROME's "last subject
  token"); ``tracing MLP (last)``: the same at the last token;
- ``tracing attention (last)``: the same for the attention output, at the last token;
- ``attention knockout``: the drop of the clean prediction's probability, relative, when the last
  position's attention to the idiom's earlier words is cut in the window centered on the layer
  (-rel_change: higher means the edge matters more);
- ``DLA MLP share``: the share of the final logit the layer's MLP writes directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import pandas as pd

from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.errors import InputError
from idiom_lens.groups import MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS

MEASURES: tuple[str, ...] = ("knockout top-100", "knockout matched", "tracing MLP (last noised)", "tracing MLP (last)",
                             "tracing attention (last)", "attention knockout", "DLA MLP share")
COLUMNS = ["measure", "group", "layer", "n", "value", "value_low", "value_high"]


@dataclass(frozen=True)
class RecallProfile(Saved):
    """Per-layer effects of each measure per set (`COLUMNS`), and what each was computed with.
    Saved as recall_profile.parquet, recall_peaks.parquet (`peaks()`, for readers) and
    recall.result.json."""

    frame: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.frame.copy()

    default_name: ClassVar[str] = "recall"

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"profile": self.frame}

    def derived_tables(self) -> dict[str, pd.DataFrame]:
        return {"peaks": self.peaks()}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        return cls(frame=saved.tables["profile"], settings=saved.settings)

    def peaks(self) -> pd.DataFrame:
        """Per measure and set: the layer of the largest value, the value with its interval, n."""
        if self.frame.empty:
            return pd.DataFrame(columns=["measure", "group", "peak_layer", "n", "value", "value_low", "value_high"])
        idx = self.frame.groupby(["measure", "group"], sort=False)["value"].idxmax()
        out = self.frame.loc[idx].rename(columns={"layer": "peak_layer"})
        return out[["measure", "group", "peak_layer", "n", "value", "value_low", "value_high"]].reset_index(drop=True)


def recall_profile(
    *,
    knockouts: Any | None = None,
    tracing: Any | None = None,
    attention: Any | None = None,
    attribution: Any | None = None,
    groups: Sequence[str] = (MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS),
    k: int = 100,
    tracing_window: int | None = None,
    attention_source: str = "context",
) -> RecallProfile:
    """The per-layer table from whichever results are given (a `KnockoutResult`, a
    `TracingResult`, an `AttentionKnockoutResult`, an `AttributionResult`), for `groups`.

    `tracing_window` picks the MLP/attention window (default: the largest the result has)."""
    parts, settings = [], {"groups": list(groups)}
    if knockouts is not None:
        table = knockouts.layer_table(k=k, window=1)
        table = table[table["positions"] == "all"] if "positions" in table else table
        for control, measure in (("targeted", f"knockout top-{k}"), ("matched", "knockout matched")):
            sub = table[table["control"] == control]
            parts.append(pd.DataFrame({"measure": measure, "group": sub["group"], "layer": sub["layer"], "n": sub["n"],
                                       "value": sub["changed"], "value_low": sub["changed_low"],
                                       "value_high": sub["changed_high"]}))
        settings["knockouts"] = {"k": k, "window": 1, "positions": "all", "metric": "share of predictions changed"}
    if tracing is not None:
        summary = tracing.summary()
        windows = sorted(set(summary.loc[summary["site"] != "resid", "window"]))
        if not windows:
            raise InputError("the tracing result restored no MLP or attention output")
        window = tracing_window if tracing_window is not None else windows[-1]
        if window not in windows:
            raise InputError(f"tracing_window {window} is not in the tracing result's windows {windows}")
        for site, position in (("mlp", "last noised"), ("mlp", "last"), ("attn", "last")):
            measure = f"tracing {'MLP' if site == 'mlp' else 'attention'} ({position})"
            sub = summary[(summary["site"] == site) & (summary["window"] == window) & (summary["position"] == position)]
            parts.append(pd.DataFrame({"measure": measure, "group": sub["group"], "layer": sub["layer"], "n": sub["n"],
                                       "value": sub["aie"], "value_low": sub["aie_low"],
                                       "value_high": sub["aie_high"]}))
        settings["tracing"] = {"window": int(window), "mlp_positions": ["last noised", "last"], "attn_position": "last",
                               "noise_sigma": tracing.settings.get("noise_sigma"),
                               "samples": tracing.settings.get("samples")}
    if attention is not None:
        summary = attention.summary()
        sub = summary[summary["source"] == attention_source]
        parts.append(pd.DataFrame({"measure": "attention knockout", "group": sub["group"], "layer": sub["layer"],
                                   "n": sub["n"], "value": -sub["rel_change"], "value_low": -sub["rel_change_high"],
                                   "value_high": -sub["rel_change_low"]}))
        settings["attention_knockout"] = {"source": attention_source, "window": attention.settings.get("window"),
                                          "metric": "-(p_blocked - p_clean) / p_clean"}
    if attribution is not None:
        from idiom_lens.analyses.attribution_stats import layer_shares

        shares = layer_shares(attribution)
        sub = shares[shares["component"] == "mlp"]
        parts.append(pd.DataFrame({"measure": "DLA MLP share", "group": sub["group"], "layer": sub["layer"],
                                   "n": sub["n"], "value": sub["share"], "value_low": sub["share_low"],
                                   "value_high": sub["share_high"]}))
        settings["attribution"] = {"metric": "mean MLP-layer logit / mean final logit (compatibility mode)"}
    if not parts:
        raise InputError("recall_profile needs at least one result (knockouts, tracing, attention, attribution)")
    frame = pd.concat(parts, ignore_index=True)
    frame = frame[frame["group"].isin(groups)].astype({"layer": int, "n": int})
    return RecallProfile(frame[COLUMNS].reset_index(drop=True), settings)
