"""Plotly figures of direct logit attribution, built from result objects (never recomputing).

- `layer_contribution_figure`: per-layer mean contribution of attention and MLP per set, with 95%
  bands, plus the cumulative share of the final logit built by each depth.
- `probe_heatmap_figure`: one probe's embed / attention / MLP contribution per layer.
- `head_heatmap_figure`: one probe's per-head contributions (layer x head).
- `top_neurons_table`: top neurons with their activation, contribution and promoted tokens.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.analyses.attribution import MEASURES, AttributionResult, Measure, NeuronAttribution, ProbeAttribution
from idiom_lens.analyses.attribution_stats import INTERVAL, cumulative_share, groups_of, layer_stats
from idiom_lens.groups import group_color
from idiom_lens.metrics import METRICS
from idiom_lens.plots.style import add_band


def layer_contribution_figure(
    result: AttributionResult, *, measure: Measure = "logit", min_n: int = 3, n_boot: int = 2000, seed: int = 0
) -> go.Figure:
    """Attention and MLP contribution per layer per set (mean, 95% band) and cumulative share.

    Sets with fewer than `min_n` probes are left out (named in the title): their curves are noise.
    """
    stats = layer_stats(result, measure=measure, n_boot=n_boot, seed=seed)
    cum = cumulative_share(result, measure=measure, n_boot=n_boot, seed=seed)
    small = [g for g, n in stats.groupby("group")["n"].first().items() if n < min_n]
    if len(small) == stats["group"].nunique():
        small = []  # never draw an empty figure
    shown = [g for g in groups_of(result) if g not in small]
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.07,
                        subplot_titles=("Attention layers", "MLP layers", "Cumulative share of the final value"))
    for group in shown:
        color = group_color(group)
        n = int(stats.loc[stats["group"] == group, "n"].iloc[0])
        name = f"{group} (n={n})"
        for col, comp in ((1, "attn"), (2, "mlp")):
            s = stats[(stats["group"] == group) & (stats["component"] == comp)]
            add_band(fig, s["layer"], s["mean"], s["mean_low"], s["mean_high"], color=color, name=name, row=1, col=col,
                     show_legend=col == 1)
        c = cum[cum["group"] == group]
        x = [-0.5 if sub == "embed" else layer + (0.0 if sub == "attn" else 0.5)
             for layer, sub in zip(c["layer"], c["sublayer"])]
        add_band(fig, x, c["share"], c["share_low"], c["share_high"], color=color, name=name, row=1, col=3,
                 show_legend=False)
    for col in (1, 2, 3):
        fig.add_hline(y=0, line=dict(color="black", width=1, dash="dot"), row=1, col=col)
        fig.update_xaxes(title_text="layer" if col < 3 else "depth (layer; x.5 = after its MLP)", row=1, col=col)
    fig.add_hline(y=1, line=dict(color="black", width=1, dash="dot"), row=1, col=3)
    fig.update_yaxes(title_text=METRICS[measure].label, row=1, col=1)
    shares = cum[cum["group"].isin(shown)]
    low, high = float(shares["share_low"].min()), float(shares["share_high"].max())
    fig.update_yaxes(title_text=METRICS["share"].short_label, range=[max(low, -1.0) - 0.05, min(high, 2.0) + 0.05],
                     row=1, col=3)
    model = result.settings.get("model_name", "")
    left_out = f"<br><sup>left out (n < {min_n}): {', '.join(small)}</sup>" if small else ""
    masked = result.settings.get("objective") == "masked"
    logits = "raw MLM logits at the mask, norms frozen" if masked else "compat logits"
    fig.update_layout(
        title=dict(text=f"Direct logit attribution per layer: {model} ({logits}; bands: {INTERVAL}){left_out}",
                   font=dict(size=14)),
        template="plotly_white", legend=dict(orientation="h", yanchor="top", y=-0.15, x=0),
        margin=dict(t=80, b=110, l=70, r=20),
    )
    return fig


def probe_heatmap_figure(probe: ProbeAttribution, *, measure: Measure = "logit") -> go.Figure:
    """Layer x component heatmap of one probe (embedding in its own column)."""
    c = MEASURES.index(measure)
    n_layers = probe.n_layers
    x = ["emb"] + [str(i) for i in range(n_layers)]
    z = [
        [float(probe.embed[c])] + [None] * n_layers,
        [None] + [float(v) for v in probe.attn[:, c]],
        [None] + [float(v) for v in probe.mlp[:, c]],
    ]
    y = ["embed", "attn", "mlp"]
    text = [["" if v is None else f"{v:.1f}" for v in row] for row in z]
    vmax = max(abs(v) for row in z for v in row if v is not None) or 1.0
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, text=text, texttemplate="%{text}", colorscale="RdBu", zmid=0,
                               zmin=-vmax, zmax=vmax, colorbar=dict(title="logit"), hoverongaps=False))
    total = probe.logit if c == 0 else probe.logit_diff
    what = f"logit({probe.pred_token!r})" if c == 0 else f"logit({probe.pred_token!r}) - logit({probe.other_token!r})"
    fig.update_layout(
        title=dict(text=f"{probe.prompt!r} -> {probe.pred_token!r}: contributions to {what} = {total:.2f}",
                   font=dict(size=14)),
        xaxis_title="layer", template="plotly_white", yaxis=dict(autorange="reversed"),
        margin=dict(t=70, l=70, r=20, b=60),
    )
    return fig


def head_heatmap_figure(probe: ProbeAttribution, *, measure: Measure = "logit") -> go.Figure:
    """Layer x head heatmap of one probe's per-head contributions."""
    c = MEASURES.index(measure)
    heads = probe.heads[:, :, c]
    z = heads.T.tolist()  # rows: heads, columns: layers
    vmax = float(heads.abs().max()) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(i) for i in range(heads.shape[0])], y=[f"H{h}" for h in range(heads.shape[1])],
        text=[[f"{v:.1f}" for v in row] for row in z], texttemplate="%{text}", colorscale="RdBu", zmid=0,
        zmin=-vmax, zmax=vmax, colorbar=dict(title="logit"),
    ))
    fig.update_layout(
        title=dict(text=f"Attention heads, {probe.prompt!r} -> {probe.pred_token!r} ({METRICS[measure].label})",
                   font=dict(size=14)),
        xaxis_title="layer", yaxis_title="head", template="plotly_white", yaxis=dict(autorange="reversed"),
        margin=dict(t=70, l=70, r=20, b=60),
    )
    return fig


