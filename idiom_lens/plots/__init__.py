"""Plotly figures built from result objects (never recomputing an analysis), and their export."""

from idiom_lens.plots.export import save_figure

__all__ = ["save_figure"]
