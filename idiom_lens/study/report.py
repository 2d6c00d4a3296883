"""One self-contained HTML page from a results directory.

The report never recomputes an analysis: it reads what the stages wrote (`summary.json`, a few
parquet tables and the `*.fig.json` figures) and lays them out, one section per model and per
stage dir (known stages first, unknown ones appended). Plotly's JavaScript is embedded once,
inline, so the page opens offline. A small inline script records, on `<body>`, how many plots
rendered (`data-plots-rendered`) and any JavaScript error (`data-errors`), so a headless
browser can check the page.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from idiom_lens.errors import InputError
from idiom_lens.io import write_text

# Stage dirs in the order the report shows them; any other stage dir follows, by name.
STAGE_ORDER = ("trajectory", "attribution", "interventions", "knockouts", "skipping", "patching")
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
    "attribution": "Attribution per layer and top neurons",
    "interventions": "Interventions: neuron knockouts and layer skipping",
    "patching": "Activation patching: where the idiom is read in",
    "comparison": "Models compared",
}
_SKIP_DIRS = {"parts"}
_KIND_ORDER = {"idiom": 0, "fact": 1, "text": 2}


# --------------------------------------------------------------------------------------
# Finding results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A stage dir: its summary (empty if none) and its figures, in display order."""

    name: str
    path: Path
    summary: dict[str, Any]
    figures: tuple[Path, ...]


@dataclass(frozen=True)
class ModelResults:
    name: str
    path: Path
    stages: tuple[Stage, ...] = field(default_factory=tuple)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def _figure_files(stage_dir: Path) -> list[Path]:
    return [
        p for p in stage_dir.rglob("*.fig.json")
        if not any(part in _SKIP_DIRS or part.startswith(".") for part in p.relative_to(stage_dir).parts[:-1])
    ]


def _holds_results(path: Path) -> bool:
    """A `summary.json` or a figure directly in `path`."""
    return (path / "summary.json").is_file() or any(path.glob("*.fig.json"))


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _SKIP_DIRS)


def _is_stage_dir(path: Path) -> bool:
    """Results directly in `path`, or in its subdirs (a stage may split into parts)."""
    return _holds_results(path) or any(_holds_results(c) for c in _subdirs(path))


def _is_model_dir(path: Path) -> bool:
    """Stage dirs under `path`, which is itself no stage (and not named like one)."""
    return path.name not in STAGE_ORDER and not _holds_results(path) and any(_is_stage_dir(c) for c in _subdirs(path))


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _stem(path: Path) -> str:
    return path.name[: -len(".fig.json")]


def _figure_sort_key(stage: str, stage_dir: Path, path: Path) -> tuple[int, int, list[Any]]:
    rel = str(path.relative_to(stage_dir).with_name(_stem(path)))
    order = FIGURE_ORDER.get(stage, ())
    exact = [i for i, name in enumerate(order) if _stem(path) == name]
    prefix = [i for i, name in enumerate(order) if _stem(path).startswith(name)]
    rank = exact[0] if exact else (prefix[0] if prefix else len(order))
    return (rank, rel.count("/"), _natural_key(rel))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {str(path)!r}: {err}") from err
    return data if isinstance(data, dict) else {"value": data}


def load_stage(path: Path) -> Stage:
    summary_path = path / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    figures = sorted(_figure_files(path), key=lambda p: _figure_sort_key(path.name, path, p))
    return Stage(name=path.name, path=path, summary=summary, figures=tuple(figures))


def _stage_sort_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def _stages_of(path: Path) -> list[Stage]:
    dirs = sorted((p for p in _subdirs(path) if _is_stage_dir(p)), key=lambda p: _stage_sort_key(p.name))
    return [load_stage(p) for p in dirs]


