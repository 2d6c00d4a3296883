"""One self-contained HTML page from a results folder.

The report never recomputes an analysis: it reads the folder through `study.layout` (stage
summaries, tables, typed results and the `*.fig.json` figures) and lays them out, one section
per model and per stage. The page itself is `templates/report.html`. Plotly's JavaScript is
embedded once, inline, so the page opens offline. A small inline script records, on `<body>`, how many plots
rendered (`data-plots-rendered`) and any JavaScript error (`data-errors`), so a headless
browser can check the page.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from idiom_lens.errors import InputError
from idiom_lens.groups import GROUPS as _GROUP_ORDER
from idiom_lens.io import write_text
from idiom_lens.study.html import (
    FigureRenderer,
    Section,
    esc,
    flatten,
    kv_table,
    record_lists,
    slug,
    table_html,
)
from idiom_lens.study.layout import ModelFolder, Stage, StudyFolder, figure_stem
from idiom_lens.study.layout import natural_key as _natural_key

# Figures of a stage in the order the report shows them (by stem prefix); others follow, by name.
FIGURE_ORDER: dict[str, tuple[str, ...]] = {
    "trajectory": ("trajectory", "trajectory_target", "promotion_layers"),
    "attribution": (
        "layers_logit", "layers_logit_diff", "neurons_memorized_idioms", "neurons_memorized_facts",
        "neurons_non-memorized_idioms", "neurons_non-memorized_facts", "neurons_ordinary_text",
    ),
    "interventions": ("knockout_zero_top", "knockout_keep_top", "knockout", "skip", "patching"),
    "comparison": ("depth",),
}
STAGE_TITLES = {
    "trajectory": "Layer trajectory and the two phases",
    "lenses": "Is the two-phase finding a logit-lens artefact? The phases under the logit, tuned and Jacobian lenses",
    "attribution": "Attribution per layer and top neurons",
    "interventions": "Interventions: neuron knockouts and layer skipping",
    "patching": "Activation patching: where the idiom is read in",
    "tracing": "Causal tracing: where restoring one clean activation brings the prediction back",
    "attention_knockout": "Attention knockout: does the last token read the idiom's earlier words?",
    "recall": "Where recall lives: every method per layer, memorized vs non-memorized idioms",
    "comparison": "Models compared",
}
_KIND_ORDER = {"idiom": 0, "fact": 1, "text": 2}


# --------------------------------------------------------------------------------------
# Finding results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelResults:
    """One model's finished stages, in display order, and its folder (for the typed loaders)."""

    folder: ModelFolder
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def path(self) -> Path:
        return self.folder.path

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def _figure_sort_key(stage: str, stage_dir: Path, path: Path) -> tuple[int, int, list[Any]]:
    rel = str(path.relative_to(stage_dir).with_name(figure_stem(path)))
    order = FIGURE_ORDER.get(stage, ())
    exact = [i for i, name in enumerate(order) if figure_stem(path) == name]
    prefix = [i for i, name in enumerate(order) if figure_stem(path).startswith(name)]
    rank = exact[0] if exact else (prefix[0] if prefix else len(order))
    return (rank, rel.count("/"), _natural_key(rel))


def _in_display_order(stage: Stage) -> Stage:
    figures = sorted(stage.figures, key=lambda p: _figure_sort_key(stage.name, stage.path, p))
    return dataclasses.replace(stage, figures=tuple(figures))


def find_results(results_dir: str | Path) -> tuple[list[ModelResults], list[Stage]]:
    """The models of a results folder (through `study.layout`) and its root-level stages (the
    comparison). Raises `InputError` when it is no results folder or holds no finished model."""
    study = StudyFolder.open(results_dir)
    models = [ModelResults(m, tuple(_in_display_order(s) for s in m.stages())) for m in study.models()]
    if not models:
        raise InputError(f"{str(results_dir)!r} holds no model with a finished trajectory (run `idiom-lens run`)")
    comparison = study.comparison()
    return models, [_in_display_order(comparison)] if comparison is not None else []


def memorization_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """Memorization rows of a trajectory summary, facts beside idioms: one row per kind."""
    memo = pd.DataFrame(summary.get("memorization", []))
    if memo.empty:
        return memo
    rows = []
    for kind, part in sorted(memo.groupby("kind"), key=lambda kv: (_KIND_ORDER.get(kv[0], 9), kv[0])):
        row: dict[str, Any] = {"kind": kind}
        for subset in ("all", "hard_to_guess"):
            sel = part[part["subset"] == subset]
            if not sel.empty:
                rec = sel.iloc[0]
                row[f"n ({subset})"] = int(rec["n"])
                row[f"memorized ({subset})"] = int(rec["memorized"])
                row[f"fraction ({subset})"] = float(rec["fraction"])
        rows.append(row)
    return pd.DataFrame(rows)


