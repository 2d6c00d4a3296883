"""Write a figure as interactive HTML and static PNG, atomically.

HTML figures reference one `plotly.min.js` written beside them (offline, no CDN); PNG goes
through kaleido 0.2.1, which bundles its own renderer, so no browser needs installing.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from idiom_lens.io import atomic_write


def save_figure(
    fig: go.Figure, stem: str | Path, *, png: bool = True, width: int = 1000, height: int = 700
) -> list[Path]:
    """Write `stem`.html (and `stem`.png); returns the paths written."""
    stem = Path(stem)
    written = [
        atomic_write(
            stem.with_suffix(".html"),
            lambda p: fig.write_html(p, include_plotlyjs="directory", full_html=True),
        )
    ]
    if png:
        written.append(
            atomic_write(
                stem.with_suffix(".png"),
                lambda p: p.write_bytes(fig.to_image(format="png", width=width, height=height, scale=1)),
            )
        )
    return written
