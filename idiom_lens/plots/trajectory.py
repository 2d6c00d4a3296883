"""The paper's trajectory figure and the promotion-layer histogram, from a `PhaseAnalysis`."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.phases import PhaseAnalysis
from idiom_lens.groups import group_color
from idiom_lens.metrics import TRAJECTORY_METRICS
from idiom_lens.plots.style import add_band


def trajectory_figure(
    analysis: PhaseAnalysis, *, title: str = "", log_rank: bool = True, token: str = "pred"
) -> go.Figure:
    """Probability (top) and rank (bottom) of the predicted token per layer, mean with 95% bands.

    `token="target"` plots the target token instead. The phase boundary is a dashed line.
    """
    prob, rank = TRAJECTORY_METRICS[f"{token}_prob"], TRAJECTORY_METRICS[f"{token}_rank"]
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.07,
        subplot_titles=(prob.axis_title(), rank.axis_title()),
    )
    curves = analysis.curves
    for group in dict.fromkeys(curves["group"]):
        color = group_color(group)
        for row, metric in ((1, prob.name), (2, rank.name)):
            sel = curves[(curves["group"] == group) & (curves["metric"] == metric)].sort_values("layer")
            shift = 1 if (metric.endswith("rank") and log_rank) else 0  # log axis: plot rank + 1
            add_band(
                fig, sel["layer"], sel["mean"] + shift, sel["mean_low"] + shift, sel["mean_high"] + shift,
                color=color, name=f"{group} (n={int(sel['n'].iloc[0])})", row=row, col=1,
                show_legend=row == 1,
            )
    if analysis.boundary_layer is not None:
        for row in (1, 2):
            fig.add_vline(
                x=analysis.boundary_layer, line_dash="dash", line_color="black", row=row, col=1,
            )
        fig.add_annotation(
            x=analysis.boundary_layer, y=1.0, yref="y domain", text="phase boundary",
            showarrow=False, xanchor="left", row=1, col=1,
        )
    fig.update_yaxes(title_text=prob.axis_title("mean"), range=prob.axis_range, row=1, col=1)
    fig.update_yaxes(
        title_text=f"mean {rank.label} + 1 (log)" if log_rank else rank.axis_title("mean"),
        type="log" if log_rank else "linear", row=2, col=1,
    )
    n_layers = analysis.n_layers
    fig.update_xaxes(range=[-0.5, n_layers - 0.5], dtick=1)
    fig.update_xaxes(title_text="layer (0-based, residual after the block)", row=2, col=1)
    fig.update_layout(
        title=title or "Memorized predictions are promoted early, then boosted",
        template="plotly_white", height=750, width=1000,
        legend={"orientation": "h", "y": -0.12},
    )
    return fig


def promotion_histogram(analysis: PhaseAnalysis, *, title: str = "") -> go.Figure:
    """Share of each set's probes by promotion layer (n_layers = never settles at top-1)."""
    fig = go.Figure()
    n = analysis.n_layers
    for group, sub in analysis.probes.groupby("group", sort=False):
        fig.add_trace(
            go.Histogram(
                x=sub["promotion_layer"], name=f"{group} (n={len(sub)})", histnorm="probability",
                marker_color=group_color(group), opacity=0.6,
                xbins={"start": -0.5, "end": n + 0.5, "size": 1},
            )
        )
    fig.update_layout(
        barmode="overlay", template="plotly_white", width=1000, height=450,
        title=title or "Layer from which the predicted token stays top-1",
        xaxis={"title": f"promotion layer ({n} = never)", "dtick": 1},
        yaxis={"title": "share of probes"},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
