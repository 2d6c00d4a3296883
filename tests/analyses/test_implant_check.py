"""The model check of the implanted idioms, on the tiny random model (the embedded one is in
tests/datasets/test_implanted.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from idiom_lens.analyses.implant_check import base_ranks, build_implanted, single_token_targets
from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.datasets.flags import CompositionalityRef
from idiom_lens.datasets.implanted import candidates
from idiom_lens.errors import InputError

# Empty reference tables: prompt_comp_ind is then False for every probe, and no WordNet is read.
NO_REF = CompositionalityRef(frozenset(), Counter(), Counter())


def test_base_ranks_are_memorization_ranks_plus_one(tiny_model, probes) -> None:
    ranks = base_ranks(tiny_model, probes)
    records = score_memorization(tiny_model, probes).records
    assert ranks == [r.target_rank + 1 for r in records]
    assert [rank == 1 for rank in ranks] == [r.memorized for r in records]
    assert base_ranks(tiny_model, probes, batch_size=4) == ranks  # the tiny model has no near-ties
    assert base_ranks(tiny_model, []) == []


def test_build_keeps_seeded_candidates_ranked_at_least_min_rank(tiny_model) -> None:
    pool = candidates(n=40, seed=3)
    ranks = base_ranks(tiny_model, pool)
    min_rank = sorted(ranks)[len(ranks) // 2]  # about half the candidates pass
    expected = [(p, r) for p, r in zip(pool, ranks) if r >= min_rank][:8]
    records = build_implanted(tiny_model, n=8, seed=3, min_rank=min_rank, single_token=False, ref=NO_REF)
    assert [(r["prompt"], r["target"], r["base_rank"]) for r in records] == [
        (p.prompt, p.target, rank) for p, rank in expected]
    assert [r["id"] for r in records] == [f"implant-{i:03d}" for i in range(8)]
    assert {r["base_rank_model"] for r in records} == {tiny_model.spec}
    assert {r["kind"] for r in records} == {"idiom"} and {r["source"] for r in records} == {"implanted"}
    # n at a time: a larger n keeps the same first records
    more = build_implanted(tiny_model, n=12, seed=3, min_rank=min_rank, single_token=False, ref=NO_REF)
    assert more[:8] == records


def test_single_token_targets_follow_the_tokenizer(tiny_model) -> None:
    pool = candidates(n=30, seed=0)
    single = single_token_targets(tiny_model, pool)
    tokenizer = tiny_model.tokenizer
    assert single == [len(tokenizer(" " + p.target, add_special_tokens=False)["input_ids"]) == 1 for p in pool]
    assert not all(single)  # the tiny tokenizer (400 tokens) splits most words


def test_build_raises_when_too_few_pass(tiny_model) -> None:
    with pytest.raises(InputError, match="only 0 of"):
        build_implanted(tiny_model, n=2, seed=0, min_rank=10**9, single_token=False, ref=NO_REF)
    with pytest.raises(InputError, match="min_rank must be a positive integer"):
        build_implanted(tiny_model, n=2, min_rank=0, ref=NO_REF)
    with pytest.raises(InputError, match="n must be a positive integer"):
        build_implanted(tiny_model, n=0, ref=NO_REF)
