"""Models side by side on a normalized depth axis: depth of layer l (0-based) of an L-layer model
is (l + 1) / L, so the last layer is 1.0 for every model. Built from finished studies by
`idiom_lens.study.compare.compare_models`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

import pandas as pd

from idiom_lens.analyses.saved import Saved, SavedTables


@dataclass(frozen=True)
class ModelComparison(Saved):
    """One row per model (`table`) and per-layer curves on normalized depth (`curves`). Saved as
    comparison.parquet, comparison_curves.parquet and comparison.result.json."""

    table: pd.DataFrame
    curves: pd.DataFrame  # model, group, layer, depth, metric, mean, mean_low, mean_high, n

    def to_dataframe(self) -> pd.DataFrame:
        return self.table

    default_name: ClassVar[str] = "comparison"
    settings: ClassVar[dict[str, Any]] = {}  # each model's settings are in its own study

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.table, "curves": self.curves}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        return cls(table=saved.tables[""], curves=saved.tables["curves"])
