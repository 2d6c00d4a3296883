"""Write a figure as interactive HTML, static PNG and plotly JSON, atomically.

HTML figures reference one `plotly.min.js` written beside them (offline, no CDN); PNG goes
through kaleido 0.2.1, which bundles its own renderer, so no browser needs installing. The JSON
(`stem.fig.json`) lets the report embed the very same figure without recomputing anything.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from idiom_lens.io import atomic_write, write_text


def _ensure_plotlyjs(folder: Path) -> None:
    """Write `plotly.min.js` beside the figures atomically (plotly itself writes it in place and
    never rewrites it, so a crash could leave a truncated copy for good)."""
    from plotly.offline import get_plotlyjs

    path = folder / "plotly.min.js"
    js = get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(js.encode("utf-8")):
        write_text(path, js)


def _with(stem: Path, suffix: str) -> Path:
    return stem.parent / f"{stem.name}{suffix}"


def save_figure(
    fig: go.Figure, stem: str | Path, *, png: bool = True, width: int | None = None, height: int | None = None
) -> list[Path]:
    """Write `stem`.html, `stem`.fig.json (and `stem`.png); returns the paths written. The PNG's
    size: `width` x `height` where given, else the figure's own layout size (a figure of many
    panels sets its height), else 1000 x 700."""
    stem = Path(stem)
    width = width or fig.layout.width or 1000
    height = height or fig.layout.height or 700
    _ensure_plotlyjs(stem.parent)
    written = [
        atomic_write(
            _with(stem, ".html"),
            lambda p: fig.write_html(p, include_plotlyjs="directory", full_html=True),
        ),
        atomic_write(_with(stem, ".fig.json"), lambda p: p.write_text(fig.to_json(), encoding="utf-8")),
    ]
    if png:
        written.append(
            atomic_write(
                _with(stem, ".png"),
                lambda p: p.write_bytes(fig.to_image(format="png", width=width, height=height, scale=1)),
            )
        )
    return written