def find_results(results_dir: str | Path) -> tuple[list[ModelResults], list[Stage]]:
    """Models under `results_dir` (or `results_dir` itself as one model) and root-level stages.

    A model dir holds stage dirs (a stage dir holds `summary.json` or `*.fig.json` figures).
    Root-level stage dirs such as `comparison/` are returned separately.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise InputError(f"results directory {str(root)!r} does not exist")
    children = _subdirs(root)
    models = [ModelResults(c.name, c, tuple(_stages_of(c))) for c in children if _is_model_dir(c)]
    if models:
        model_paths = {m.path for m in models}
        return models, [load_stage(c) for c in children if c not in model_paths and _is_stage_dir(c)]
    own = _stages_of(root)
    if own:
        return [ModelResults(root.resolve().name, root, tuple(own))], []
    raise InputError(
        f"{str(root)!r} holds no results (expected MODEL/STAGE/summary.json or figures, "
        "as written by `idiom-lens run --out DIR`)"
    )


# --------------------------------------------------------------------------------------
# HTML pieces
# --------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(*parts: str) -> str:
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if value != value else (f"{value:.3g}" if abs(value) < 1e-3 and value else f"{value:.3f}")
    return str(value)


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = "–" if value is None else _fmt(value)
    return f'<td class="num">{_esc(text)}</td>' if numeric else f"<td>{_esc(text)}</td>"


def table_html(frame: pd.DataFrame, *, caption: str = "") -> str:
    """A styled HTML table (escaped) of `frame`: numbers right-aligned, floats to 3 places."""
    if frame.empty:
        return '<p class="muted">(empty table)</p>'
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(_cell(v.item() if hasattr(v, "item") else v) for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    cap = f'<p class="caption">{_esc(caption)}</p>' if caption else ""
    return (f'<div class="table-wrap">{cap}<table class="data"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def _kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_fmt(v))}</td></tr>" for k, v in pairs)
    return f'<div class="table-wrap"><table class="data kv">{rows}</table></div>' if rows else ""


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, f"{name}.")
        elif isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
            out.append((name, ", ".join(map(str, value)) if len(value) <= 30 else f"{len(value)} values"))
        elif not isinstance(value, list):
            out.append((name, value))
    return out


def _record_lists(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, list[dict[str, Any]]]]:
    """Lists of records (list of dicts) anywhere in `obj`, with their dotted key."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append((name, value))
        elif isinstance(value, dict):
            out += _record_lists(value, f"{name}.")
    return out


class FigureRenderer:
    """Turns `*.fig.json` files into `<div>`s (plotly.js is embedded once, elsewhere)."""

    def __init__(self) -> None:
        self.count = 0

    def render(self, path: Path) -> str:
        import plotly.io as pio

        try:
            fig = pio.read_json(path)
        except (OSError, ValueError) as err:
            return f'<p class="warn">figure {_esc(path.name)} could not be read: {_esc(err)}</p>'
        self.count += 1
        title = re.split(r"<br\s*/?>", fig.layout.title.text or "")[0]
        title = html.unescape(re.sub(r"<[^>]*>", "", title)).strip() or _stem(path).replace("_", " ")
        height = fig.layout.height or 600
        # The page column sets the width: figures saved for a fixed width follow the page instead.
        fig.update_layout(width=None, autosize=True)
        div = pio.to_html(
            fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{self.count}",
            default_width="100%", default_height=f"{int(height)}px", config={"responsive": True},
        )
        return (
            f'<figure class="plot"><figcaption>{_esc(title[:120])} '
            f'<span class="muted">({_esc(path.name)})</span></figcaption>{div}</figure>'
        )


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


@dataclass
class _Section:
    anchor: str
    title: str
    body: str
    children: list["_Section"] = field(default_factory=list)
    level: int = 2

    def html(self) -> str:
        inner = "".join(c.html() for c in self.children)
        h = f"h{min(self.level, 4)}"
        return f'<section id="{self.anchor}"><{h}>{_esc(self.title)}</{h}>{self.body}{inner}</section>'

    def toc(self) -> str:
        sub = "".join(c.toc() for c in self.children)
        sub = f"<ul>{sub}</ul>" if sub else ""
        return f'<li><a href="#{self.anchor}">{_esc(self.title)}</a>{sub}</li>'


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


def _datasets_section(models: list[ModelResults]) -> _Section:
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
    return _Section("datasets", "Datasets and their flags", body)


def _overview_section(models: list[ModelResults]) -> _Section:
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
    return _Section("overview", "Overview: memorization per model", body)


