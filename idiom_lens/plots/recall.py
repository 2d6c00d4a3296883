"""One picture of where recall lives: every causal method and the direct logit attribution per
layer, memorized vs non-memorized idioms, drawn from a `RecallProfile` (nothing recomputed)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.recall import RecallProfile
from idiom_lens.errors import InputError
from idiom_lens.groups import group_color, ordered
from idiom_lens.metrics import METRICS
from idiom_lens.plots.style import rgba

# Panels top to bottom: (title, [(measure, dash, legend label)], y-axis title): the primary
# measures of `analyses.recall` (normalized, frozen norm, log-probability), one panel per method.
_PANELS = (
    ("MLP neuron knockouts (top-100 of one layer, every position, post-MLP norm frozen)",
     [("knockout top-100", "solid", "top-100"), ("knockout matched", "dot", "control matched on removed norm")],
     METRICS["changed"].short_label),
    ("Causal tracing, restored share of the total effect (a window of layers restored)",
     [("tracing MLP share (last noised)", "solid", "MLP, last noised token"),
      ("tracing MLP share (last)", "dash", "MLP, last token"),
      ("tracing attention share (last)", "dot", "attention, last token")],
     "IE / total effect"),
    ("Attention knockout (last token cut from the earlier words)",
     [("attention knockout", "solid", "context -> last")], "median drop in log p (nats)"),
    ("Direct logit attribution", [("DLA MLP share", "solid", "MLP layer")], "MLP share of logit"),
)


def where_recall_lives(profile: RecallProfile, *, title: str = "") -> go.Figure:
    """Four panels sharing the layer axis; colour = set, dash = variant; bands = 95% intervals."""
    frame = profile.frame
    panels = [p for p in _PANELS if any(m in set(frame["measure"]) for m, _, _ in p[1])]
    if not panels:
        raise InputError("the recall profile has none of the measures this figure draws")
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[p[0] for p in panels])
    for row, (_, lines, ytitle) in enumerate(panels, start=1):
        for measure, dash, label in lines:
            part = frame[frame["measure"] == measure]
            for group in ordered(part["group"]):
                g = part[part["group"] == group].sort_values("layer")
                color = group_color(group)
                x = g["layer"].tolist()
                band = g["value_high"].tolist() + g["value_low"].tolist()[::-1]
                fig.add_trace(go.Scatter(x=x + x[::-1], y=band, fill="toself",
                                         fillcolor=rgba(color, 0.12), line={"width": 0}, hoverinfo="skip",
                                         showlegend=False), row=row, col=1)
                fig.add_trace(go.Scatter(x=x, y=g["value"], mode="lines+markers", marker={"size": 4},
                                         line={"color": color, "dash": dash, "width": 2},
                                         name=f"{group}: {label} (n = {int(g['n'].max())})"),
                              row=row, col=1)
        fig.update_yaxes(title_text=ytitle, row=row, col=1)
    fig.update_xaxes(title_text="layer", row=len(panels), col=1)
    fig.update_layout(title=title or "Where recall lives: memorized idioms against the comparison sets, per layer",
                      template="plotly_white", height=260 * len(panels) + 120, width=1100,
                      legend={"font": {"size": 10}})
    return fig
