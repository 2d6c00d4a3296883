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
from idiom_lens.io import write_text
from idiom_lens.study.html import (
    FigureRenderer,
    Section,
    esc,
    kv_table,
    slug,
    table_html,
)
from idiom_lens.study.layout import ModelFolder, Stage, StudyFolder, figure_stem
from idiom_lens.study.layout import natural_key as _natural_key
from idiom_lens.study.report_stages import MODEL_KEYS, STAGE_BODIES, generic_body, knockout_controls

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
    "ground_truth": "Ground truth: do the localizers find idioms implanted into a known MLP layer?",
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


def _settings_section(model: ModelResults, anchor: str) -> Section:
    rows = []
    for stage in model.stages:
        settings = stage.summary.get("settings")
        if not isinstance(settings, dict):  # e.g. interventions: settings nested per analysis
            nested = [v for v in stage.summary.values() if isinstance(v, dict) and "model_spec" in v]
            settings = nested[0] if nested else (stage.summary if "model_spec" in stage.summary else None)
        if not settings:
            continue
        row: dict[str, Any] = {"stage": stage.name, **{k: settings.get(k) for k in MODEL_KEYS if k in settings}}
        for pkg, version in (settings.get("versions") or {}).items():
            row[pkg] = version
        rows.append(row)
    body = (table_html(pd.DataFrame(rows), caption="Settings recorded by each stage (numerics: raw = Hugging Face "
                                                   "numerics, compat = folded norms for attribution)")
            if rows else '<p class="muted">No settings recorded.</p>')
    return Section(anchor, "Settings and versions", body, level=3)


def _stage_section(stage: Stage, anchor: str, renderer: FigureRenderer, *, level: int = 3) -> Section:
    body, used = STAGE_BODIES.get(stage.name, generic_body)(stage, renderer)
    body = knockout_controls(stage) + body
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