def _datasets_section(models: list[ModelResults]) -> Section:
    from idiom_lens.datasets import bundled_names, load_probes

    rows = []
    for name in bundled_names():
        try:
            probes = load_probes(name)
        except Exception as err:  # noqa: BLE001 - a broken bundled set should not stop the report
            rows.append({"dataset": name, "probes": f"unreadable: {err}"})
            continue
        rows.append({"dataset": name, "probes": len(probes.probes), **probes.flag_counts()})
    body = (
        "<p>Bundled probe sets and how many probes carry each quality flag "
        "(<code>similarity_ind</code>: the target is in the prompt; <code>prompt_comp_ind</code>: part of the "
        "prompt already determines the target; <code>frequent_target_ind</code>: True when the target is "
        "<em>not</em> a frequent word; <code>hard_to_guess</code> = neither of the first two).</p>"
        + table_html(pd.DataFrame(rows))
    )
    used = []
    for model in models:
        traj = model.stage("trajectory")
        memo = pd.DataFrame(traj.summary.get("memorization", [])) if traj else pd.DataFrame()
        if memo.empty:
            continue
        for subset in ("all", "hard_to_guess"):
            sel = memo[memo["subset"] == subset]
            used.append({"model": model.name, "subset": subset,
                         **{str(r.kind): int(r.n) for r in sel.itertuples()}})
    if used:
        body += "<p>Probes used in these results (per kind; <code>hard_to_guess</code> is the strict subset):</p>"
        body += table_html(pd.DataFrame(used))
    return Section("datasets", "Datasets and their flags", body)


def _overview_section(models: list[ModelResults]) -> Section:
    rows = []
    for model in models:
        traj = model.stage("trajectory")
        if traj is None:
            rows.append({"model": model.name, "stages": ", ".join(s.name for s in model.stages)})
            continue
        s, phases = traj.summary.get("settings", {}), traj.summary.get("phases", {})
        row: dict[str, Any] = {"model": model.name, "layers": s.get("n_layers"),
                               "numerics": s.get("numerics_mode")}
        memo = pd.DataFrame(traj.summary.get("memorization", []))
        for kind in ("idiom", "fact", "text"):
            for subset in ("all", "hard_to_guess"):
                sel = memo[(memo["kind"] == kind) & (memo["subset"] == subset)] if not memo.empty else memo
                if not sel.empty:
                    rec = sel.iloc[0]
                    row[f"{kind} {subset}"] = f"{int(rec['memorized'])}/{int(rec['n'])} ({rec['fraction']:.1%})"
        row["phase boundary"] = phases.get("boundary_layer")
        row["two phases"] = phases.get("two_phase_pattern_holds")
        row["stages"] = ", ".join(st.name for st in model.stages)
        rows.append(row)
    body = (
        "<p>Memorized: the model's greedy next token equals the first token of the target word "
        "(memorized / probes, fraction). Phase boundary: first layer (0-based) from which at least half "
        "of the memorized idioms keep their prediction at top-1.</p>" + table_html(pd.DataFrame(rows))
    )
    return Section("overview", "Overview: memorization per model", body)


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
    ("promotion_tests", "Are memorized probes promoted earlier? Permutation tests, bootstrap intervals "
                               "and Cliff's delta on promotion layers"),
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
        used.update(p for p in stage.figures if figure_stem(p) == f"neurons_{group.replace(' ', '_')}")
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


def _knockout_controls(stage: Stage) -> str:
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


def _generic_body(stage: Stage, renderer: FigureRenderer) -> tuple[str, set[Path]]:
    s = {k: v for k, v in stage.summary.items() if k not in ("files", "settings")}
    parts = []
    for key, records in record_lists(s):
        frame = pd.DataFrame(records)
        frame = frame[[c for c in frame.columns if not frame[c].map(lambda v: isinstance(v, (list, dict))).any()]]
        parts.append(table_html(frame.head(50), caption=key.replace("_", " ")))
    # Model settings and versions are in the model's settings table: not repeated here.
    scalars = [(k, v) for k, v in flatten(s) if k.split(".")[-1] not in _MODEL_KEYS and ".versions." not in f".{k}"]
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
        return _generic_body(stage, renderer)
    table = models.set_index("model").T.reset_index().rename(columns={"index": "measure"})
    return table_html(table, caption="Measures per model (depth = (layer + 1) / n_layers)"), set()


_STAGE_BODIES = {"trajectory": _trajectory_body, "lenses": _lenses_body, "attribution": _attribution_body,
                 "comparison": _comparison_body}
_MODEL_KEYS = {"model_spec", "model_name", "numerics_mode", "prepend_bos", "dtype", "device", "n_layers",
               "d_model", "d_vocab"}


