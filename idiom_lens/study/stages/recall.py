"""The recall stage: where recall lives, every method per layer, rewritten from the finished stages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from idiom_lens.io import write_json

if TYPE_CHECKING:
    pass


def write_recall(folder: Any, *, png: bool = True) -> Any:
    """The "where recall lives" table, peaks and figure of a model's finished stages (a
    `layout.ModelFolder`), rewritten from them every time (cheap: no forward pass)."""
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.recall import where_recall_lives
    from idiom_lens.study.layout import RECALL

    profile = folder.recall_profile()
    out = folder.stage_path(RECALL)
    profile.save(out)
    peaks = profile.peaks()
    save_figure(where_recall_lives(profile, title=f"Where recall lives, {folder.name}"), out / "where_recall_lives",
                png=png, width=1100, height=1160)
    write_json(out / "summary.json", {"peak_per_measure_and_set": peaks.to_dict(orient="records"),
                                      "settings": profile.settings})
    return profile
