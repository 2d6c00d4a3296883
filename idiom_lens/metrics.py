"""What the analyses measure and the figures draw, described once (after tuned-lens's
`TrajectoryStatistic`): a metric's column name, its label, its unit, its range and its direction.

- Trajectory metrics (`idiom_lens.analyses.trajectory`, `phases`): per layer, the rank and
  probability of the predicted and of the target token, and the entropy of the read-out.
- Intervention metrics (knockouts, layer skipping): per configuration, whether the prediction
  changed, how much its probability dropped, whether the new prediction is the target.
- Effect metrics: per layer (or cell) and set, what causal tracing, attention knockout, activation
  patching, the learned lenses and direct logit attribution measure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One measured quantity: `name` is its column in the results, `label` says what it is."""

    name: str
    label: str
    unit: str = ""
    limits: tuple[float | None, float | None] = (None, None)  # the values it can take (None: unbounded)
    lower_is_better: bool | None = None  # None: neither direction is "better"
    short: str = ""  # a compact label for colour bars, hover text and small panels (default: `label`)

    def axis_title(self, prefix: str = "") -> str:
        """An axis title: `prefix` (e.g. "mean") and the label, with the unit where it adds something."""
        text = f"{prefix} {self.label}".strip()
        return f"{text} ({self.unit})" if self.unit else text

    @property
    def short_label(self) -> str:
        """`short` where one is set, else the label."""
        return self.short or self.label

    @property
    def axis_range(self) -> list[float] | None:
        """[low, high] for a plotly axis when both limits are known, else None (autorange)."""
        low, high = self.limits
        return None if low is None or high is None else [low, high]


def _metrics(*items: Metric) -> dict[str, Metric]:
    return {m.name: m for m in items}


# Per layer of the logit lens (`TrajectoryResult` arrays, `PhaseAnalysis.curves` metric column).
TRAJECTORY_METRICS: dict[str, Metric] = _metrics(
    Metric("pred_rank", "rank of the predicted token", "0 = top-1", (0, None), lower_is_better=True),
    Metric("pred_prob", "probability of the predicted token", limits=(0, 1), lower_is_better=False),
    Metric("pred_top1", "share with the predicted token at top-1", limits=(0, 1), lower_is_better=False),
    Metric("target_rank", "rank of the target token", "0 = top-1", (0, None), lower_is_better=True),
    Metric("target_prob", "probability of the target token", limits=(0, 1), lower_is_better=False),
    Metric("entropy", "entropy of the read-out", "nats", (0, None)),
)

# Per intervention configuration and set (knockout and skipping summaries).
INTERVENTION_METRICS: dict[str, Metric] = _metrics(
    Metric("changed", "share of predictions changed", limits=(0, 1), short="share changed"),
    Metric("prob_drop", "mean drop in p(original prediction)", limits=(-1, 1)),
    Metric("new_is_target", "share predicting the target", limits=(0, 1)),
)

# Per layer (or cell) and set: tracing summaries (`aie`), attention-knockout summaries
# (`rel_change`, `logp_change`), patching rows (`restored`), held-out KL of the lenses (`kl`), direct logit
# attribution per measure (`logit`, `logit_diff`, and the `share` of the final value).
EFFECT_METRICS: dict[str, Metric] = _metrics(
    Metric("aie", "average indirect effect", limits=(-1, 1), short="AIE"),  # on the clean prediction's probability
    Metric("rel_change", "relative change of p(clean prediction)", limits=(-1, None)),
    Metric("logp_change", "change of log p(clean prediction)", "nats"),
    Metric("restored", "restored share of the target logit", short="restored"),
    Metric("kl", "KL(output || lens) on held-out text", "nats", (0, None), lower_is_better=True),
    Metric("logit", "contribution to the predicted token's logit"),
    Metric("logit_diff", "contribution to logit(pred) - logit(contrast)"),
    Metric("share", "share of the final logit", short="share"),
)

METRICS: dict[str, Metric] = TRAJECTORY_METRICS | INTERVENTION_METRICS | EFFECT_METRICS
