"""The HTML pieces of the report: escaping, tables, key-value tables, figures and sections."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from idiom_lens.study.layout import figure_stem


def esc(value: Any) -> str:
    """`value` as text safe inside HTML."""
    return html.escape(str(value), quote=True)


def slug(*parts: str) -> str:
    """An anchor name from `parts`: lower case, runs of other characters as one dash."""
    return "-".join(re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-") for p in parts if p)


def fmt(value: Any) -> str:
    """A number as the report shows it: 3 decimals, or 3 significant digits when tiny."""
    if isinstance(value, float):
        return "–" if value != value else (f"{value:.3g}" if abs(value) < 1e-3 and value else f"{value:.3f}")
    return str(value)


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = "–" if value is None else fmt(value)
    return f'<td class="num">{esc(text)}</td>' if numeric else f"<td>{esc(text)}</td>"


def table_html(frame: pd.DataFrame, *, caption: str = "") -> str:
    """A styled HTML table (escaped) of `frame`: numbers right-aligned, floats to 3 places."""
    if frame.empty:
        return '<p class="muted">(empty table)</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    rows = "".join(
        "<tr>" + "".join(_cell(v.item() if hasattr(v, "item") else v) for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    cap = f'<p class="caption">{esc(caption)}</p>' if caption else ""
    return (f'<div class="table-wrap">{cap}<table class="data"><thead><tr>{head}</tr></thead>'
            f"<tbody>{rows}</tbody></table></div>")


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(fmt(v))}</td></tr>" for k, v in pairs)
    return f'<div class="table-wrap"><table class="data kv">{rows}</table></div>' if rows else ""


def flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += flatten(value, f"{name}.")
        elif isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
            out.append((name, ", ".join(map(str, value)) if len(value) <= 30 else f"{len(value)} values"))
        elif not isinstance(value, list):
            out.append((name, value))
    return out


def record_lists(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, list[dict[str, Any]]]]:
    """Lists of records (list of dicts) anywhere in `obj`, with their dotted key."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append((name, value))
        elif isinstance(value, dict):
            out += record_lists(value, f"{name}.")
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
            return f'<p class="warn">figure {esc(path.name)} could not be read: {esc(err)}</p>'
        self.count += 1
        title = re.split(r"<br\s*/?>", fig.layout.title.text or "")[0]
        title = html.unescape(re.sub(r"<[^>]*>", "", title)).strip() or figure_stem(path).replace("_", " ")
        height = fig.layout.height or 600
        # The page column sets the width: figures saved for a fixed width follow the page instead.
        fig.update_layout(width=None, autosize=True)
        div = pio.to_html(
            fig, full_html=False, include_plotlyjs=False, div_id=f"fig-{self.count}",
            default_width="100%", default_height=f"{int(height)}px", config={"responsive": True},
        )
        return (
            f'<figure class="plot"><figcaption>{esc(title[:120])} '
            f'<span class="muted">({esc(path.name)})</span></figcaption>{div}</figure>'
        )


@dataclass
class Section:
    """A part of the page with its title, body and subsections, and its line in the contents."""

    anchor: str
    title: str
    body: str
    children: list[Section] = field(default_factory=list)
    level: int = 2

    def html(self) -> str:
        inner = "".join(c.html() for c in self.children)
        h = f"h{min(self.level, 4)}"
        return f'<section id="{self.anchor}"><{h}>{esc(self.title)}</{h}>{self.body}{inner}</section>'

    def toc(self) -> str:
        sub = "".join(c.toc() for c in self.children)
        sub = f"<ul>{sub}</ul>" if sub else ""
        return f'<li><a href="#{self.anchor}">{esc(self.title)}</a>{sub}</li>'
