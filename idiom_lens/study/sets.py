"""Comparison sets for the causal analyses: a seeded sample of each set, plus the non-memorized
idioms matched to the memorized sample on final confidence.

Memorized predictions are more confident than the others, and a confident prediction may be harder
to destroy or easier to restore for that reason alone. So beside a random sample of non-memorized
idioms the causal comparisons get a *confidence-matched* one: for every sampled memorized idiom,
the non-memorized idiom whose prediction has the nearest final probability (greedy 1:1 nearest
neighbour without replacement within a caliper, `stats.match_nearest`, the rule the phase tests
use). Sets may share probes (a random non-memorized idiom may also be a matched one): each probe
is computed once and counted in every set it belongs to.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from idiom_lens.analyses.memorization import MemorizationResult
from idiom_lens.analyses.stats import match_nearest
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.groups import MATCHED_NON_MEMORIZED_IDIOMS, MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS, ORDINARY_TEXT

MATCHED_NON_MEMORIZED = MATCHED_NON_MEMORIZED_IDIOMS
SAMPLED_SETS: tuple[str, ...] = (MEMORIZED_IDIOMS, NON_MEMORIZED_IDIOMS, ORDINARY_TEXT)
MATCHING_RULE = ("for each sampled memorized idiom, the non-memorized idiom (of all) with the nearest final "
                 "probability of its prediction, greedy 1:1 without replacement within the caliper, "
                 "memorized idioms in seeded random order")


@dataclass(frozen=True)
class ComparisonSets:
    """Set name -> probe ids (in input order), the union of their probes, and how the matching went."""

    sets: dict[str, tuple[str, ...]]
    probes: tuple[Probe, ...]
    matching: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (set, probe_id)."""
        return pd.DataFrame([{"set": name, "probe_id": pid} for name, ids in self.sets.items() for pid in ids],
                            columns=["set", "probe_id"])

    def sizes(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.sets.items()}


def comparison_sets(
    memorization: MemorizationResult,
    probes: Sequence[Probe],
    *,
    per_set: int,
    seed: int = 0,
    sets: Sequence[str] = SAMPLED_SETS,
    matched: bool = True,
    caliper: float = 0.05,
) -> ComparisonSets:
    """A seeded sample of `per_set` probes of each set in `sets` (fewer where a set is smaller),
    and with `matched` the memorized sample's confidence-matched non-memorized idioms
    (`MATCHED_NON_MEMORIZED`; `MATCHING_RULE`, `caliper` on the final probability). Raises
    `InputError` for an unknown set or a sample size below 1."""
    if per_set < 1:
        raise InputError(f"per_set must be >= 1, got {per_set}")
    records = {r.probe_id: r for r in memorization.records}
    by_id = {p.id: p for p in probes if p.id in records}
    members: dict[str, list[str]] = {}
    for r in memorization.records:
        if r.probe_id in by_id:
            members.setdefault(r.group, []).append(r.probe_id)
    unknown = [s for s in sets if s not in members]
    if unknown:
        raise InputError(f"sets {unknown} have no probes here; present: {sorted(members)}")
    chosen: dict[str, list[str]] = {}
    for name in sets:
        ids = members[name]
        picked = set(random.Random(f"{seed}-{name}").sample(ids, min(per_set, len(ids))))
        chosen[name] = [pid for pid in ids if pid in picked]
    matching: dict[str, Any] = {}
    if matched:
        if MEMORIZED_IDIOMS not in chosen or NON_MEMORIZED_IDIOMS not in members:
            raise InputError("matched sets need memorized idioms in `sets` and non-memorized idioms in the probes")
        treated = chosen[MEMORIZED_IDIOMS]
        pool = members[NON_MEMORIZED_IDIOMS]
        match = match_nearest(np.array([records[p].pred_prob for p in treated]),
                              np.array([records[p].pred_prob for p in pool]), caliper=caliper, seed=seed)
        picked = {pool[j] for j in match if j >= 0}
        chosen[MATCHED_NON_MEMORIZED] = [pid for pid in pool if pid in picked]
        matching = {"rule": MATCHING_RULE, "caliper": caliper, "n_memorized": len(treated),
                    "n_matched": int((match >= 0).sum()), "n_candidates": len(pool),
                    "pairs": {treated[i]: pool[j] for i, j in enumerate(match) if j >= 0}}
    union = {pid for ids in chosen.values() for pid in ids}
    ordered = tuple(by_id[r.probe_id] for r in memorization.records if r.probe_id in union)
    return ComparisonSets({k: tuple(v) for k, v in chosen.items()}, ordered, matching)
