"""Compare the models of a results folder on a normalized depth axis (layer position / number of layers).

Reads what `idiom-lens run` wrote for each model under one results directory (never
recomputing): memorized fractions, the phase boundary and promotion depths, and where
attribution concentrates (`analyses.model_comparison.ModelComparison`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from idiom_lens.analyses.model_comparison import ModelComparison
from idiom_lens.errors import InputError


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
        phases = model.phases()
        per_probe, boundary = phases.probes, phases.boundary_layer
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
        c = phases.curves
        curves.append(c.assign(model=model.name, depth=(c["layer"] + 1) / n_layers))
    return ModelComparison(table=pd.DataFrame(rows), curves=pd.concat(curves, ignore_index=True))


def write_comparison(results_dir: str | Path, *, png: bool = True) -> list[Path]:
    """Write the comparison stage of a results folder (table as parquet + Markdown, figure, summary)."""
    from idiom_lens.io import write_json, write_text
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.compare import depth_figure
    from idiom_lens.study.layout import StudyFolder
    from idiom_lens.study.text import markdown_table

    comparison = compare_models(results_dir)
    out = StudyFolder.open(results_dir).comparison_path
    files = comparison.save(out)
    by_measure = comparison.table.set_index("model").T.reset_index().rename(columns={"index": "measure"})
    files.append(write_text(out / "comparison.md", "# Models compared\n\n" + markdown_table(by_measure) + "\n"))
    files.append(write_json(out / "summary.json", {"models": comparison.table.to_dict("records")}))
    files += save_figure(depth_figure(comparison), out / "depth", png=png, width=1300, height=520)
    return files