def _trajectory_text(stage: Stage) -> str:
    phases = stage.summary.get("phases", {})
    parts = []
    if phases:
        boundary = phases.get("boundary_layer")
        parts.append(
            f'<div class="callout"><p><strong>Phase boundary:</strong> layer {_esc(boundary)} '
            f'of {_esc(phases.get("n_layers", "?"))} (0-based). '
            f'<span class="muted">{_esc(phases.get("boundary_rule", ""))}</span></p>'
            f'<p>{_esc(phases.get("summary", ""))}</p></div>'
        )
        groups = pd.DataFrame(phases.get("groups", []))
        if not groups.empty:
            parts.append(table_html(groups, caption="Promotion layer and confidence gain per set "
                                                   "(facts beside idioms and ordinary text)"))
    return "".join(parts)


_GROUP_ORDER = ("memorized idioms", "memorized facts", "non-memorized idioms", "non-memorized facts", "ordinary text")


def _group_key(group: str) -> tuple[int, str]:
    return (_GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER), group)


def _attribution_body(stage: Stage, renderer: "FigureRenderer") -> tuple[str, set[Path]]:
    """Component shares, the per-layer figures, then the top neurons per set (as tables)."""
    s = stage.summary
    parts, used = [], set()
    for measure, records in s.get("component_shares", {}).items():
        frame = pd.DataFrame(records)
        for name in ("embed_share", "attn_share", "mlp_share", "early_mlp_share"):
            if {name, f"{name}_lo", f"{name}_hi"} <= set(frame.columns):  # older folders have no interval
                frame[name] = [f"{v:.2f} [{lo:.2f}, {hi:.2f}]" for v, lo, hi in
                               zip(frame[name], frame[f"{name}_lo"], frame[f"{name}_hi"])]
        keep = [c for c in ("group", "n", "mean_total", "embed_share", "attn_share", "mlp_share",
                            "early_mlp_share", "early_layers", "half_built_at_layer") if c in frame.columns]
        parts.append(table_html(frame[keep] if keep else frame,
                                caption=f"Share of the {measure} built by each component type, per set"))
    for path in stage.figures:
        if _stem(path).startswith("layers_"):
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
        used.update(p for p in stage.figures if _stem(p) == f"neurons_{group.replace(' ', '_')}")
    if tables:
        parts.append("<h4>Top neurons per set</h4><p class=\"muted\">Mean contribution to the predicted token's "
                     "logit over the set (layer, neuron), and the tokens each neuron's value vector promotes.</p>"
                     f'<div class="grid2">{"".join(tables)}</div>')
    if s.get("invariant_max_abs_error"):
        parts.append('<p class="caption">Checks (max absolute error of the decomposition):</p>'
                     + _kv_table(_flatten(s["invariant_max_abs_error"])))
    return "".join(parts), used


def _trajectory_body(stage: Stage, renderer: "FigureRenderer") -> tuple[str, set[Path]]:
    return _trajectory_text(stage), set()


def _knockout_controls(stage: Stage) -> str:
    parts = []
    for path in sorted(stage.path.rglob("knockouts_summary.parquet")):
        frame = pd.read_parquet(path)
        need = {"group", "mode", "k", "control", "changed"}
        if not need <= set(frame.columns):
            continue
        table = (frame.groupby(["mode", "k", "group", "control"], sort=True)["changed"]
                 .agg(["max", "mean"]).reset_index()
                 .rename(columns={"max": "max share changed", "mean": "mean share changed"}))
        parts.append(table_html(table, caption=f"Knockouts and their control ({path.relative_to(stage.path)}): "
                                               "share of predictions changed, over all layer windows"))
    for path in sorted(stage.path.rglob("patching_pairs.parquet")):
        pairs = pd.read_parquet(path)
        if not {"variant", "group", "valid"} <= set(pairs.columns):
            continue
        agg = {"pairs": ("valid", "size"), "valid pairs": ("valid", "sum")}
        for col in ("clean_logit", "corrupted_logit"):
            if col in pairs.columns:
                agg[f"mean {col.replace('_', ' ')}"] = (col, "mean")
        table = pairs.groupby(["variant", "group"]).agg(**agg).reset_index()
        parts.append(table_html(table, caption=f"Patching pairs ({path.relative_to(stage.path)}): the corrupted "
                                               "prompt is the control whose target logit patching restores"))
    return "".join(parts)


