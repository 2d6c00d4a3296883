"""Colours and small drawing helpers shared by every figure, so a set looks the same everywhere."""

from __future__ import annotations

import plotly.graph_objects as go

GROUP_COLORS = {
    "memorized idioms": "#d62728",
    "non-memorized idioms": "#1f77b4",
    "ordinary text": "#7f7f7f",
    "memorized facts": "#ff7f0e",
    "non-memorized facts": "#17becf",
}
OTHER_COLOR = "#2ca02c"


def group_color(group: str) -> str:
    return GROUP_COLORS.get(group, OTHER_COLOR)


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def add_band(
    fig: go.Figure, x, mean, low, high, *, color: str, name: str, row: int, col: int, show_legend: bool
) -> None:
    """A mean line with a shaded interval, sharing one legend entry per `name`."""
    x = list(x)
    fig.add_trace(
        go.Scatter(x=x + x[::-1], y=list(high) + list(low)[::-1], fill="toself", fillcolor=rgba(color, 0.18),
                   line={"width": 0}, hoverinfo="skip", showlegend=False, legendgroup=name),
        row=row, col=col,
    )
    fig.add_trace(
        go.Scatter(x=x, y=list(mean), mode="lines+markers", line={"color": color, "width": 2},
                   marker={"size": 5}, name=name, legendgroup=name, showlegend=show_legend),
        row=row, col=col,
    )
