"""The paper's trajectory figure and the promotion-layer histogram, from a `PhaseAnalysis`."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.phases import PhaseAnalysis

COLORS = {
    "memorized idioms": "#d62728",
    "non-memorized idioms": "#1f77b4",
    "ordinary text": "#7f7f7f",
    "memorized facts": "#ff7f0e",
    "non-memorized facts": "#17becf",
}


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def trajectory_figure(
    analysis: PhaseAnalysis, *, title: str = "", log_rank: bool = True, token: str = "pred"
) -> go.Figure:
    """Probability (top) and rank (bottom) of the predicted token per layer, mean with 95% bands.

    `token="target"` plots the target token instead. The phase boundary is a dashed line.
    """
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.07,
        subplot_titles=(f"probability of the {token} token", f"rank of the {token} token (0 = top-1)"),
    )
    curves = analysis.curves
    for group in dict.fromkeys(curves["group"]):
        color = COLORS.get(group, "#2ca02c")
        for row, metric in ((1, f"{token}_prob"), (2, f"{token}_rank")):
            sel = curves[(curves["group"] == group) & (curves["metric"] == metric)].sort_values("layer")
            x = sel["layer"].tolist()
            shift = 1 if (metric.endswith("rank") and log_rank) else 0  # log axis: plot rank + 1
            fig.add_trace(
                go.Scatter(
                    x=x + x[::-1],
                    y=(sel["high"] + shift).tolist() + (sel["low"] + shift).tolist()[::-1],
                    fill="toself", fillcolor=_rgba(color, 0.18), line={"width": 0},
                    hoverinfo="skip", showlegend=False, legendgroup=group,
                ),
                row=row, col=1,
            )
            fig.add_trace(
                go.Scatter(
                    x=x, y=(sel["mean"] + shift).tolist(), mode="lines+markers",
                    line={"color": color, "width": 2}, marker={"size": 5},
                    name=f"{group} (n={int(sel['n'].iloc[0])})", legendgroup=group,
                    showlegend=row == 1,
                ),
                row=row, col=1,
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
    fig.update_yaxes(title_text="mean probability", range=[0, 1], row=1, col=1)
    fig.update_yaxes(
        title_text="mean rank + 1 (log)" if log_rank else "mean rank",
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
                marker_color=COLORS.get(group, "#2ca02c"), opacity=0.6,
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
