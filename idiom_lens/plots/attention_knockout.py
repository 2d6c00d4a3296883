"""The attention knockout figure, drawn from an `AttentionKnockoutResult` only (nothing is recomputed).

`attention_knockout_curves`: per window centre, how the clean prediction changes when the last
position's attention to a source is cut in a window of layers, one line per set with its 95% band,
one panel per source. The default measure is the mean change of its log probability (symmetric,
unbounded both ways); the median, the relative change (bounded at -1, so its mean is biased
upwards where probabilities are low) and the share of changed predictions can be drawn instead.
A dip below zero in a layer range says the last position reads that source there.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutResult
from idiom_lens.errors import InputError
from idiom_lens.groups import group_color, ordered
from idiom_lens.metrics import METRICS
from idiom_lens.plots.style import add_band

_SOURCE_LABEL = {"context": "context (earlier words)", "last_word": "last word (its earlier tokens)", "bos": "BOS"}

# measure -> (summary columns: value, low, high; axis title; tick format; what the band is)
MEASURES: dict[str, tuple[tuple[str, str, str], str, str, str]] = {
    "logp_change": (("logp_change", "logp_change_low", "logp_change_high"),
                    METRICS["logp_change"].axis_title("mean"), "+.2f", "mean and {level:.0%} bootstrap interval"),
    "logp_change_median": (("logp_change_median", "logp_change_median_low", "logp_change_median_high"),
                           METRICS["logp_change"].axis_title("median"), "+.2f",
                           "median and {level:.0%} bootstrap interval"),
    "rel_change": (("rel_change", "rel_change_low", "rel_change_high"), METRICS["rel_change"].axis_title("mean"),
                   ".0%", "mean and {level:.0%} bootstrap interval"),
    "changed": (("changed", "changed_low", "changed_high"), "share of predictions changed", ".0%",
                "share and {level:.0%} Wilson interval"),
}


def attention_knockout_curves(
    result: AttentionKnockoutResult,
    *,
    groups: Sequence[str] | None = None,
    level: float = 0.95,
    measure: str = "logp_change",
) -> go.Figure:
    """`measure` (a key of `MEASURES`; default the mean change of log p(clean prediction)) per
    window centre (x = layer), one line per set with its interval at `level`, one panel per source.

    Raises `InputError` for an unknown measure or when none of the requested `groups` is in the result.
    """
    if measure not in MEASURES:
        raise InputError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    (value, low, high), axis_title, tick_format, band = MEASURES[measure]
    summary = result.summary(level=level)
    group_list = [g for g in ordered(summary["group"]) if groups is None or g in groups]
    if not group_list:
        raise InputError(f"none of the sets {list(groups or [])} is in the result: it has {ordered(summary['group'])}")
    sources = [s for s in result.settings.get("sources", []) if s in set(summary["source"])] or \
        sorted(set(summary["source"]))
    fig = make_subplots(rows=1, cols=len(sources), shared_yaxes=True, horizontal_spacing=0.05,
                        subplot_titles=[_SOURCE_LABEL.get(s, s) for s in sources])
    for col, source in enumerate(sources, start=1):
        for g in group_list:
            part = summary[(summary["group"] == g) & (summary["source"] == source)].sort_values("layer")
            part = part[part["n"] > 0]
            if part.empty:
                continue
            add_band(fig, part["layer"], part[value], part[low], part[high],
                     color=group_color(g), name=f"{g} (n={int(part['n'].max())})", row=1, col=col,
                     show_legend=col == 1)
        fig.add_hline(y=0, line={"color": "#999999", "width": 1, "dash": "dot"}, row=1, col=col)
        fig.update_xaxes(title_text="centre layer of the window", dtick=2, row=1, col=col)
    fig.update_yaxes(title_text=axis_title, tickformat=tick_format, row=1, col=1)
    settings = result.settings
    fig.update_layout(
        title=f"Attention knockout: last position cut from each source in windows of {settings.get('window')} "
        f"layers, {band.format(level=level)} over probes<br><sup>model {settings.get('model_name')}; "
        "blocked edges' pre-softmax scores set to -inf (remaining weights renormalize)</sup>",
        template="plotly_white", legend={"orientation": "h", "y": -0.2}, title_font_size=15,
    )
    return fig
