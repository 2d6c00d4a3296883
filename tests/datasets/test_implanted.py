"""The implanted idioms: a seeded generator of new idioms, and the bundled set it made.

The rules are checked here independently of the generator's own checks (word counts, one target
per prompt, at most two uses of a target, no bundled idiom inside); the model check (base rank)
is recomputed on the embedded model for a tenth of the bundled set.
"""

from __future__ import annotations

from collections import Counter

import pytest

from idiom_lens.datasets import bundled_names, load_probes
from idiom_lens.datasets import implanted as imp
from idiom_lens.datasets.flags import STOP_WORDS, bare
from idiom_lens.datasets.loaders import probe_record
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError

ALL_THINGS = {w for words in imp.THINGS.values() for w in words}


def _key(text: str) -> str:
    return " ".join(bare(w) for w in text.split())


@pytest.fixture(scope="module")
def idiom_keys() -> tuple[set[str], set[str]]:
    """(texts, prompts) of the bundled idioms, compared lower-cased without punctuation."""
    idioms = load_probes("idioms")
    return {_key(p.text) for p in idioms}, {_key(p.prompt) for p in idioms}


def _check_rules(probes: list[Probe], idiom_keys: tuple[set[str], set[str]]) -> None:
    texts, prompts = idiom_keys
    for probe in probes:
        words = probe.text.split()
        assert imp.MIN_WORDS <= len(words) <= imp.MAX_WORDS, probe
        assert probe.target in ALL_THINGS and probe.kind == "idiom" and probe.source == "implanted", probe
        assert _key(probe.text) not in texts and _key(probe.prompt) not in prompts, probe
        assert not any(f" {t} " in f" {_key(probe.text)} " for t in texts), probe
        content = [w for w in words if w not in STOP_WORDS]
        assert len(set(content)) == len(content), probe  # no word drawn twice
        assert all(not (w == "a" and nxt[0] in "aeiou") for w, nxt in zip(words, words[1:])), probe
        assert probe.target not in probe.prompt.split(), probe
        imp.template_of(probe)  # raises unless exactly one template matches
    assert len({_key(p.prompt) for p in probes}) == len(probes)
    assert max(Counter(p.target for p in probes).values()) <= imp.MAX_TARGET_USES


def test_candidates_are_deterministic_per_seed() -> None:
    first = imp.candidates(n=60, seed=0)
    assert first == imp.candidates(n=60, seed=0)
    assert [p.id for p in first[:2]] == ["candidate-0000", "candidate-0001"]
    assert imp.candidates(n=10, seed=0) == first[:10]  # a prefix: the surplus asked for changes nothing
    other = imp.candidates(n=60, seed=1)
    assert sum(a.text == b.text for a, b in zip(first, other)) < 5


@pytest.mark.parametrize("seed", [0, 1, 17])
def test_every_candidate_follows_the_rules(seed: int, idiom_keys: tuple[set[str], set[str]]) -> None:
    stream = list(imp.candidate_stream(seed))
    assert len(stream) >= 2 * imp.SIZE  # enough surplus for the model check
    _check_rules(stream, idiom_keys)
    templates = Counter(imp.template_of(p) for p in stream[: imp.SIZE])
    assert set(templates) == {t.name for t in imp.TEMPLATES} and max(templates.values()) <= 12


def test_bundled_idioms_are_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    assert imp.touches_bundled_idiom("once in a blue", "moon")
    assert imp.touches_bundled_idiom("never forget that once in a blue", "moon")  # contains an idiom
    assert not imp.touches_bundled_idiom("never ask a painter about the", "fiddle")
    # make the first candidates of seed 0 "bundled idioms": the generator must then leave them out
    taken = imp.candidates(n=5, seed=0)
    monkeypatch.setattr(imp, "_bundled_idioms", lambda: tuple(f" {_key(p.text)} " for p in taken))
    again = {p.text for p in imp.candidates(n=60, seed=0)}
    assert not again & {p.text for p in taken}


def test_bad_requests_raise() -> None:
    for n in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="n must be a positive integer"):
            imp.candidates(n=n, seed=0)
    with pytest.raises(InputError, match="seed must be an integer"):
        imp.candidates(n=3, seed="0")
    with pytest.raises(InputError, match="give only"):
        imp.candidates(n=100_000, seed=0)


@pytest.mark.parametrize(("pattern", "message"), [
    ("a {target} for every {thing}", "last word"),
    ("never ever ever trust a {trait} {agent} with a {target}", "words"),
    ("a {colour} for every {target}", "unknown slot"),
])
def test_template_is_validated(pattern: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        imp.Template(name="bad", pattern=pattern)


def test_bundled_file_loads_with_every_field(idiom_keys: tuple[set[str], set[str]]) -> None:
    assert imp.NAME in bundled_names()
    probes = load_probes("implanted")
    records = imp.implanted_records()
    assert len(probes) == len(records) == imp.SIZE >= 100
    assert [p.id for p in probes] == [f"implant-{i:03d}" for i in range(len(probes))]
    for probe, record in zip(probes, records):
        # the loader keeps every field it knows (flags included) and leaves the extra keys out
        assert {k: record[k] for k in probe_record(probe)} == probe_record(probe)
        assert set(record) - set(probe_record(probe)) == {"template", "base_rank", "base_rank_model"}
        assert None not in (probe.similarity_ind, probe.prompt_comp_ind, probe.frequent_target_ind,
                            probe.hard_to_guess) and probe.single_target is True
        assert record["base_rank"] >= imp.MIN_RANK > 10
        assert record["base_rank_model"] == "gemma-3-270m"
        assert record["template"] == imp.template_of(probe)
    _check_rules(list(probes), idiom_keys)


def test_bundled_file_is_the_seeded_stream_filtered() -> None:
    """Without a model: the bundled idioms are candidates of seed 0 in stream order, starting with the
    first (the model check only leaves candidates out)."""
    texts = [p.text for p in load_probes("implanted")]
    stream = iter(p.text for p in imp.candidate_stream(imp.SEED))
    assert next(stream) == texts[0]
    assert all(text in stream for text in texts[1:])  # a subsequence: `in` consumes the iterator


@pytest.mark.embedded
def test_bundled_base_ranks_recompute_on_the_embedded_model(embedded_model) -> None:
    from idiom_lens.analyses.implant_check import base_ranks, single_token_targets

    probes = list(load_probes("implanted"))
    stored = {r["id"]: r["base_rank"] for r in imp.implanted_records()}
    sample = probes[::12]
    assert len(sample) == 10
    ranks = base_ranks(embedded_model, sample)
    assert ranks == [stored[p.id] for p in sample]
    assert min(ranks) > 10
    assert all(single_token_targets(embedded_model, probes))
