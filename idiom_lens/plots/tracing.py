"""Figures of causal tracing, drawn from a `TracingResult` or `NoiseEffectsResult` only (nothing
is recomputed).

- `tracing_heatmaps`: average indirect effect, position kind x layer, one panel per restored
  site and window (ROME's figure), for one set.
- `tracing_curves`: average indirect effect per layer at one position kind, one panel per site
  and window, one line per set with its 95% bootstrap interval.
- `restored_share_curves`: the same for the restored share (mean IE / mean TE over the probes
  above the total-effect floor), the comparison of sets whose total effects differ.
- `noise_effects_figure`: what the noise alone does per set: under each one-span design, and one
  word at a time (by position from the end, and the most necessary word per probe).
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.interventions.noise_designs import MEASURES, NoiseEffectsResult
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
    summary = result.summary() if summary is None else summary
    return _curves(result, summary, "aie", position=position, groups=groups,
                   y_title=METRICS["aie"].axis_title(),
                   title=f"Causal tracing at the {position} token, per set (95% bootstrap intervals)")


def restored_share_curves(
    result: TracingResult, *, position: str = "last noised", groups: Sequence[str] | None = None,
    min_total_effect: float = 0.05, share=None,
) -> go.Figure:
    """The share of the total effect restored per layer at one position kind, one line per set
    (95% intervals): mean IE / mean TE over the probes whose total effect reaches
    `min_total_effect` (`TracingResult.restored_share`; `share` reuses one computed already)."""
    share = result.restored_share(min_total_effect=min_total_effect) if share is None else share
    floor = share.attrs.get("min_total_effect", min_total_effect)
    return _curves(result, share, "share", position=position, groups=groups,
                   y_title="restored share (mean IE / mean TE)",
                   title=f"Share of the total effect restored at the {position} token, per set (95% bootstrap "
                         f"intervals)<br><sup>probes with a total effect >= {floor:g}; the others are counted "
                         "as dropped</sup>")


def _curves(
    result: TracingResult, table, column: str, *, position: str, groups: Sequence[str] | None, y_title: str,
    title: str,
) -> go.Figure:
    """`column` (with `<column>_low/_high`) per layer at one position kind, one panel per site and
    window, one line per set."""
    if position not in POSITION_CLASSES:
        raise InputError(f"position must be one of {', '.join(POSITION_CLASSES)}, got {position!r}")
    part = table[table["position"] == position]
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
            dropped = int(g["n_dropped"].max()) if "n_dropped" in g else 0
            name = f"{group} (n = {int(g['n'].max())}" + (f", {dropped} dropped)" if dropped else ")")
            add_band(fig, g["layer"], g[column], g[f"{column}_low"], g[f"{column}_high"], color=group_color(group),
                     name=name, row=1, col=col, show_legend=name not in shown)
            shown.add(name)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=420, width=max(700, 330 * len(specs)))
    return fig


_MEASURE_LABEL = {"total_effect": "total effect (clean - noised probability)",
                  "logprob_change": "change of log p(clean prediction)",
                  "pred_changed": "share of samples whose prediction changed"}


def noise_effects_figure(result: NoiseEffectsResult, *, measure: str = "total_effect", summary=None) -> go.Figure:
    """What the noise alone does, per set (95% bootstrap intervals of the mean): left, each
    one-span design; right, one word at a time by its position from the end, and the most
    necessary single word per probe."""
    if measure not in MEASURES:
        raise InputError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    summary = result.summary() if summary is None else summary
    fig = make_subplots(rows=1, cols=2, subplot_titles=["noised span", "one word noised at a time"],
                        horizontal_spacing=0.08, shared_yaxes=True)
    for group in ordered(summary["group"]):
        g = summary[summary["group"] == group]
        color = group_color(group)
        spans = g[g["unit"] == "span"]
        words = g[g["unit"] == "word"].sort_values("word_from_end")
        best = g[g["unit"] == "most necessary word"]
        name = f"{group} (n = {int(g['n'].max())})"
        panels = ((1, spans, list(spans["design"]), "markers"),
                  (2, words, [f"word {int(w)}" for w in words["word_from_end"]], "lines+markers"),
                  (2, best, ["most necessary"] * len(best), "markers"))
        shown = False
        for col, part, x, mode in panels:
            if part.empty:
                continue
            error = {"type": "data", "symmetric": False, "array": part[f"{measure}_high"] - part[measure],
                     "arrayminus": part[measure] - part[f"{measure}_low"]}
            fig.add_trace(go.Scatter(x=x, y=part[measure], error_y=error, mode=mode, name=name, legendgroup=group,
                                     marker={"color": color, "size": 8}, line={"color": color},
                                     showlegend=not shown),
                          row=1, col=col)
            shown = True
    from_end = sorted(int(w) for w in summary.loc[summary["unit"] == "word", "word_from_end"].unique())
    fig.update_xaxes(categoryorder="array", categoryarray=[f"word {w}" for w in from_end] + ["most necessary"],
                     title_text="noised word, counted from the end (-1 = the last)", row=1, col=2)
    fig.update_yaxes(title_text=_MEASURE_LABEL[measure], row=1, col=1)
    fig.update_layout(title=f"What the noise alone does, per set (95% bootstrap intervals)"
                            f"<br><sup>noise sigma {result.settings.get('noise_sigma', float('nan')):.3g}; "
                            f"{result.settings.get('samples')} noise samples; {result.settings.get('model_name')}"
                            "</sup>",
                      template="plotly_white", height=420, width=900)
    return fig