def _generic_body(stage: Stage, renderer: "FigureRenderer") -> tuple[str, set[Path]]:
    s = {k: v for k, v in stage.summary.items() if k not in ("files", "settings")}
    parts = []
    for key, records in _record_lists(s):
        frame = pd.DataFrame(records)
        frame = frame[[c for c in frame.columns if not frame[c].map(lambda v: isinstance(v, (list, dict))).any()]]
        parts.append(table_html(frame.head(50), caption=key.replace("_", " ")))
    # Model settings and versions are in the model's settings table: not repeated here.
    scalars = [(k, v) for k, v in _flatten(s) if k.split(".")[-1] not in _MODEL_KEYS and ".versions." not in f".{k}"]
    if scalars:
        parts.append(f"<details><summary>Settings of this stage ({len(scalars)} values)</summary>"
                     f"{_kv_table(scalars)}</details>")
    return "".join(parts), set()


def _comparison_body(stage: Stage, renderer: "FigureRenderer") -> tuple[str, set[Path]]:
    """The models side by side: one column per model, one row per measure."""
    models = pd.DataFrame(stage.summary.get("models", []))
    if models.empty or "model" not in models.columns:
        return _generic_body(stage, renderer)
    table = models.set_index("model").T.reset_index().rename(columns={"index": "measure"})
    return table_html(table, caption="Measures per model (depth = (layer + 1) / n_layers)"), set()


_STAGE_BODIES = {"trajectory": _trajectory_body, "attribution": _attribution_body, "comparison": _comparison_body}
_MODEL_KEYS = {"model_spec", "model_name", "numerics_mode", "prepend_bos", "dtype", "device", "n_layers",
               "d_model", "d_vocab"}


def _settings_section(model: ModelResults, anchor: str) -> _Section:
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
    return _Section(anchor, "Settings and versions", body, level=3)


def _stage_section(stage: Stage, anchor: str, renderer: FigureRenderer, *, level: int = 3) -> _Section:
    body, used = _STAGE_BODIES.get(stage.name, _generic_body)(stage, renderer)
    body = _knockout_controls(stage) + body
    figs = "".join(renderer.render(p) for p in stage.figures if p not in used)
    if not body and not figs:
        body = '<p class="muted">No summary or figures in this stage.</p>'
    title = STAGE_TITLES.get(stage.name, stage.name.replace("_", " ").capitalize())
    return _Section(anchor, title, body + figs, level=level)


def _model_section(model: ModelResults, renderer: FigureRenderer) -> _Section:
    anchor = _slug("model", model.name)
    children = []
    traj = model.stage("trajectory")
    if traj is not None and traj.summary.get("memorization"):
        children.append(_Section(
            _slug(anchor, "memorization"), "Memorization: idioms, facts and ordinary text",
            table_html(memorization_frame(traj.summary),
                       caption="Greedy next token == first token of the target word; all probes and the "
                               "hard_to_guess subset"), level=3))
    for stage in model.stages:
        children.append(_stage_section(stage, _slug(anchor, stage.name), renderer))
    children.append(_settings_section(model, _slug(anchor, "settings")))
    return _Section(anchor, f"Model: {model.name}", f'<p class="muted">{_esc(model.path)}</p>', children)


# --------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1f2328; --muted: #636c76; --line: #d0d7de; --bg-alt: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
  font: 15px/1.55 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 80px; }
