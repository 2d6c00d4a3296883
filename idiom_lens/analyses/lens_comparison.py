"""Is the two-phase finding a logit-lens artefact? The same phases read through several lenses.

`compare_lenses` takes one trajectory per lens (the same probes and model; `resid_post`) and runs
`analyse_phases` on each, then lines up per lens: the phase boundary, each set's promotion layers
(mean with a bootstrap 95% interval, median), and the permutation test of "memorized idioms are
promoted earlier" against each comparison set, with the difference's interval. Whatever the
lenses say is the finding: the summary states, per lens, whether "promoted earlier" survives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd

from idiom_lens.analyses.phases import PhaseAnalysis, analyse_phases
from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.analyses.stats import bootstrap_mean_ci
from idiom_lens.analyses.trajectory import TrajectoryResult
from idiom_lens.errors import InputError


@dataclass(frozen=True)
class LensComparison(Saved):
    """Phases per lens (`phases[lens]`), their side-by-side table and the held-out KL per layer.

    Saved as lens_promotion/lens_tests/lens_boundaries(/lens_heldout_kl).parquet and
    lens.result.json; each lens's `PhaseAnalysis` is saved with its own trajectory, so a loaded
    comparison has no `phases`."""

    promotion: pd.DataFrame  # lens, group, n, mean_promotion_layer(_low/_high), median_promotion_layer
    tests: pd.DataFrame  # lens, control, group, versus, mean_diff, mean_diff_low, mean_diff_high, p_value, significant
    boundaries: pd.DataFrame  # lens, boundary_layer, boundary_depth, holds, holds_confidence_matched
    heldout_kl: pd.DataFrame | None = None  # lens, layer, kl, kl_low, kl_high, n_tokens (from the lens cache)
    phases: dict[str, PhaseAnalysis] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        return self.promotion.merge(self.boundaries, on="lens")

    default_name: ClassVar[str] = "lens"
    settings: ClassVar[dict[str, Any]] = {}  # each lens's settings are in its trajectory

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        tables = {"promotion": self.promotion, "tests": self.tests, "boundaries": self.boundaries}
        return tables | ({} if self.heldout_kl is None else {"heldout_kl": self.heldout_kl})

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        return cls(promotion=saved.tables["promotion"], tests=saved.tables["tests"],
                   boundaries=saved.tables["boundaries"], heldout_kl=saved.tables.get("heldout_kl"))

    def summary_text(self) -> str:
        lines = []
        for row in self.boundaries.itertuples(index=False):
            # The verdict is `phases.two_phase_verdict`'s: the confidence controls, Holm-adjusted.
            tests = self.tests[(self.tests["lens"] == row.lens) & (self.tests["control"] != "all probes")]
            parts = [f"{t.versus}, {t.control}: {t.mean_diff:+.2f} layers [{t.mean_diff_low:+.2f}, "
                     f"{t.mean_diff_high:+.2f}], Holm-adjusted p = {getattr(t, 'p_adjusted', t.p_value):.3g}"
                     for t in tests.itertuples(index=False)]
            verdict = "survives" if row.holds else "does not survive"
            lines.append(f"{row.lens} lens: boundary at layer {row.boundary_layer}; 'memorized idioms are promoted "
                         f"earlier, at equal confidence' {verdict} ({'; '.join(parts) or 'no comparison set'})")
        return "\n".join(lines)


def compare_lenses(
    trajectories: Mapping[str, TrajectoryResult],
    *,
    heldout_kl: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LensComparison:
    """Phases under each lens of `trajectories` ({lens kind: result}), side by side.

    Raises `InputError` when there is no trajectory, or they differ in probes or layers."""
    if not trajectories:
        raise InputError("no trajectories to compare: give one per lens")
    first = next(iter(trajectories.values()))
    ids = [r.probe_id for r in first.memorization.records]
    for name, result in trajectories.items():
        if [r.probe_id for r in result.memorization.records] != ids or result.n_layers != first.n_layers:
            raise InputError(f"the {name} trajectory has other probes or layers than the "
                             f"{next(iter(trajectories))} one")
    phases = {name: analyse_phases(result, n_boot=n_boot, seed=seed) for name, result in trajectories.items()}
    promotion, tests, boundaries = [], [], []
    for name, analysis in phases.items():
        for group, sub in analysis.probes.groupby("group", sort=False):
            layers = sub["promotion_layer"].to_numpy(dtype=np.float64)[:, None]
            mean, low, high = bootstrap_mean_ci(layers, n_boot=n_boot, seed=seed)
            promotion.append({"lens": name, "group": group, "n": len(sub), "mean_promotion_layer": float(mean[0]),
                              "mean_promotion_layer_low": float(low[0]), "mean_promotion_layer_high": float(high[0]),
                              "median_promotion_layer": float(np.median(layers))})
        if analysis.promotion_tests is not None and len(analysis.promotion_tests):
            keep = ["control", "test", "group", "versus", "n_a", "n_b", "n_a_total", "n_b_total", "n_pairs",
                    "mean_diff", "mean_diff_low", "mean_diff_high", "p_value", "p_adjusted", "correction", "family",
                    "significant", "earlier"]
            tests.append(analysis.promotion_tests[[c for c in keep if c in analysis.promotion_tests]]
                         .assign(lens=name))
        boundaries.append({"lens": name, "boundary_layer": analysis.boundary_layer,
                           "boundary_depth": analysis.boundary_depth, "holds": analysis.holds,
                           "holds_confidence_matched": analysis.holds_confidence_matched})
    test_frame = pd.concat(tests, ignore_index=True) if tests else pd.DataFrame(
        columns=["lens", "control", "group", "versus", "mean_diff", "mean_diff_low", "mean_diff_high", "p_value",
                 "significant"])
    return LensComparison(phases=phases, promotion=pd.DataFrame(promotion), tests=test_frame,
                          boundaries=pd.DataFrame(boundaries).astype(BOUNDARY_TYPES), heldout_kl=heldout_kl)


# Missing values allowed: no boundary (no memorized idiom stays top-1), no matched comparison.
BOUNDARY_TYPES = {"boundary_layer": "Int64", "boundary_depth": "float64", "holds": "bool",
                  "holds_confidence_matched": "boolean"}
