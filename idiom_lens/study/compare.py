"""Compare models on a normalized depth axis (layer position / number of layers).

Reads what `idiom-lens run` wrote for each model under one results directory (never
recomputing): memorized fractions, the phase boundary and promotion depths, and where
attribution concentrates. Depth of layer l (0-based) of an L-layer model is (l + 1) / L, so
the last layer is 1.0 for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from idiom_lens.errors import InputError
from idiom_lens.plots.style import add_band, group_color

_DASHES = ("solid", "dash", "dot", "dashdot")


@dataclass(frozen=True)
class ModelComparison:
    """One row per model (`table`) and per-layer curves on normalized depth (`curves`)."""

    table: pd.DataFrame
    curves: pd.DataFrame  # model, group, layer, depth, metric, mean, mean_low, mean_high, n

    def to_dataframe(self) -> pd.DataFrame:
        return self.table


def compare_models(results_dir: str | Path) -> ModelComparison:
    """Every model of a results folder with a finished trajectory, read through the study layout."""
    from idiom_lens.study.layout import ATTRIBUTION, TRAJECTORY, StudyFolder

    models = StudyFolder.open(results_dir).models()
    if not models:
        raise InputError(f"{str(results_dir)!r} holds no model with a finished trajectory (run `idiom-lens run`)")
    rows, curves = [], []
    for model in models:
        trajectory = model.stage(TRAJECTORY)
        assert trajectory is not None  # models() lists only models with a finished trajectory
        summary = trajectory.summary
        n_layers = int(summary["settings"]["n_layers"])
        memo = pd.DataFrame(summary["memorization"])
        per_probe = trajectory.table("phases_per_probe")
        boundary = summary["phases"]["boundary_layer"]
        row = {"model": model.name, "n_layers": n_layers}
        for kind in ("idiom", "fact", "text"):
            for subset in ("all", "hard_to_guess"):
                sel = memo[(memo["kind"] == kind) & (memo["subset"] == subset)]
                if not sel.empty:
                    row[f"memorized_{kind}_{subset}"] = float(sel["fraction"].iloc[0])
        row["boundary_depth"] = (boundary + 1) / n_layers if boundary is not None else np.nan
        for group in ("memorized idioms", "non-memorized idioms", "ordinary text"):
            promo = per_probe.loc[per_probe["group"] == group, "promotion_layer"]
            key = group.replace(" ", "_").replace("-", "_")
            row[f"median_promotion_depth_{key}"] = (promo.median() + 1) / n_layers if len(promo) else np.nan
        attribution = model.stage(ATTRIBUTION)
        if attribution is not None:
            for share in attribution.summary["component_shares"]["logit"]:
                if share["group"] == "memorized idioms":
                    row["attr_mlp_share_memorized"] = share["mlp_share"]
                    row["attr_half_built_depth_memorized"] = (share["half_built_at_layer"] + 1) / n_layers
        rows.append(row)
        c = trajectory.table("phases_curves")
        curves.append(c.assign(model=model.name, depth=(c["layer"] + 1) / n_layers))
    return ModelComparison(table=pd.DataFrame(rows), curves=pd.concat(curves, ignore_index=True))


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


def write_comparison(results_dir: str | Path, *, png: bool = True) -> list[Path]:
    """Write the comparison stage of a results folder (table as parquet + Markdown, figure, summary)."""
    from idiom_lens.io import write_json, write_parquet, write_text
    from idiom_lens.plots import save_figure
    from idiom_lens.study.layout import StudyFolder
    from idiom_lens.study.stages import markdown_table

    comparison = compare_models(results_dir)
    out = StudyFolder.open(results_dir).comparison_path
    files = [write_parquet(out / "comparison.parquet", comparison.table)]
    by_measure = comparison.table.set_index("model").T.reset_index().rename(columns={"index": "measure"})
    files.append(write_text(out / "comparison.md", "# Models compared\n\n" + markdown_table(by_measure) + "\n"))
    files.append(write_json(out / "summary.json", {"models": comparison.table.to_dict("records")}))
    files += save_figure(depth_figure(comparison), out / "depth", png=png, width=1300, height=520)
    return files