h1 { font-size: 28px; margin: 8px 0 4px; }
h2 { font-size: 22px; margin: 40px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 18px; margin: 28px 0 10px; }
h4 { font-size: 16px; margin: 20px 0 8px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code { background: var(--bg-alt); padding: 1px 4px; border-radius: 4px; font-size: 90%; }
.muted { color: var(--muted); font-size: 90%; }
.warn { color: #9a6700; }
nav.toc { background: var(--bg-alt); border: 1px solid var(--line); border-radius: 8px; padding: 10px 20px;
  margin: 16px 0 24px; }
nav.toc ul { margin: 4px 0; padding-left: 20px; } nav.toc > ul { padding-left: 4px; list-style: none; }
.callout { border-left: 4px solid var(--accent); background: #f0f6ff; padding: 8px 16px; margin: 12px 0;
  border-radius: 0 6px 6px 0; }
.table-wrap { overflow-x: auto; margin: 10px 0 18px; }
.caption { margin: 0 0 4px; color: var(--muted); font-size: 90%; }
table.data { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; }
table.data th, table.data td { border: 1px solid var(--line); padding: 4px 10px; text-align: left;
  white-space: nowrap; }
table.data td.num { text-align: right; }
table.data th { background: var(--bg-alt); text-align: center; }
table.kv th { text-align: left; }
table.data tbody tr:nth-child(even) { background: #fbfcfd; }
table.kv td { text-align: left; white-space: normal; }
figure.plot { margin: 18px 0 28px; border: 1px solid var(--line); border-radius: 8px; padding: 8px; }
figure.plot figcaption { font-weight: 600; margin: 0 4px 6px; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(480px, 1fr)); column-gap: 20px; }
.grid2 .table-wrap { margin: 6px 0 10px; }
details { margin: 8px 0 16px; } details summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 48px; color: var(--muted); font-size: 85%; }
"""

# Installed before any plot script: collect JavaScript errors (and console.error calls).
_ERRORS_JS = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push(String(e.message || e.type) + ' @ ' + (e.filename || '') + ':' + (e.lineno || ''));
});
window.addEventListener('unhandledrejection', function (e) { window.__reportErrors.push('rejection: ' + e.reason); });
(function () { var orig = console.error; console.error = function () {
  window.__reportErrors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
  return orig.apply(console, arguments); }; })();
"""

# After every plot script: record how many plots drew an SVG and the errors, on <body>.
_STATUS_JS = """
(function () {
  function record() {
    var plots = document.querySelectorAll('.js-plotly-plot');
    var drawn = 0;
    plots.forEach(function (p) { if (p.querySelector('.main-svg')) { drawn += 1; } });
    document.body.dataset.plotsExpected = String(%d);
    document.body.dataset.plotsRendered = String(drawn);
    document.body.dataset.errors = JSON.stringify(window.__reportErrors);
  }
  record();
  window.addEventListener('load', function () { record(); setTimeout(record, 500); });
})();
"""


def _page(title: str, sections: list[_Section], *, n_figures: int, note: str) -> str:
    import plotly
    import plotly.offline

    toc = "".join(s.toc() for s in sections)
    content = "".join(s.html() for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n"
        f"<script>{_ERRORS_JS}</script>\n"
        f"<script type=\"text/javascript\">{plotly.offline.get_plotlyjs()}</script>\n"
        "</head>\n<body>\n<main>\n"
        f"<h1>{_esc(title)}</h1>\n<p class=\"muted\">{_esc(note)}</p>\n"
        f"<nav class=\"toc\"><strong>Contents</strong><ul>{toc}</ul></nav>\n{content}\n"
        f"<footer>Built by idiom_lens.study.report with plotly {_esc(plotly.__version__)} "
        "(plotly.js embedded; the page needs no network).</footer>\n"
        f"</main>\n<script>{_STATUS_JS % n_figures}</script>\n</body>\n</html>\n"
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
        sections.append(_stage_section(stage, _slug("root", stage.name), renderer, level=2))
    sections.append(_Section("build", "How this report was built",
                             "<p>Package versions of the report build (each stage's own versions are in "
                             "its model's settings table):</p>" + _kv_table(_build_info()), level=2))
    names = ", ".join(m.name for m in models)
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    page = _page(f"idiom_lens report: {names}", sections, n_figures=renderer.count,
                 note=f"Memorized-sequence recall (Haviv et al., EACL 2023) — results from {root.resolve()}, "
                      f"report built {now}.")
    out = Path(out_path) if out_path is not None else root / "report.html"
    return write_text(out, page)
