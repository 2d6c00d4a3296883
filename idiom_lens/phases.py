"""The two phases of recall (method.md section 3): candidate promotion, then confidence boosting.

Per probe, from the `resid_post` trajectory of the model's final predicted token:
- `promotion_layer`: the first layer from which the token stays top-1 to the end;
- `top10_layer`: the first layer at which the token enters the top-10;
- `confidence_gain`: its probability at the last layer minus at the promotion layer.
Per set: mean rank, probability, entropy and top-1 share per layer with seeded bootstrap 95%
intervals. The model's phase boundary is the first layer from which at least `top1_share` (half)
of the memorized idioms have their final prediction at top-1 through the last layer, i.e. their
median rank reaches and holds 0 (a mean rank is dominated by a few probes ranked in the
thousands, so it would put the boundary at the last layer on most models).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from jaxtyping import Int

from idiom_lens.memorization import GROUPS
from idiom_lens.stats import bootstrap_mean_ci
from idiom_lens.trajectory import TrajectoryResult

CURVE_METRICS = ("pred_rank", "pred_prob", "pred_top1", "target_rank", "target_prob", "entropy")


def first_holding(ok: np.ndarray) -> np.ndarray:
    """Per row, the first index from which `ok` is true through the end (row length if never)."""
    holds = np.flip(np.logical_and.accumulate(np.flip(ok, axis=-1), axis=-1), axis=-1)
    return np.where(holds.any(axis=-1), holds.argmax(axis=-1), ok.shape[-1])


def promotion_layers(ranks: Int[np.ndarray, "probe layer"], *, top: int = 1) -> Int[np.ndarray, " probe"]:
    """First layer from which rank < `top` holds through the last layer (n_layers if never)."""
    return first_holding(ranks < top)


def first_entry_layers(ranks: Int[np.ndarray, "probe layer"], *, top: int = 10) -> Int[np.ndarray, " probe"]:
    """First layer at which rank < `top` (n_layers if never)."""
    ok = ranks < top
    return np.where(ok.any(axis=1), ok.argmax(axis=1), ranks.shape[1])


@dataclass(frozen=True)
class PhaseAnalysis:
    """Per-probe phase measures, per-set curves with 95% bands, and the model's boundary."""

    probes: pd.DataFrame  # probe_id, kind, group, memorized, promotion_layer, top10_layer, confidence_gain
    curves: pd.DataFrame  # group, layer, metric, mean, low, high, n
    boundary_layer: int | None
    n_layers: int
    top1_share: float
    summary_text: str
    holds: bool

    def to_dataframe(self) -> pd.DataFrame:
        return self.group_table()

    def group_table(self) -> pd.DataFrame:
        """One row per set: size, median/mean promotion layer, top-10 entry, confidence gain."""
        return _group_table(self.probes)

    def to_dict(self) -> dict:
        return {
            "boundary_layer": self.boundary_layer,
            "n_layers": self.n_layers,
            "boundary_rule": f"first layer from which >= {self.top1_share:g} of memorized idioms stay top-1",
            "two_phase_pattern_holds": self.holds,
            "summary": self.summary_text,
            "groups": self.group_table().to_dict("records"),
        }


def _group_table(per_probe: pd.DataFrame) -> pd.DataFrame:
    g = per_probe.groupby("group", sort=False)
    table = pd.DataFrame(
        {
            "n": g.size(),
            "median_promotion_layer": g["promotion_layer"].median(),
            "mean_promotion_layer": g["promotion_layer"].mean(),
            "median_top10_layer": g["top10_layer"].median(),
            "mean_confidence_gain": g["confidence_gain"].mean(),
        }
    ).reset_index()
    order = {name: i for i, name in enumerate(GROUPS)}
    return table.sort_values("group", key=lambda s: s.map(order).fillna(99)).reset_index(drop=True)


