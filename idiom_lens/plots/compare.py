"""Models compared on normalized depth (`analyses.model_comparison`)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.model_comparison import ModelComparison
from idiom_lens.plots.style import add_band, group_color

_DASHES = ("solid", "dash", "dot", "dashdot")


def depth_figure(
    comparison: ModelComparison,
    *,
    groups: tuple[str, ...] = ("memorized idioms", "non-memorized idioms", "ordinary text"),
) -> go.Figure:
    """Top-1 share and probability of the predicted token vs normalized depth, per model and set."""
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.08,
        subplot_titles=("share of probes whose final prediction is top-1", "probability of the predicted token"),
    )
    for m, model in enumerate(dict.fromkeys(comparison.curves["model"])):
        for group in groups:
            for col, metric in ((1, "pred_top1"), (2, "pred_prob")):
                sel = comparison.curves[
                    (comparison.curves["model"] == model) & (comparison.curves["group"] == group)
                    & (comparison.curves["metric"] == metric)
                ].sort_values("depth")
                if sel.empty:
                    continue
                add_band(fig, sel["depth"], sel["mean"], sel["mean_low"], sel["mean_high"], color=group_color(group),
                         name=f"{model}: {group}", row=1, col=col, show_legend=col == 1)
                fig.data[-1].line.dash = _DASHES[m % len(_DASHES)]
    fig.update_xaxes(title_text="depth (layer + 1) / n_layers", range=[0, 1.02])
    fig.update_yaxes(range=[0, 1.02])
    fig.update_layout(template="plotly_white", width=1300, height=520,
                      title="Models compared on normalized depth (mean, 95% bootstrap bands)",
                      legend={"orientation": "h", "y": -0.25})
    return fig
