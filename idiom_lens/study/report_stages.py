"""What the report shows of each stage: its summary's numbers as tables, then its figures.

`STAGE_BODIES` maps a stage to the function that lays it out; a stage without one gets
`generic_body` (every table of its summary, and its settings). Each returns the HTML and the
figures it placed, so the report places the others after it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from idiom_lens.groups import GROUPS as _GROUP_ORDER
from idiom_lens.groups import slug
from idiom_lens.study.html import FigureRenderer, esc, flatten, kv_table, record_lists, table_html
from idiom_lens.study.layout import Stage, figure_stem

# Settings every stage repeats from its model: shown once, in the model's settings table (in this order).
MODEL_KEYS = ("model_spec", "model_name", "numerics_mode", "prepend_bos", "dtype", "device", "n_layers",
              "d_model", "d_vocab")


def _trajectory_text(stage: Stage) -> str:
    phases = stage.summary.get("phases", {})
    parts = []
    if phases:
        boundary = phases.get("boundary_layer")
        parts.append(
            f'<div class="callout"><p><strong>Phase boundary:</strong> layer {esc(boundary)} '
            f'of {esc(phases.get("n_layers", "?"))} (0-based). '
            f'<span class="muted">{esc(phases.get("boundary_rule", ""))}</span></p>'
            f'<p>{esc(phases.get("summary", ""))}</p></div>'
        )
        groups = pd.DataFrame(phases.get("groups", []))
        if not groups.empty:
            parts.append(table_html(groups, caption="Promotion layer and confidence gain per set "
                                                   "(facts beside idioms and ordinary text)"))
    from idiom_lens.analyses.phases import PhaseAnalysis

    analysis = PhaseAnalysis.load(stage.path)
    for table, caption in _PHASE_TABLES:
        if getattr(analysis, table) is not None:
            parts.append(table_html(getattr(analysis, table), caption=caption))
    return "".join(parts)


# The phase statistics the trajectory stage writes, shown under its summary (name, caption).
_PHASE_TABLES = (
    ("promotion_tests", "Are memorized probes promoted earlier? On all probes (permutation test), on "
                        "confidence-matched pairs (paired sign-flip test) and stratified by final confidence; "
                        "bootstrap intervals; p Holm-adjusted over the family of every promotion test of this "
                        "model and lens (p_adjusted)"),
    ("matching", "Confidence-matched control: memorized vs non-memorized probes of the same final "
                        "probability (greedy 1:1 matching within a caliper)"),
    ("boundary_sensitivity", "The boundary layer as its top-1 share threshold moves from 0.3 to 0.8"),
)


def _group_key(group: str) -> tuple[int, str]:
    return (_GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER), group)


def _attribution_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    """Component shares, the per-layer figures, then the top neurons per set (as tables)."""
    s = stage.summary
    parts, used = [], set()
    for measure, records in s.get("component_shares", {}).items():
        frame = pd.DataFrame(records)
        for name in ("embed_share", "attn_share", "mlp_share", "early_mlp_share"):
            if {name, f"{name}_low", f"{name}_high"} <= set(frame.columns):  # older folders have no interval
                frame[name] = [f"{v:.2f} [{low:.2f}, {high:.2f}]" for v, low, high in
                               zip(frame[name], frame[f"{name}_low"], frame[f"{name}_high"])]
        keep = [c for c in ("group", "n", "mean_total", "embed_share", "attn_share", "mlp_share",
                            "early_mlp_share", "early_layers", "half_built_at_layer") if c in frame.columns]
        parts.append(table_html(frame[keep] if keep else frame,
                                caption=f"Share of the {measure} built by each component type, per set"))
    for path in stage.figures:
        if figure_stem(path).startswith("layers_"):
            parts.append(renderer.render(path))
            used.add(path)
    neurons = s.get("top_set_neurons", {})
    tables = []
    for group in sorted(neurons, key=_group_key):
        frame = pd.DataFrame(neurons[group])
        if frame.empty:
            continue
        if "promoted" in frame.columns:
            frame["promoted"] = frame["promoted"].map(
                lambda toks: " ".join(repr(t) for t in toks[:4]) if isinstance(toks, list) else toks)
        frame = frame.rename(columns={"mean_contribution": "contribution", "promoted": "promotes"})
        tables.append(table_html(frame.head(10), caption=f"Top neurons, {group}"))
        used.update(p for p in stage.figures if figure_stem(p) == f"neurons_{slug(group)}")
    if tables:
        parts.append("<h4>Top neurons per set</h4><p class=\"muted\">Mean contribution to the predicted token's "
                     "logit over the set (layer, neuron), and the tokens each neuron's value vector promotes.</p>"
                     f'<div class="grid2">{"".join(tables)}</div>')
    if s.get("invariant_max_abs_error"):
        parts.append('<p class="caption">Checks (max absolute error of the decomposition):</p>'
                     + kv_table(flatten(s["invariant_max_abs_error"])))
    return "".join(parts), used


def _trajectory_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    return _trajectory_text(stage), set()


def knockout_controls(stage: Stage) -> str:
    """The knockout and patching tables of a stage that saved such results (before its figures)."""
    from idiom_lens.analyses.interventions.knockouts import KnockoutResult
    from idiom_lens.analyses.interventions.patching import PatchingResult

    parts = []
    if stage.has_table("knockout_layers"):
        parts.append(table_html(stage.table("knockout_layers"), caption="Share of predictions changed per layer "
                                "(windows of one layer) per set and control, n and 95% Wilson intervals"))
    for name, knock in stage.results(KnockoutResult).items():
        table = (knock.summary().groupby(["mode", "k", "group", "control"], sort=True)["changed"]
                 .agg(["max", "mean"]).reset_index()
                 .rename(columns={"max": "max share changed", "mean": "mean share changed"}))
        parts.append(table_html(table, caption=f"Knockouts and their control ({name}): share of predictions "
                                               "changed, over all layer windows"))
    for name, patching in stage.results(PatchingResult).items():
        pairs = patching.pairs
        agg = {"pairs": ("valid", "size"), "valid pairs": ("valid", "sum")}
        for col in ("clean_logit", "corrupted_logit"):
            if col in pairs.columns:
                agg[f"mean {col.replace('_', ' ')}"] = (col, "mean")
        table = pairs.groupby(["variant", "group"]).agg(**agg).reset_index()
        parts.append(table_html(table, caption=f"Patching pairs ({name}): the corrupted prompt is the control "
                                               "whose target logit patching restores"))
    return "".join(parts)


def generic_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    s = {k: v for k, v in stage.summary.items() if k not in ("files", "settings")}
    parts = []
    for key, records in record_lists(s):
        frame = pd.DataFrame(records)
        frame = frame[[c for c in frame.columns if not frame[c].map(lambda v: isinstance(v, (list, dict))).any()]]
        parts.append(table_html(frame.head(50), caption=key.replace("_", " ")))
    # Model settings and versions are in the model's settings table: not repeated here.
    scalars = [(k, v) for k, v in flatten(s) if k.split(".")[-1] not in MODEL_KEYS and ".versions." not in f".{k}"]
    if scalars:
        parts.append(f"<details><summary>Settings of this stage ({len(scalars)} values)</summary>"
                     f"{kv_table(scalars)}</details>")
    return "".join(parts), set()


def _lenses_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    """The reading per lens, the side-by-side figure, held-out KL per layer, promotion per set and
    the tests; each lens's own trajectory figures stay in its subfolder (`lenses/<lens>/`)."""
    s = stage.summary
    parts = [f'<div class="callout"><p>{esc(line)}</p></div>' for line in [s.get("summary", "")] if line]
    used = {p for p in stage.figures if p.parent != stage.path}
    for path in stage.figures:
        if path.parent == stage.path:
            parts.append(renderer.render(path))
            used.add(path)
    from idiom_lens.analyses.lens_comparison import LensComparison

    comparison = LensComparison.load(stage.path)
    kl = comparison.heldout_kl
    if kl is not None and not kl.empty:
        wide = kl.pivot(index="layer", columns="lens", values="kl").reset_index()
        n = f"{int(kl['n_tokens'].iloc[0])} tokens, {int(kl['n_sentences'].iloc[0])} sentences"
        parts.append(table_html(wide, caption=f"Held-out KL(model output || lens read-out) per layer, nats ({n}; "
                                              "intervals in lens_heldout_kl.parquet)"))
    for frame, caption in ((comparison.boundaries, "Phase boundary and verdict per lens"),
                           (comparison.promotion, "Promotion layer per set and lens: mean with bootstrap 95% interval"),
                           (comparison.tests, "Are memorized probes promoted earlier? Permutation tests per lens "
                                              "(difference = comparison set minus memorized, in layers)")):
        if not frame.empty:
            parts.append(table_html(frame, caption=caption))
    return "".join(parts), used


