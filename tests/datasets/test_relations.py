"""Fact relations and memorization per relation; Cohen's kappa."""

from __future__ import annotations

import math

import pytest

from idiom_lens.datasets import FACT_RELATIONS, Probe, ProbeSet, fact_relation, load_probes, memorization_by_relation
from idiom_lens.datasets.agreement import agreement
from idiom_lens.errors import InputError
from idiom_lens.analyses.memorization import MemorizationRecord, MemorizationResult


def _fact(id_: str, source: str = "", hard: bool | None = True) -> Probe:
    return Probe(id=id_, prompt="p q", target="t", kind="fact", source=source, hard_to_guess=hard)


def _result(probes: list[Probe], memorized: dict[str, bool]) -> MemorizationResult:
    records = tuple(
        MemorizationRecord(
            probe_id=p.id, kind=p.kind, group="", hard_to_guess=p.hard_to_guess, prompt=p.prompt, target=p.target,
            target_id=1, target_token=" t", n_target_tokens=1, pred_id=1, pred_token=" t",
            memorized=memorized[p.id], pred_prob=0.5, target_rank=0, target_prob=0.5, full_target_match=True,
        )
        for p in probes
    )
    return MemorizationResult(records=records, settings={})


def test_fact_relation_from_source_then_id() -> None:
    assert fact_relation(_fact("x", "capital countryinfo==1.0.1")) == "capital"
    assert fact_relation(_fact("fact-element-iron")) == "element"
    assert fact_relation(_fact("fact-city_country-osaka", "mine")) == "city_country"
    assert fact_relation(_fact("my-fact", "a table I made")) == "unknown"


def test_every_bundled_fact_has_a_known_relation() -> None:
    relations = {fact_relation(p) for p in load_probes("facts")}
    assert relations == set(FACT_RELATIONS)


def test_memorization_by_relation_counts() -> None:
    probes = [
        _fact("fact-capital-a"), _fact("fact-capital-b", hard=False), _fact("fact-element-c"),
        _fact("mine", "notes"), Probe(id="i", prompt="once in a blue", target="moon", kind="idiom"),
    ]
    result = _result(probes, {"fact-capital-a": True, "fact-capital-b": True, "fact-element-c": False, "mine": True, "i": True})
    table = memorization_by_relation(result, probes).set_index("relation")
    assert list(table.index) == ["capital", "element", "unknown", "all"]  # idioms are ignored
    assert table.loc["capital", ["n", "memorized", "n_hard_to_guess", "memorized_hard_to_guess"]].tolist() == [2, 2, 1, 1]
    assert table.loc["capital", "fraction"] == 1.0 and table.loc["element", "fraction"] == 0.0
    assert table.loc["all", ["n", "memorized"]].tolist() == [4, 3]


def test_memorization_by_relation_rejects_foreign_records() -> None:
    probes = [_fact("fact-capital-a")]
    result = _result([*probes, _fact("fact-capital-z")], {"fact-capital-a": True, "fact-capital-z": False})
    with pytest.raises(InputError, match="not in the probe list"):
        memorization_by_relation(result, probes)


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
