"""Figures of the localization scores (`idiom_lens.analyses.localization`), drawn from a
`LocalizationScores` only (nothing is recomputed).

- `localization_heatmap`: methods x implant depth, the mean score of the true layer (every
  implant of that depth pooled), its 95% interval and n as text; chance (0.5) is the white
  middle of the colour scale.
- `localization_profiles`: per method (rows) and depth (columns), the method's per-layer profile
  on the implanted idioms (pooled over the implants of that depth, with its interval; one thin
  line per implant), the true layer marked by a vertical line.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.localization import LocalizationScores
from idiom_lens.analyses.recall import MEASURES
from idiom_lens.errors import InputError
from idiom_lens.plots.style import rgba

_POOLED = "#000000"
_SEEDS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")  # one per implant of a depth


def _measures(frame: pd.DataFrame, measures: Sequence[str] | None) -> list[str]:
    """The measures to draw: `measures` (each must be present), else those of the frame in
    `MEASURES` order, then any others."""
    have = list(dict.fromkeys(frame["measure"]))
    if measures is not None:
        unknown = [m for m in measures if m not in have]
        if unknown:
            raise InputError(f"measures {unknown} are not in the localization scores; they have {have}")
        return list(measures)
    return [m for m in MEASURES if m in have] + [m for m in have if m not in MEASURES]


def localization_heatmap(
    scores: LocalizationScores, *, measures: Sequence[str] | None = None, title: str = ""
) -> go.Figure:
    """Methods (rows) x implant depth (columns): the mean score of the true layer, pooled over the
    implants of each depth; text: score, 95% interval and n. 1 = the true layer ranked first, 0 =
    last, 0.5 = chance (white)."""
    frame = scores.frame[scores.frame["scope"] == "depth"]
    if frame.empty:
        raise InputError("the localization scores have no rows to draw")
    rows = _measures(frame, measures)
    depths = sorted(int(d) for d in frame["depth"].unique())
    cell = frame.set_index(["measure", "depth"])
    z, text = [], []
    for m in rows:
        z.append([float(cell.loc[(m, d), "score"]) if (m, d) in cell.index else None for d in depths])
        text.append([_cell_text(cell.loc[(m, d)]) if (m, d) in cell.index else "" for d in depths])
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"layer {d}" for d in depths], y=rows, text=text, texttemplate="%{text}", zmin=0, zmax=1,
        zmid=0.5, colorscale="RdBu", colorbar={"title": {"text": "score"}, "tickvals": [0, 0.5, 1],
                                                "ticktext": ["0: last", "0.5: chance", "1: first"]},
        hovertemplate="%{y}, implant in %{x}<br>%{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="method (per-layer measure)")
    fig.update_xaxes(title_text="implanted layer")
    fig.update_layout(
        title=title or "Does each method rank the implanted layer first?<br><sup>mean score of the true layer "
        "over the implanted idioms (1 = first, 0.5 = chance, 0 = last), 95% interval, n probes</sup>",
        template="plotly_white",
        height=180 + 50 * len(rows), width=360 + 170 * len(depths), margin={"l": 260, "t": 110})
    return fig


def _cell_text(row: pd.Series) -> str:
    if pd.isna(row["score"]):
        return f"n = {int(row['n'])}"
    return f"{row['score']:.2f}<br>[{row['score_low']:.2f}, {row['score_high']:.2f}]<br>n = {int(row['n'])}"


def localization_profiles(
    scores: LocalizationScores, *, measures: Sequence[str] | None = None, title: str = ""
) -> go.Figure:
    """Per method (rows) and implant depth (columns): the method's per-layer value on the
    implanted idioms, pooled over the implants of the depth (black, 95% band) and per implant
    (thin coloured lines), with the true layer marked by a dotted vertical line."""
    profile = scores.profile
    if profile.empty:
        raise InputError("the localization scores have no profiles to draw")
    rows = _measures(profile, measures)
    depths = sorted(int(d) for d in profile["depth"].unique())
    fig = make_subplots(rows=len(rows), cols=len(depths), shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=min(0.04, 0.3 / max(1, len(rows))),
                        column_titles=[f"implanted in layer {d}" for d in depths], row_titles=rows)
    for r, measure in enumerate(rows, start=1):
        for c, depth in enumerate(depths, start=1):
            part = profile[(profile["measure"] == measure) & (profile["depth"] == depth)]
            implants = list(dict.fromkeys(part.loc[part["scope"] == "implant", "implant"]))
            for i, name in enumerate(implants):
                line = part[(part["scope"] == "implant") & (part["implant"] == name)].sort_values("layer")
                fig.add_trace(go.Scatter(x=line["layer"], y=line["value"], mode="lines", name=name,
                                         legendgroup=name, showlegend=r == 1,
                                         line={"color": _SEEDS[i % len(_SEEDS)], "width": 1}), row=r, col=c)
            pooled = part[part["scope"] == "depth"].sort_values("layer")
            if not pooled.empty:
                x = pooled["layer"].tolist()
                fig.add_trace(go.Scatter(x=x + x[::-1], y=pooled["value_high"].tolist() + pooled["value_low"].tolist()
                                         [::-1], fill="toself", fillcolor=rgba(_POOLED, 0.12), line={"width": 0},
                                         hoverinfo="skip", showlegend=False), row=r, col=c)
                fig.add_trace(go.Scatter(x=x, y=pooled["value"], mode="lines+markers", marker={"size": 4},
                                         line={"color": _POOLED, "width": 2}, name="pooled over implants",
                                         legendgroup="pooled", showlegend=r == 1 and c == 1), row=r, col=c)
            fig.add_vline(x=depth, line={"color": "#d62728", "dash": "dot", "width": 1.5}, row=r, col=c)
    for c in range(1, len(depths) + 1):
        fig.update_xaxes(title_text="layer", row=len(rows), col=c)
    # Row titles read horizontally at the left (plotly puts them rotated at the right, where long
    # method names overlap); column titles keep their place.
    fig.for_each_annotation(lambda a: a.update(font={"size": 11}))
    fig.for_each_annotation(lambda a: a.update(textangle=0, x=0, xanchor="right", xshift=-45),
                            selector=lambda a: a.text in rows)
    fig.update_layout(
        title=title or "Per-layer profile of each method on the implanted idioms (dotted line: the implanted layer)",
        template="plotly_white", height=140 + 120 * len(rows), width=560 + 300 * len(depths),
        margin={"l": 330, "t": 100}, legend={"font": {"size": 10}})
    return fig
