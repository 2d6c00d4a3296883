"""The knockout result: per probe x configuration outcome, its summaries and layer table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from idiom_lens.analyses.saved import ProbeRowsResult
from idiom_lens.analyses.stats import wilson_interval
from idiom_lens.errors import InputError


def wilson_columns(successes: np.ndarray, n: np.ndarray, *, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper Wilson bounds of a share (`stats.wilson_interval`), as two arrays."""
    low, high = wilson_interval(np.asarray(successes), np.asarray(n), level=level)
    return np.asarray(low), np.asarray(high)


SUMMARY_KEYS = ["group", "positions", "rank_by", "norm", "ablation", "mode", "control", "k", "start", "end", "window"]
# per-row diagnostics averaged by `summary` and `layer_table` (NaN where a saved result predates them)
DIAGNOSTICS = ("n_zeroed", "zeroed_share", "score_ratio", "removed_norm", "out_cosine", "out_norm_ratio",
               "matched_norm_ratio")


@dataclass(frozen=True)
class KnockoutResult(ProbeRowsResult):
    """Per probe x configuration outcome of the knockout grid, with per-probe clean facts.

    `rows`: one row per (probe, configuration); `probes`: one row per probe (id, kind, group,
    clean prediction, target). `to_dataframe`, `save` and `load` come from `ProbeRowsResult`:
    `knockouts.parquet`, `knockouts_probes.parquet`, `knockouts_summary.parquet` and the descriptor.
    """

    default_name = "knockouts"

    def to_dataframe(self) -> pd.DataFrame:
        """The rows with their probe's kind and group; results saved before the ablation option and
        the output diagnostics get ``ablation`` = "zero" (what they did) and NaN diagnostics."""
        frame = super().to_dataframe()
        if "ablation" not in frame:
            frame["ablation"] = "zero"
        for name in DIAGNOSTICS:
            if name not in frame:
                frame[name] = float("nan")
        return frame

    def summary(self, *, level: float = 0.95) -> pd.DataFrame:
        """Per set and configuration (variant: positions, rank_by, norm, ablation): n, share changed
        with its Wilson interval (`level`), mean probability drop, share on target, and the means of
        the per-row diagnostics (`DIAGNOSTICS`: neurons zeroed, zeroed share of the score, score
        ratio, removed norm, output cosine and norm ratio, removed-norm ratio to the targeted set)."""
        frame = self.to_dataframe()
        out = (
            frame.groupby(SUMMARY_KEYS, sort=True)
            .agg(n=("probe_id", "size"), n_changed=("changed", "sum"), changed=("changed", "mean"),
                 prob_drop=("prob_drop", "mean"), new_is_target=("new_is_target", "mean"),
                 **{name: (name, "mean") for name in DIAGNOSTICS})
            .reset_index()
        )
        out["changed_low"], out["changed_high"] = wilson_columns(out["n_changed"].to_numpy(), out["n"].to_numpy(),
                                                                 level=level)
        return out

    def layer_table(self, *, k: int = 100, window: int = 1, mode: str = "zero_top") -> pd.DataFrame:
        """Share changed per set x control x layer for one k and window length (the whole-MLP
        ceiling of the same window included), with n and 95% intervals: the specificity table. One
        block per variant (positions, rank_by, norm, ablation columns); the diagnostics are means
        over the set's probes: n_zeroed, removed_norm, out_cosine, out_norm_ratio,
        matched_norm_ratio (and zeroed_share, score_ratio)."""
        s = self.summary()
        s = s[(s["window"] == window) & (((s["mode"] == mode) & (s["k"] == k)) | (s["control"] == "whole_mlp"))]
        if s.empty:
            raise InputError(f"no knockout results for k={k}, window={window}, mode={mode!r}")
        cols = ["group", "positions", "rank_by", "norm", "ablation", "control", "start", "n", "changed",
                "changed_low", "changed_high", "prob_drop", "n_zeroed", "removed_norm", "out_cosine", "out_norm_ratio",
                "matched_norm_ratio", "zeroed_share", "score_ratio"]
        return s[cols].rename(columns={"start": "layer"}).reset_index(drop=True)

    @staticmethod
    def stack_runs(results: Sequence[KnockoutResult]) -> KnockoutResult:
        """Several runs on the same probes under other settings (e.g. positions all and last) as one
        result, their settings under "runs" (parts of one run: `join_parts`)."""
        if not results:
            raise InputError("nothing to concatenate")
        probes = pd.concat([r.probes for r in results], ignore_index=True).drop_duplicates("probe_id")
        return KnockoutResult(rows=pd.concat([r.rows for r in results], ignore_index=True), probes=probes,
                              settings={"runs": [r.settings for r in results]})
