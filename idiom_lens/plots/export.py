"""Write a figure as interactive HTML, static PNG and plotly JSON, atomically.

HTML figures reference one `plotly.min.js` written beside them (offline, no CDN); PNG goes
through kaleido 0.2.1, which bundles its own renderer, so no browser needs installing. The JSON
(`stem.fig.json`) lets the report embed the very same figure without recomputing anything.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from idiom_lens.io import atomic_write


def _with(stem: Path, suffix: str) -> Path:
    return stem.parent / f"{stem.name}{suffix}"


def save_figure(
    fig: go.Figure, stem: str | Path, *, png: bool = True, width: int = 1000, height: int = 700
) -> list[Path]:
    """Write `stem`.html, `stem`.fig.json (and `stem`.png); returns the paths written."""
    stem = Path(stem)
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