def _comparison_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    """The models side by side: one column per model, one row per measure."""
    models = pd.DataFrame(stage.summary.get("models", []))
    if models.empty or "model" not in models.columns:
        return generic_body(stage, renderer)
    table = models.set_index("model").T.reset_index().rename(columns={"index": "measure"})
    return table_html(table, caption="Measures per model (depth = (layer + 1) / n_layers)"), set()


def _ground_truth_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    """The scores per localizer and depth (implanted idioms and both controls), the implants and
    their side effects, and the two figures; the localizers' own figures stay in their subfolders."""
    parts = []
    for path in stage.figures:
        if path.parent == stage.path:
            parts.append(renderer.render(path))
    scores = pd.read_parquet(stage.path / "localization.parquet")
    depth = scores[scores["scope"] == "depth"]
    for name, part in depth.groupby("set", sort=False):
        parts.append(table_html(part[["measure", "depth", "n", "score", "score_low", "score_high", "hit",
                                      "profile_top_layer"]],
                                caption=f"{name}: score of the implanted layer (1 = ranked first, 0.5 = chance), "
                                        "95% bootstrap interval over idioms, seeds pooled"))
    for file, caption in (("implants.parquet", "Implants: share of the implanted idioms predicted, training"),
                          ("side_effects.parquet", "Side effects of each implant on ordinary text and the bundled "
                                                   "idioms")):
        if (stage.path / file).is_file():
            parts.append(table_html(pd.read_parquet(stage.path / file), caption=caption))
    return "".join(parts), set(stage.figures)


STAGE_BODIES = {"trajectory": _trajectory_body, "lenses": _lenses_body, "attribution": _attribution_body,
                "comparison": _comparison_body, "ground_truth": _ground_truth_body}
