"""Hand-built memorization results, for tests of what reads them (tests/ is on the path:
tests/conftest.py)."""

from __future__ import annotations

from idiom_lens.analyses.memorization import MemorizationRecord, MemorizationResult
from idiom_lens.datasets.probes import Probe


def memorization_of(probes: list[Probe], memorized: dict[str, bool]) -> MemorizationResult:
    """A result where probe `p` is memorized as `memorized[p.id]` says (every other field fixed)."""
    records = tuple(
        MemorizationRecord(
            probe_id=p.id, kind=p.kind, group="", hard_to_guess=p.hard_to_guess, prompt=p.prompt, target=p.target,
            target_id=1, target_token=" t", n_target_tokens=1, pred_id=1, pred_token=" t",
            memorized=memorized[p.id], pred_prob=0.5, target_rank=0, target_prob=0.5, full_target_match=True,
        )
        for p in probes
    )
    return MemorizationResult(records=records, settings={})
