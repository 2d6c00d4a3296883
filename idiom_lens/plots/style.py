"""Small drawing helpers shared by every figure. The sets' colours live in `idiom_lens.groups`
(`group_color` is re-exported here for older imports)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import hex_to_rgb

from idiom_lens.groups import group_color  # noqa: F401  (re-exported)


def rgba(hex_color: str, alpha: float) -> str:
    r, g, b = hex_to_rgb(hex_color)
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
