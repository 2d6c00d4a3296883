"""Figures of causal tracing, drawn from a `TracingResult` only (nothing is recomputed).

- `tracing_heatmaps`: average indirect effect, position kind x layer, one panel per restored
  site and window (ROME's figure), for one set.
- `tracing_curves`: average indirect effect per layer at one position kind, one panel per site
  and window, one line per set with its 95% bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.interventions.tracing import POSITION_CLASSES, TracingResult
from idiom_lens.errors import InputError
from idiom_lens.groups import group_color, ordered
from idiom_lens.metrics import METRICS
from idiom_lens.plots.style import add_band

_SITE_LABEL = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def _spec_label(site: str, window: int) -> str:
    return f"{_SITE_LABEL.get(site, site)}" + ("" if window == 1 else f", window {window}")


def _specs(result: TracingResult) -> list[tuple[str, int]]:
    return [tuple(s) for s in result.settings["specs"]]  # type: ignore[misc]


def tracing_heatmaps(result: TracingResult, *, group: str, summary=None) -> go.Figure:
    """ROME's picture for one set: where restoring a clean activation brings the prediction back."""
    summary = result.summary() if summary is None else summary
    part = summary[summary["group"] == group]
    aie = METRICS["aie"]
    if part.empty:
        raise InputError(f"no traced probes in set {group!r}; sets present: {sorted(set(summary['group']))}")
    specs = _specs(result)
    fig = make_subplots(rows=1, cols=len(specs), subplot_titles=[_spec_label(*s) for s in specs],
                        horizontal_spacing=0.04, shared_yaxes=True)
    zmax = max(float(part["aie"].abs().max()), 1e-9)
    for col, (site, window) in enumerate(specs, start=1):
        cell = part[(part["site"] == site) & (part["window"] == window)]
        table = cell.pivot_table(index="position", columns="layer", values="aie")
        rows = [c for c in POSITION_CLASSES if c in table.index]
        table = table.loc[rows]
        fig.add_trace(go.Heatmap(z=table.to_numpy(), x=list(table.columns), y=rows, zmin=-zmax, zmax=zmax,
                                 colorscale="RdBu_r", showscale=col == len(specs),
                                 colorbar={"title": aie.short_label},
                                 hovertemplate=f"layer %{{x}}<br>%{{y}}<br>{aie.short_label} %{{z:.3f}}"
                                               "<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    n = int(part["n"].max())
    sigma = result.settings.get("noise_sigma")
    fig.update_layout(
        title=f"Causal tracing, {group} (n = {n}): {aie.label} on the clean prediction's probability"
              f"<br><sup>noise sigma {sigma:.3g} on {result.settings.get('noised')}; "
              f"{result.settings.get('samples')} noise samples; {result.settings.get('model_name')}</sup>",
        template="plotly_white", height=420, width=max(700, 330 * len(specs)),
    )
    return fig


def tracing_curves(
    result: TracingResult, *, position: str = "last noised", groups: Sequence[str] | None = None, summary=None,
) -> go.Figure:
    """Average indirect effect per layer at one position kind, one line per set (95% intervals)."""
    if position not in POSITION_CLASSES:
        raise InputError(f"position must be one of {', '.join(POSITION_CLASSES)}, got {position!r}")
    summary = result.summary() if summary is None else summary
    part = summary[summary["position"] == position]
    specs = _specs(result)
    fig = make_subplots(rows=1, cols=len(specs), subplot_titles=[_spec_label(*s) for s in specs],
                        horizontal_spacing=0.05, shared_yaxes=True)
    shown: set[str] = set()
    for col, (site, window) in enumerate(specs, start=1):
        cell = part[(part["site"] == site) & (part["window"] == window)]
        for group in ordered(cell["group"]):
            if groups is not None and group not in groups:
                continue
            g = cell[cell["group"] == group].sort_values("layer")
            name = f"{group} (n = {int(g['n'].max())})"
            add_band(fig, g["layer"], g["aie"], g["aie_low"], g["aie_high"], color=group_color(group), name=name,
                     row=1, col=col, show_legend=name not in shown)
            shown.add(name)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text=METRICS["aie"].axis_title(), row=1, col=1)
    fig.update_layout(title=f"Causal tracing at the {position} token, per set (95% bootstrap intervals)",
                      template="plotly_white", height=420, width=max(700, 330 * len(specs)))
    return fig