def _settings_section(model: ModelResults, anchor: str) -> Section:
    rows = []
    keys = ("model_spec", "model_name", "numerics_mode", "prepend_bos", "dtype", "device", "n_layers",
            "d_model", "d_vocab")  # the order of the columns
    for stage in model.stages:
        settings = stage.summary.get("settings")
        if not isinstance(settings, dict):  # e.g. interventions: settings nested per analysis
            nested = [v for v in stage.summary.values() if isinstance(v, dict) and "model_spec" in v]
            settings = nested[0] if nested else (stage.summary if "model_spec" in stage.summary else None)
        if not settings:
            continue
        row: dict[str, Any] = {"stage": stage.name, **{k: settings.get(k) for k in keys if k in settings}}
        for pkg, version in (settings.get("versions") or {}).items():
            row[pkg] = version
        rows.append(row)
    body = (table_html(pd.DataFrame(rows), caption="Settings recorded by each stage (numerics: raw = Hugging Face "
                                                   "numerics, compat = folded norms for attribution)")
            if rows else '<p class="muted">No settings recorded.</p>')
    return Section(anchor, "Settings and versions", body, level=3)


def _stage_section(stage: Stage, anchor: str, renderer: FigureRenderer, *, level: int = 3) -> Section:
    body, used = _STAGE_BODIES.get(stage.name, _generic_body)(stage, renderer)
    body = _knockout_controls(stage) + body
    figs = "".join(renderer.render(p) for p in stage.figures if p not in used)
    if not body and not figs:
        body = '<p class="muted">No summary or figures in this stage.</p>'
    title = STAGE_TITLES.get(stage.name, stage.name.replace("_", " ").capitalize())
    return Section(anchor, title, body + figs, level=level)


def _model_section(model: ModelResults, renderer: FigureRenderer) -> Section:
    anchor = slug("model", model.name)
    children = []
    traj = model.stage("trajectory")
    if traj is not None and traj.summary.get("memorization"):
        children.append(Section(
            slug(anchor, "memorization"), "Memorization: idioms, facts and ordinary text",
            table_html(memorization_frame(traj.summary),
                       caption="Greedy next token == first token of the target word; all probes and the "
                               "hard_to_guess subset"), level=3))
    for stage in model.stages:
        children.append(_stage_section(stage, slug(anchor, stage.name), renderer))
    children.append(_settings_section(model, slug(anchor, "settings")))
    return Section(anchor, f"Model: {model.name}", f'<p class="muted">{esc(model.path)}</p>', children)


# --------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------

def _page(title: str, sections: list[Section], *, n_figures: int, note: str) -> str:
    """The page: `templates/report.html` (style, error and status scripts) filled in."""
    from importlib.resources import files
    from string import Template

    import plotly
    import plotly.offline

    template = Template(files("idiom_lens.study").joinpath("templates/report.html").read_text(encoding="utf-8"))
    return template.substitute(
        title=esc(title), note=esc(note), toc="".join(s.toc() for s in sections),
        content="".join(s.html() for s in sections), plotlyjs=plotly.offline.get_plotlyjs(),
        plotly_version=esc(plotly.__version__), n_figures=n_figures,
    )


def _build_info() -> list[tuple[str, Any]]:
    from importlib import metadata

    info: list[tuple[str, Any]] = [("python", platform.python_version())]
    for pkg in ("idiom_lens", "transformer_lens", "transformers", "torch", "plotly", "pandas"):
        try:
            info.append((pkg, metadata.version(pkg.replace("_", "-"))))
        except metadata.PackageNotFoundError:
            continue
    return info


def build_report(results_dir: str | Path, *, out_path: str | Path | None = None) -> Path:
    """Write one self-contained HTML report of `results_dir` (default `results_dir/report.html`).

    Reads the stages' summaries, tables and saved figures; recomputes nothing. Raises
    `InputError` when the directory holds no results.
    """
    root = Path(results_dir)
    models, root_stages = find_results(root)
    renderer = FigureRenderer()
    sections = [_overview_section(models), _datasets_section(models)]
    sections += [_model_section(m, renderer) for m in models]
    for stage in root_stages:
        sections.append(_stage_section(stage, slug("root", stage.name), renderer, level=2))
    sections.append(Section("build", "How this report was built",
                             "<p>Package versions of the report build (each stage's own versions are in "
                             "its model's settings table):</p>" + kv_table(_build_info()), level=2))
    names = ", ".join(m.name for m in models)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = _page(f"idiom_lens report: {names}", sections, n_figures=renderer.count,
                 note=f"Memorized-sequence recall (Haviv et al., EACL 2023) — results from {root.resolve()}, "
                      f"report built {now}.")
    out = Path(out_path) if out_path is not None else root / "report.html"
    return write_text(out, page)
