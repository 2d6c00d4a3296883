"""Figures of the lens comparison (`analyses.lens_comparison.LensComparison`): the trajectory under
each lens side by side, and the held-out KL to the model's output per layer and lens; and a tuned
lens's training curve."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.lens_comparison import LensComparison
from idiom_lens.groups import group_color
from idiom_lens.metrics import METRICS, TRAJECTORY_METRICS
from idiom_lens.plots.style import add_band

LENS_COLORS = {"logit": "#444444", "tuned": "#1f77b4", "jacobian": "#d62728"}
_GROUPS = ("memorized idioms", "non-memorized idioms", "ordinary text")


def lens_trajectories_figure(comparison: LensComparison, *, title: str = "", groups=_GROUPS) -> go.Figure:
    """One column per lens: probability (top) and rank + 1 on a log axis (bottom) of the model's
    predicted token per layer, mean with 95% bands, per set; the lens's phase boundary dashed."""
    lenses = list(comparison.phases)
    prob, rank = TRAJECTORY_METRICS["pred_prob"], TRAJECTORY_METRICS["pred_rank"]
    fig = make_subplots(rows=2, cols=len(lenses), shared_xaxes=True, vertical_spacing=0.08,
                        horizontal_spacing=0.04, subplot_titles=[f"{lens} lens" for lens in lenses])
    # one rank range for every lens (log10 units), so that the columns compare at a glance
    highest = max(float(a.curves.loc[a.curves["metric"] == rank.name, "mean_high"].max())
                  for a in comparison.phases.values())
    rank_range = [math.log10(0.8), math.log10((highest + 1) * 1.5)]
    for col, lens in enumerate(lenses, start=1):
        analysis = comparison.phases[lens]
        curves = analysis.curves
        for group in [g for g in groups if g in set(curves["group"])]:
            for row, metric in ((1, prob.name), (2, rank.name)):
                sel = curves[(curves["group"] == group) & (curves["metric"] == metric)].sort_values("layer")
                shift = 1 if metric.endswith("rank") else 0
                add_band(fig, sel["layer"], sel["mean"] + shift, sel["mean_low"] + shift, sel["mean_high"] + shift,
                         color=group_color(group), name=f"{group} (n={int(sel['n'].iloc[0])})", row=row, col=col,
                         show_legend=(row == 1 and col == 1))
        if analysis.boundary_layer is not None:
            for row in (1, 2):
                fig.add_vline(x=analysis.boundary_layer, line_dash="dash", line_color="black", row=row, col=col)
        fig.update_xaxes(range=[-0.5, analysis.n_layers - 0.5], row=2, col=col, title_text="layer (block output)")
    for col in range(1, len(lenses) + 1):
        fig.update_yaxes(range=prob.axis_range, row=1, col=col)
        fig.update_yaxes(type="log", range=rank_range, row=2, col=col)
    fig.update_yaxes(title_text=prob.axis_title("mean"), row=1, col=1)
    fig.update_yaxes(title_text=f"mean {rank.label} + 1 (log)", row=2, col=1)
    fig.update_layout(title=title or "The predicted token's trajectory under each lens (dashed: phase boundary)",
                      template="plotly_white", height=750, width=520 * len(lenses) + 120,
                      legend={"orientation": "h", "y": -0.12})
    return fig


def heldout_kl_figure(comparison: LensComparison, *, title: str = "") -> go.Figure:
    """Mean KL(model output || lens read-out) per layer on held-out text, per lens, with 95% bands
    (log axis; the last layer is 0 for every lens and is left out)."""
    table = comparison.heldout_kl
    fig = make_subplots(rows=1, cols=1)
    if table is not None:
        last = int(table["layer"].max())
        for lens, sub in table[table["layer"] < last].groupby("lens", sort=False):
            sub = sub.sort_values("layer")
            add_band(fig, sub["layer"], sub["kl"], sub["kl_low"], sub["kl_high"],
                     color=LENS_COLORS.get(lens, "#2ca02c"), name=f"{lens} lens", row=1, col=1, show_legend=True)
    fig.update_yaxes(type="log", title_text=METRICS["kl"].axis_title())
    fig.update_xaxes(title_text="layer (block output)", dtick=1)
    fig.update_layout(title=title or "How far each lens's read-out is from the model's output (held-out text)",
                      template="plotly_white", height=450, width=900, legend={"orientation": "h", "y": -0.2})
    return fig


def training_curve_figure(curve: pd.DataFrame, *, title: str = "") -> go.Figure:
    """A tuned lens's training curve (`lenses.train.training_curve`): the training loss per step and,
    where measured, the held-out KL, both mean KL(model output || lens) over the trained layers (log axis)."""
    fig = go.Figure()
    train = curve.dropna(subset=["train_kl"])
    fig.add_trace(go.Scatter(x=train["step"], y=train["train_kl"], mode="lines", name="training batch",
                             line={"color": LENS_COLORS["tuned"]}))
    heldout = curve.dropna(subset=["heldout_kl"])
    if len(heldout):
        fig.add_trace(go.Scatter(x=heldout["step"], y=heldout["heldout_kl"], mode="lines+markers", name="held-out",
                                 line={"color": LENS_COLORS["logit"], "dash": "dash"}))
    fig.update_yaxes(type="log", title_text="mean KL over the trained layers (nats)")
    fig.update_xaxes(title_text="step (updates done)")
    fig.update_layout(title=title or "Tuned-lens training curve", template="plotly_white", height=400, width=700,
                      legend={"orientation": "h", "y": -0.25})
    return fig
