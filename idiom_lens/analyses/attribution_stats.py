"""Per-set statistics of direct logit attribution (no plotting here).

Sets are the comparison groups of `idiom_lens.analyses.memorization.probe_group` (memorized idioms,
non-memorized idioms, ordinary text, memorized / non-memorized facts). Intervals are seeded
percentile-bootstrap 95% intervals over probes (resampling probes with replacement), so they hold
for means and for ratios of means alike without a normality assumption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from idiom_lens.analyses.attribution import MEASURES, AttributionResult, Measure
from idiom_lens.analyses.stats import bootstrap, bootstrap_mean_ci
from idiom_lens.errors import InputError
from idiom_lens.groups import ordered

INTERVAL = "95% percentile bootstrap over probes (seeded)"


def groups_of(result: AttributionResult) -> list[str]:
    """The groups present in `result`, in the paper's order (then any others, sorted)."""
    return ordered(p.group for p in result.probes)


def _col(measure: Measure) -> int:
    if measure not in MEASURES:
        raise InputError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    return MEASURES.index(measure)


def _arrays(result: AttributionResult, group: str, measure: Measure) -> dict[str, np.ndarray]:
    """Per-probe arrays of one group: embed [n], attn [n, L], mlp [n, L], total [n]."""
    c = _col(measure)
    probes = [p for p in result.probes if p.group == group]
    embed = np.array([float(p.embed[c]) for p in probes])
    attn = np.stack([p.attn[:, c].numpy() for p in probes]).astype(np.float64)
    mlp = np.stack([p.mlp[:, c].numpy() for p in probes]).astype(np.float64)
    # What the components build: the logit without the unembedding bias (a per-token constant).
    total = np.array([(p.logit if c == 0 else p.logit_diff) - float(p.unembed_bias[c]) for p in probes])
    return {"embed": embed, "attn": attn, "mlp": mlp, "total": total}


Row = dict[str, object]


def _per_group(
    result: AttributionResult,
    measure: Measure,
    columns: Sequence[str],
    rows_of: Callable[[dict[str, np.ndarray]], list[Row]],
) -> pd.DataFrame:
    """The table of `rows_of(arrays)` over the groups of `result`, each row with its group, n
    (probes of the group) and measure: the one group loop of every table here."""
    rows = []
    for group in groups_of(result):
        arr = _arrays(result, group, measure)
        rows += [{"group": group, "n": len(arr["total"]), "measure": measure, **row} for row in rows_of(arr)]
    return pd.DataFrame(rows, columns=list(columns))