def analyse_phases(
    result: TrajectoryResult,
    *,
    top1_share: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> PhaseAnalysis:
    """Promotion and confidence per probe and per set, from the `resid_post` trajectory."""
    s = result.site("resid_post")
    mem = result.memorization.to_dataframe()
    ranks = result.pred_rank[:, s, :]
    probs = result.pred_prob[:, s, :]
    n_layers = result.n_layers
    promo = promotion_layers(ranks, top=1)
    top10 = first_entry_layers(ranks, top=10)
    last = n_layers - 1
    gain = probs[:, last] - probs[np.arange(len(promo)), np.minimum(promo, last)]
    gain = np.where(promo <= last, gain, np.nan)
    per_probe = mem[["probe_id", "kind", "group", "memorized", "hard_to_guess"]].assign(
        promotion_layer=promo, top10_layer=top10, confidence_gain=gain
    )

    curve_rows = []
    for group in [g for g in GROUPS if g in set(mem["group"])] + sorted(set(mem["group"]) - set(GROUPS)):
        rows = (mem["group"] == group).to_numpy()
        for metric in CURVE_METRICS:
            if metric == "pred_top1":
                values = (result.pred_rank[rows, s, :] == 0).astype(np.float64)
            else:
                values = getattr(result, metric)[rows, s, :]
            mean, low, high = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
            for layer in range(n_layers):
                curve_rows.append(
                    {"group": group, "layer": layer, "metric": metric, "mean": mean[layer],
                     "low": low[layer], "high": high[layer], "n": int(rows.sum())}
                )
    curves = pd.DataFrame(curve_rows)

    boundary = _boundary(curves, top1_share=top1_share, n_layers=n_layers)
    holds, text = _summarize(
        _group_table(per_probe), curves, boundary=boundary, n_layers=n_layers, top1_share=top1_share,
        model_name=result.settings.get("model_spec", "this model"),
    )
    return PhaseAnalysis(
        probes=per_probe, curves=curves, boundary_layer=boundary, n_layers=n_layers,
        top1_share=top1_share, summary_text=text, holds=holds,
    )


def _boundary(curves: pd.DataFrame, *, top1_share: float, n_layers: int) -> int | None:
    sel = curves[(curves["group"] == "memorized idioms") & (curves["metric"] == "pred_top1")]
    if sel.empty:
        return None
    share = sel.sort_values("layer")["mean"].to_numpy()
    layer = int(first_holding(share >= top1_share))
    return layer if layer < n_layers else None


def _summarize(
    table: pd.DataFrame, curves: pd.DataFrame, *, boundary: int | None, n_layers: int,
    top1_share: float, model_name: str,
) -> tuple[bool, str]:
    table = table.set_index("group")
    n, b = n_layers, boundary
    lines = []
    med = lambda g: table.loc[g, "median_promotion_layer"] if g in table.index else None  # noqa: E731
    m, nm, tx = med("memorized idioms"), med("non-memorized idioms"), med("ordinary text")
    if b is None or m is None:  # every model's last layer is top-1: b is None only without memorized idioms
        return False, f"On {model_name}, no idiom is memorized; no phase boundary found."
    prob = curves[(curves["group"] == "memorized idioms") & (curves["metric"] == "pred_prob")]
    prob = prob.set_index("layer")["mean"]
    p_b, p_last = float(prob.loc[b]), float(prob.loc[n - 1])
    if b == n - 1:
        lines.append(
            f"On {model_name} ({n} layers), fewer than {top1_share:.0%} of the memorized idioms settle "
            "at top-1 before the last layer; no phase boundary before the output."
        )
    else:
        lines.append(
            f"On {model_name} ({n} layers), at least {top1_share:.0%} of the memorized idioms have "
            f"their predicted token at top-1 from layer {b} (0-based) on: candidate promotion ends "
            f"there. Confidence boosting follows: its mean probability rises from {p_b:.2f} at layer "
            f"{b} to {p_last:.2f} at the last layer."
        )
    earlier = []
    for name, other in (("non-memorized idioms", nm), ("ordinary text", tx)):
        if other is not None:
            lines.append(
                f"Median promotion layer: memorized idioms {m:.1f} vs {name} {other:.1f} "
                f"({other - m:+.1f} layers)."
            )
            earlier.append(other > m)
    holds = bool(earlier) and all(earlier) and p_last > p_b
    lines.append(
        "The two-phase pattern holds on this model." if holds
        else "The two-phase pattern does not clearly hold on this model."
    )
    return holds, " ".join(lines)
