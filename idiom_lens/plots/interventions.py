"""Figures of the interventions, drawn from result objects only (nothing is recomputed).

- `knockout_heatmaps`: start layer x end layer, share of predictions changed, one row per set,
  one column per control (targeted, random, norm-matched, score-matched) and the whole-MLP
  ceiling (same color scale); the title says which positions, ranking (ours or the authors'),
  norm handling and ablation the result used.
- `knockout_positions_heatmaps`: the same configurations with the knockout at every position (the
  authors') and at the last position (ours), side by side with their difference.
- `knockout_layer_curves`: share changed per layer (windows of one layer) with 95% intervals, one
  panel per set, one line per control and the ceiling: the specificity figure; the hover gives
  each point's output diagnostics (removed norm, output cosine and norm ratio, removed-norm ratio).
- `skip_curves`: share changed and mean probability drop per skipped layer (or window), per set.
- `patching_heatmaps`: restored share of the target logit, layer x position (from the end),
  one panel per site; one probe (token labels) or the mean over a set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.interventions.knockouts import KnockoutResult
from idiom_lens.analyses.interventions.patching import PatchingResult
from idiom_lens.analyses.interventions.skipping import SkipResult
from idiom_lens.errors import InputError
from idiom_lens.groups import MEMORIZED_IDIOMS, group_color, ordered
from idiom_lens.metrics import INTERVENTION_METRICS, METRICS, Metric

_CONTROLS = ("targeted", "random", "matched", "matched_score", "whole_mlp")  # the order of columns and lines
_CONTROL_LABEL = {"targeted": "targeted top-k", "random": "random k", "matched": "norm-matched k",
                  "matched_score": "score-matched", "whole_mlp": "whole MLP (ceiling)"}
_CONTROL_COLORS = {"targeted": "#d62728", "random": "#7f7f7f", "matched": "#1f77b4", "matched_score": "#17becf",
                   "whole_mlp": "#000000"}
_POSITIONS_LABEL = {"all": "every position (authors')", "last": "last position only (ours)"}
_RANK_LABEL = {"effective": "effective (ours)", "magnitude": "magnitude |m| x ||v|| (authors')", "dla": "dla"}
_VARIANT = ["positions", "rank_by", "norm", "ablation"]


def _variant_caption(v: pd.Series, *, positions: bool = True) -> str:
    """How a result was computed, in words: positions, ranking, norm handling, ablation."""
    parts = [f"knocked out at {_POSITIONS_LABEL.get(v.positions, v.positions)}"] if positions else []
    parts += [f"ranked by {_RANK_LABEL.get(v.rank_by, v.rank_by)}", f"post-MLP norm {v.norm}",
              f"{v.ablation} ablation"]
    return "; ".join(parts)


def _groups_in(frame, groups: Sequence[str] | None) -> list[str]:
    return [g for g in ordered(frame["group"]) if groups is None or g in groups]


def _metric(name: str) -> Metric:
    if name not in INTERVENTION_METRICS:
        raise InputError(f"metric must be one of {', '.join(INTERVENTION_METRICS)}, got {name!r}")
    return INTERVENTION_METRICS[name]


def _one_variant(summary: pd.DataFrame, positions: str | None) -> tuple[pd.DataFrame, str]:
    """The rows of one (positions, rank_by, norm, ablation) variant and a caption naming it."""
    if positions is not None:
        summary = summary[summary["positions"] == positions]
        if summary.empty:
            raise InputError(f"no knockout results with positions={positions!r}")
    variants = summary[_VARIANT].drop_duplicates()
    if len(variants) != 1:
        raise InputError("the result holds several variants (positions, ranking, norm, ablation): pick one with "
                         "positions= or draw each run on its own")
    return summary, _variant_caption(variants.iloc[0])


def _triangle(cell: pd.DataFrame, n_layers: int, metric: str) -> np.ndarray:
    z = np.full((n_layers, n_layers), np.nan)
    for row in cell.itertuples():
        z[row.start, row.end] = getattr(row, metric)
    return z


def knockout_heatmaps(
    result: KnockoutResult, *, k: int, mode: str = "zero_top", metric: str = "changed",
    groups: Sequence[str] | None = None, positions: str | None = None, ceiling: bool = True,
) -> go.Figure:
    """Start-layer x end-layer heatmaps of one k and mode: rows = sets, columns = targeted and each
    control of this mode, then the whole-MLP ceiling of the same windows (`ceiling`).

    Raises `InputError` when the result has no rows for this k and mode, or several variants.
    """
    summary, variant = _one_variant(result.summary(), positions)
    sub = summary[(summary["k"] == k) & (summary["mode"] == mode) & (summary["control"] != "whole_mlp")]
    if sub.empty:
        raise InputError(f"no knockout results for k={k}, mode={mode!r}")
    described = _metric(metric)
    windows = set(sub["window"])
    ceil = summary[(summary["control"] == "whole_mlp") & summary["window"].isin(windows)] if ceiling else sub[:0]
    cells = pd.concat([sub, ceil], ignore_index=True)
    group_list = _groups_in(sub, groups)
    controls = [c for c in _CONTROLS if c in set(cells["control"])]
    n_layers = int(result.settings.get("n_layers") or cells["end"].max() + 1)
    n_of = cells.groupby("group")["n"].max()
    titles = [f"{g} (n={int(n_of.get(g, 0))}): {_CONTROL_LABEL[c]}" for g in group_list for c in controls]
    fig = make_subplots(
        rows=len(group_list), cols=len(controls), subplot_titles=titles, shared_xaxes=True,
        shared_yaxes=True, horizontal_spacing=0.04, vertical_spacing=0.12 / max(1, len(group_list) - 1) + 0.04,
    )
    zmax = 1.0 if metric != "prob_drop" else max(1e-6, float(cells[metric].abs().max()))
    for r, g in enumerate(group_list, start=1):
        for c, control in enumerate(controls, start=1):
            cell = cells[(cells["group"] == g) & (cells["control"] == control)]
            fig.add_trace(
                go.Heatmap(
                    z=_triangle(cell, n_layers, metric), x=list(range(n_layers)), y=list(range(n_layers)),
                    zmin=0 if metric != "prob_drop" else -zmax, zmax=zmax,
                    colorscale="Viridis" if metric != "prob_drop" else "RdBu_r",
                    colorbar={"title": {"text": metric}, "len": 0.9}, showscale=(r == 1 and c == 1),
                    hovertemplate="start %{y}, end %{x}: %{z:.2f}<extra></extra>",
                ),
                row=r, col=c,
            )
            fig.update_yaxes(title_text="start layer" if c == 1 else None, autorange="reversed", row=r, col=c)
            fig.update_xaxes(title_text="end layer" if r == len(group_list) else None, row=r, col=c)
    label = "zero the top" if mode == "zero_top" else "keep only the top"
    fig.update_layout(
        title=f"MLP knockouts: {label} {k} neurons per layer in layers start..end ({described.label})"
        f"<br><sup>{variant}</sup>",
        title_font_size=15, template="plotly_white",
    )
    return fig


def knockout_positions_heatmaps(
    result: KnockoutResult, *, k: int, mode: str = "zero_top", group: str = MEMORIZED_IDIOMS,
    control: str = "targeted", metric: str = "changed",
) -> go.Figure:
    """One set, one k, mode and control: the knockout at every position (the authors'), at the last
    position only (ours), and the difference (every - last). `result` holds both (`KnockoutResult.stack_runs`)."""
    summary = result.summary()
    sub = summary[(summary["k"] == k) & (summary["mode"] == mode) & (summary["control"] == control)
                  & (summary["group"] == group)]
    if set(sub["positions"]) != {"all", "last"}:
        raise InputError(f"need results at positions 'all' and 'last' for {group}, k={k}, {mode}, {control}; "
                         f"got {sorted(set(sub['positions']))}")
    described = _metric(metric)
    n_layers = int(sub["end"].max() + 1)
    z_all = _triangle(sub[sub["positions"] == "all"], n_layers, metric)
    z_last = _triangle(sub[sub["positions"] == "last"], n_layers, metric)
    n = int(sub["n"].max())
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.05, subplot_titles=[
        _POSITIONS_LABEL["all"], _POSITIONS_LABEL["last"], "difference (every - last)"])
    hover = "start %{y}, end %{x}: %{z:.2f}<extra></extra>"
    for c, z in enumerate((z_all, z_last), start=1):
        fig.add_trace(go.Heatmap(z=z, x=list(range(n_layers)), y=list(range(n_layers)), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=c == 1, colorbar={"x": 0.62, "len": 0.9},
                                 hovertemplate=hover), row=1, col=c)
    fig.add_trace(go.Heatmap(z=z_all - z_last, x=list(range(n_layers)), y=list(range(n_layers)), zmin=-1, zmax=1,
                             zmid=0, colorscale="RdBu_r", colorbar={"title": {"text": "diff"}, "len": 0.9},
                             hovertemplate=hover), row=1, col=3)
    for c in (1, 2, 3):
        fig.update_yaxes(autorange="reversed", title_text="start layer" if c == 1 else None, row=1, col=c)
        fig.update_xaxes(title_text="end layer", row=1, col=c)
    variants = sub[["rank_by", "norm", "ablation"]].drop_duplicates()
    if len(variants) != 1:
        raise InputError("the result holds several variants (ranking, norm, ablation) per positions: stack one each")
    variant = variants.iloc[0]
    fig.update_layout(
        title=f"{group} (n={n}): {_CONTROL_LABEL[control]}, {'zero the top' if mode == 'zero_top' else 'keep the top'} "
        f"{k} ({described.label})<br><sup>{_variant_caption(variant, positions=False)}</sup>",
        title_font_size=15, template="plotly_white",
    )
    return fig


def knockout_layer_curves(
    result: KnockoutResult, *, k: int = 100, window: int = 1, mode: str = "zero_top", positions: str | None = None,
    groups: Sequence[str] | None = None,
) -> go.Figure:
    """Share changed per start layer for one k and window length, one panel per set, one line per
    control (and the whole-MLP ceiling) with 95% Wilson intervals: is the effect specific to
    memorized idioms, and to the targeted neurons?

    Raises `InputError` when the result holds several variants (pick one with `positions=`).
    """
    table = result.layer_table(k=k, window=window, mode=mode)
    if positions is not None:
        table = table[table["positions"] == positions]
    variants = table[_VARIANT].drop_duplicates()
    if len(variants) != 1:
        raise InputError("the result holds several variants (positions, ranking, norm, ablation): pick one with "
                         "positions= or draw each run on its own")
    v = variants.iloc[0]
    group_list = _groups_in(table, groups)
    n_of = table.groupby("group")["n"].max()
    fig = make_subplots(rows=1, cols=len(group_list), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[f"{g}<br>(n={int(n_of[g])})" for g in group_list])
    hover = ("layer %{x}: %{y:.2f} changed<br>removed norm %{customdata[0]:.3g}, output cosine %{customdata[1]:.2f}, "
             "norm ratio %{customdata[2]:.2f}<br>removed norm / targeted %{customdata[3]:.2f}<extra>%{fullData.name}"
             "</extra>")
    for c, g in enumerate(group_list, start=1):
        for control in _CONTROLS:
            part = table[(table["group"] == g) & (table["control"] == control)].sort_values("layer")
            if part.empty:
                continue
            fig.add_trace(go.Scatter(
                x=part["layer"], y=part["changed"], mode="lines+markers", name=_CONTROL_LABEL[control],
                legendgroup=control, showlegend=c == 1,
                line={"color": _CONTROL_COLORS[control], "dash": "dot" if control == "whole_mlp" else "solid"},
                error_y={"type": "data", "symmetric": False, "array": part["changed_high"] - part["changed"],
                         "arrayminus": part["changed"] - part["changed_low"], "thickness": 1},
                customdata=part[["removed_norm", "out_cosine", "out_norm_ratio", "matched_norm_ratio"]].to_numpy(),
                hovertemplate=hover,
            ), row=1, col=c)
        fig.update_xaxes(title_text="layer" if window == 1 else "first layer of the window", dtick=2, row=1, col=c)
    fig.update_yaxes(range=[0, 1.02], title_text=INTERVENTION_METRICS["changed"].axis_title(), row=1, col=1)
    fig.update_layout(
        title=f"Knockouts of {k} neurons ({mode}), windows of {window} layer{'s' if window > 1 else ''}: "
        f"targeted vs controls, 95% intervals<br><sup>{_variant_caption(v)}</sup>",
        template="plotly_white", legend={"orientation": "h", "y": -0.2}, title_font_size=15,
    )
    return fig


def skip_curves(result: SkipResult, *, windows: Sequence[int] | None = None) -> go.Figure:
    """Share changed and mean probability drop when skipping layers, per set (x = start layer)."""
    summary = result.summary()
    summary = summary[summary["window"] > 0]
    available = sorted(set(summary["window"]))
    windows = list(windows) if windows is not None else available[:1] + ([available[-1]] if len(available) > 1 else [])
    shown = [INTERVENTION_METRICS["changed"], INTERVENTION_METRICS["prob_drop"]]
    fig = make_subplots(rows=1, cols=2, subplot_titles=[m.axis_title() for m in shown],
                        horizontal_spacing=0.1)
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    for g in _groups_in(summary, None):
        n = result.probes[result.probes["group"] == g].shape[0]
        for i, w in enumerate(windows):
            part = summary[(summary["group"] == g) & (summary["window"] == w)].sort_values("start")
            if part.empty:
                continue
            for col, metric in enumerate(shown, start=1):
                fig.add_trace(
                    go.Scatter(
                        x=part["start"], y=part[metric.name], mode="lines+markers",
                        name=f"{g} (n={n}), {w} layer{'s' if w > 1 else ''}", legendgroup=f"{g}{w}",
                        showlegend=col == 1, line={"color": group_color(g), "dash": dashes[i % len(dashes)]},
                    ),
                    row=1, col=col,
                )
    fig.update_xaxes(title_text="first skipped layer", dtick=1)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    fig.update_layout(
        title=f"Layer skipping: block output replaced by its input ({result.settings.get('positions')} positions)",
        template="plotly_white", legend={"orientation": "h", "y": -0.2}, title_font_size=15,
    )
    return fig


def patching_heatmaps(
    result: PatchingResult, *, variant: str = "word_swap", probe_id: str | None = None, group: str | None = None,
) -> go.Figure:
    """Restored share of the target logit, layer x position, one panel per site.

    With `probe_id`, one pair with its tokens on the x axis; otherwise the mean over the valid
    pairs of `group` (or all), positions aligned from the end of the prompt.

    Raises `InputError` when the result has no (valid) rows for the probe, variant or group asked
    for.
    """
    frame = result.to_dataframe()
    frame = frame[frame["variant"] == variant]
    if probe_id is not None:
        frame = frame[frame["probe_id"] == probe_id]
        pair = result.pairs[(result.pairs["probe_id"] == probe_id) & (result.pairs["variant"] == variant)]
        if pair.empty:
            raise InputError(f"no patching result for probe {probe_id!r}, variant {variant!r}")
        p = pair.iloc[0]
        title = (f"'{p.clean_prompt}' → '{p.target}' patched into '{p.corrupted_prompt}' "
                 f"(target logit clean {p.clean_logit:.1f}, corrupted {p.corrupted_logit:.1f})")
    else:
        frame = frame[frame["valid"]]
        if group is not None:
            frame = frame[frame["group"] == group]
        n = frame["probe_id"].nunique()
        title = f"{group or 'all probes'}: mean over {n} pairs ({variant}), positions from the end"
    if frame.empty:
        raise InputError(f"no valid patching rows for variant {variant!r}, probe {probe_id}, group {group}")
    sites = [s for s in result.settings.get("sites", sorted(set(frame["site"]))) if s in set(frame["site"])]
    fig = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, shared_yaxes=True, horizontal_spacing=0.04)
    for c, site in enumerate(sites, start=1):
        part = frame[frame["site"] == site]
        grid = part.pivot_table(index="layer", columns="pos_from_end", values="restored", aggfunc="mean")
        if probe_id is not None:
            tokens = part.drop_duplicates("pos_from_end").set_index("pos_from_end")
            x = [f"{tokens.loc[q, 'clean_token']!r}/{tokens.loc[q, 'corrupted_token']!r}"
                 if tokens.loc[q, "clean_token"] != tokens.loc[q, "corrupted_token"]
                 else repr(tokens.loc[q, "clean_token"])
                 for q in grid.columns]
        else:
            x = [str(q) for q in grid.columns]
        fig.add_trace(
            go.Heatmap(
                z=grid.values, x=x, y=list(grid.index), zmin=-1, zmax=1, zmid=0, colorscale="RdBu",
                reversescale=True, showscale=c == len(sites),
                colorbar={"title": {"text": METRICS["restored"].short_label}},
                hovertemplate="layer %{y}, pos %{x}: %{z:.2f}<extra></extra>",
            ),
            row=1, col=c,
        )
        fig.update_xaxes(title_text="token (clean/corrupted)" if probe_id else "position from end",
                         type="category", row=1, col=c)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title={"text": title, "font": {"size": 13}}, template="plotly_white")
    return fig