def _ratio_of_means(parts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """mean(parts) / mean(total) per resample: parts [n_boot, n, ...], total [n_boot, n]."""
    num, den = parts.mean(1), total.mean(1)
    return num / den.reshape(den.shape + (1,) * (num.ndim - 1))


def _share(
    parts: np.ndarray, total: np.ndarray, *, n_boot: int, level: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ratio of means mean(parts) / mean(total) (per column of `parts`) and its
    percentile-bootstrap interval over probes (parts and total resampled together)."""
    share = parts.mean(0) / total.mean()
    low, high = bootstrap((parts, total), _ratio_of_means, n_boot=n_boot, level=level, rng=seed)
    return share, low, high


def _cumulative(arr: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Per probe, the contribution summed up to each step (embed, L0 attn, L0 mlp, L1 attn, ...)
    [n, 1 + 2L], and each step's (layer, sublayer)."""
    n_layers = arr["attn"].shape[1]
    parts = [arr["embed"][:, None]]
    for layer in range(n_layers):
        parts += [arr["attn"][:, layer : layer + 1], arr["mlp"][:, layer : layer + 1]]
    labels = [(-1, "embed")] + [(l, s) for l in range(n_layers) for s in ("attn", "mlp")]
    return np.cumsum(np.concatenate(parts, axis=1), axis=1), labels


def layer_stats(
    result: AttributionResult,
    *,
    measure: Measure = "logit",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean contribution of the embedding and of each attention / MLP layer per set, with intervals.

    Columns: group, component ("embed" | "attn" | "mlp"), layer (-1 for the embedding), n, mean,
    mean_low, mean_high, measure. A set of one probe gets mean_low = mean_high = mean.
    """
    def rows_of(arr: dict[str, np.ndarray]) -> list[Row]:
        rows = []
        for comp in ("embed", "attn", "mlp"):
            values = arr[comp] if comp != "embed" else arr["embed"][:, None]
            mean, low, high = bootstrap_mean_ci(values, n_boot=n_boot, level=level, seed=seed)
            layers = [-1] if comp == "embed" else range(values.shape[1])
            rows += [{"component": comp, "layer": layer, "mean": mean[j], "mean_low": low[j], "mean_high": high[j]}
                     for j, layer in enumerate(layers)]
        return rows

    return _per_group(result, measure,
                      ["group", "component", "layer", "n", "mean", "mean_low", "mean_high", "measure"], rows_of)


def cumulative_share(
    result: AttributionResult,
    *,
    measure: Measure = "logit",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Share of the final logit (or logit difference) written by each depth, per set.

    Steps run embed, L0 attn, L0 mlp, L1 attn, ... ; `share` is the ratio of means
    ``mean(cumulative contribution) / mean(final value)`` (the final value without the
    unembedding bias), so the last step is 1. Columns: group, step, layer, sublayer, n, share,
    share_low, share_high, measure.
    """
    def rows_of(arr: dict[str, np.ndarray]) -> list[Row]:
        cum, labels = _cumulative(arr)
        share, low, high = _share(cum, arr["total"], n_boot=n_boot, level=level, seed=seed)
        return [{"step": step, "layer": layer, "sublayer": sub, "share": share[step], "share_low": low[step],
                 "share_high": high[step]} for step, (layer, sub) in enumerate(labels)]

    return _per_group(result, measure,
                      ["group", "step", "layer", "sublayer", "n", "share", "share_low", "share_high", "measure"],
                      rows_of)


def layer_shares(
    result: AttributionResult,
    *,
    measure: Measure = "logit",
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Share of the final logit written by each attention and MLP layer, per set: the ratio of
    means ``mean(layer's contribution) / mean(final value)`` (as `cumulative_share`), with a
    percentile-bootstrap interval over probes. Columns: group, component, layer, n, share, share_low,
    share_high, measure."""
    def rows_of(arr: dict[str, np.ndarray]) -> list[Row]:
        rows = []
        for comp in ("attn", "mlp"):
            share, low, high = _share(arr[comp], arr["total"], n_boot=n_boot, level=level, seed=seed)
            rows += [{"component": comp, "layer": layer, "share": share[layer], "share_low": low[layer],
                      "share_high": high[layer]} for layer in range(len(share))]
        return rows

    return _per_group(result, measure,
                      ["group", "component", "layer", "n", "share", "share_low", "share_high", "measure"], rows_of)


_COMPONENT_SHARES = ("embed_share", "attn_share", "mlp_share", "early_mlp_share")


def component_shares(
    result: AttributionResult,
    *,
    measure: Measure = "logit",
    early_fraction: float = 1 / 3,
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per set: the share of the final value written by the embedding, all attention, all MLP,
    and the early MLP layers (the first `early_fraction` of the layers), as ratios of means, each
    with a percentile-bootstrap interval over probes (`<share>_low`, `<share>_high`); plus the depth
    (layer) at which half of it is built. Answers "do early MLPs dominate?"."""
    def rows_of(arr: dict[str, np.ndarray]) -> list[Row]:
        n_layers = arr["attn"].shape[1]
        early = max(1, int(round(n_layers * early_fraction)))
        parts = {  # per-probe contributions [n] of each component type
            "embed_share": arr["embed"], "attn_share": arr["attn"].sum(1), "mlp_share": arr["mlp"].sum(1),
            "early_mlp_share": arr["mlp"][:, :early].sum(1),
        }
        total = arr["total"]
        row: Row = {"mean_total": total.mean()}
        for name, values in parts.items():
            share, low, high = _share(values, total, n_boot=n_boot, level=level, seed=seed)
            row |= {name: share, f"{name}_low": float(low), f"{name}_high": float(high)}
        cum, labels = _cumulative(arr)
        half = [layer for (layer, _), share in zip(labels, cum.mean(0) / total.mean()) if share >= 0.5]
        return [row | {"early_layers": early, "half_built_at_layer": int(half[0]) if half else None}]

    columns = ["group", "n", "measure", "mean_total"]
    columns += [f"{name}{suffix}" for name in _COMPONENT_SHARES for suffix in ("", "_low", "_high")]
    return _per_group(result, measure, columns + ["early_layers", "half_built_at_layer"], rows_of)


def summary(result: AttributionResult, *, measures: Sequence[Measure] = MEASURES) -> dict:
    """A small JSON-ready digest: counts, invariant checks, component shares per set and measure."""
    return {
        "n_probes": len(result),
        "group_counts": result.group_counts,
        "invariant_max_abs_error": result.checks,
        "interval": INTERVAL,
        "component_shares": {m: component_shares(result, measure=m).to_dict(orient="records") for m in measures},
        "top_set_neurons": {
            g: [{"layer": n.layer, "neuron": n.neuron, "mean_contribution": n.contribution,
                 "promoted": list(n.promoted)} for n in ns[:10]]
            for g, ns in result.set_neurons.items()
        },
        "settings": result.settings,
    }
