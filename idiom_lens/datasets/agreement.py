"""Agreement between two binary annotations (our flag rules vs the authors' flags): Cohen's kappa."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Agreement:
    """2x2 counts (first annotation x second) and Cohen's kappa."""

    both_true: int
    first_only: int
    second_only: int
    both_false: int

    @property
    def n(self) -> int:
        return self.both_true + self.first_only + self.second_only + self.both_false

    @property
    def observed(self) -> float:
        """Share of items on which the two agree."""
        return (self.both_true + self.both_false) / self.n if self.n else float("nan")

    @property
    def kappa(self) -> float:
        """Cohen's kappa: (observed - chance) / (1 - chance); nan when undefined (chance = 1)."""
        if not self.n:
            return float("nan")
        p_first = (self.both_true + self.first_only) / self.n
        p_second = (self.both_true + self.second_only) / self.n
        chance = p_first * p_second + (1 - p_first) * (1 - p_second)
        return (self.observed - chance) / (1 - chance) if chance < 1 else float("nan")


def agreement(first: Sequence[bool], second: Sequence[bool]) -> Agreement:
    """Count the 2x2 table of two equally long boolean sequences."""
    if len(first) != len(second):
        raise ValueError(f"lengths differ: {len(first)} vs {len(second)}")
    pairs = list(zip(map(bool, first), map(bool, second)))
    return Agreement(
        both_true=sum(a and b for a, b in pairs),
        first_only=sum(a and not b for a, b in pairs),
        second_only=sum(b and not a for a, b in pairs),
        both_false=sum(not a and not b for a, b in pairs),
    )