def top_neurons_table(
    neurons: Sequence[NeuronAttribution], *, title: str = "Top neurons", value_vector_final_norm: bool | None = None
) -> go.Figure:
    """Plotly table: layer, neuron, activation, contributions, promoted tokens (value vector x W_U)."""
    if value_vector_final_norm is not None:
        applied = "applied" if value_vector_final_norm else "not applied"
        title += f" (promoted tokens: sign(activation) x value vector x W_U, final norm weight {applied})"
    cells = [
        [n.layer for n in neurons], [n.neuron for n in neurons], [f"{n.activation:.3f}" for n in neurons],
        [f"{n.contribution:+.3f}" for n in neurons], [f"{n.contribution_diff:+.3f}" for n in neurons],
        # plotly renders table cells as HTML: escaped, tokens such as '<b>' show literally
        [" | ".join(html.escape(repr(t)[1:-1], quote=False) for t in n.promoted) for n in neurons],
    ]
    fig = go.Figure(go.Table(
        columnwidth=[40, 50, 70, 80, 80, 320],
        header=dict(values=["layer", "neuron", "activation", "to logit", "to logit diff", "promoted tokens"],
                    fill_color="#dde3ea", align="left", font=dict(size=13)),
        cells=dict(values=cells, align="left", font=dict(size=12), height=24),
    ))
    fig.update_layout(title=dict(text=title, font=dict(size=14)), margin=dict(t=60, l=20, r=20, b=20))
    return fig
