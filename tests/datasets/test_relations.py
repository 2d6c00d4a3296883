"""Fact relations; Cohen's kappa."""

from __future__ import annotations

import math

import pytest

from idiom_lens.datasets import FACT_RELATIONS, Probe, fact_relation, load_probes
from idiom_lens.datasets.agreement import agreement


def _fact(id_: str, source: str = "", hard: bool | None = True) -> Probe:
    return Probe(id=id_, prompt="p q", target="t", kind="fact", source=source, hard_to_guess=hard)


def test_fact_relation_from_source_then_id() -> None:
    assert fact_relation(_fact("x", "capital countryinfo==1.0.1")) == "capital"
    assert fact_relation(_fact("fact-element-iron")) == "element"
    assert fact_relation(_fact("fact-city_country-osaka", "mine")) == "city_country"
    assert fact_relation(_fact("my-fact", "a table I made")) == "unknown"


def test_every_bundled_fact_has_a_known_relation() -> None:
    relations = {fact_relation(p) for p in load_probes("facts")}
    assert relations == set(FACT_RELATIONS)


def test_kappa_known_values() -> None:
    a = agreement([True, True, False, False], [True, True, False, False])
    assert (a.both_true, a.both_false, a.kappa, a.observed) == (2, 2, 1.0, 1.0)
    # Cohen's (1960) style check: 20 TT, 5 TF, 10 FT, 15 FF -> po 0.7, pe 0.5, kappa 0.4
    first = [True] * 25 + [False] * 25
    second = [True] * 20 + [False] * 5 + [True] * 10 + [False] * 15
    assert agreement(first, second).kappa == pytest.approx(0.4)  # float64: default approx
    assert math.isnan(agreement([True, True], [True, True]).kappa)  # chance agreement 1: undefined
    with pytest.raises(ValueError):
        agreement([True], [True, False])
