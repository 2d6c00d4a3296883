"""Each flag rule (`idiom_lens.datasets.flags`) on hand-picked cases (needs wordfreq for frequent_target_ind)."""

from __future__ import annotations

from collections import Counter

import pytest

from idiom_lens.datasets import build
from idiom_lens.datasets import flags as rules
from idiom_lens.datasets.flags import (
    CompositionalityRef,
    answer_guessable,
    flags,
    frequent_target_ind,
    prompt_comp_ind,
    similarity_ind,
)

# A tiny reference: "give up" is a short dictionary phrase; "long time" a frequent corpus bigram.
REF = CompositionalityRef(
    short_phrases=frozenset({"give up", "the naked eye"}),
    bigrams=Counter({("long", "time"): 30, ("blue", "moon"): 1, ("the", "day"): 50}),
    unigrams=Counter({"long": 200, "blue": 100, "the": 10_000}),
)


@pytest.mark.parametrize(
    "prompt, target, expected",
    [
        ("let bygones be", "bygones", True),
        ("boys will be", "boys", True),
        ("a dog's life, every", "dogs", True),  # inflection: dog's / dogs
        ("heading for a", "head", True),  # shared prefix, simple form
        ("from time to", "time", True),
        ("once in a blue", "moon", False),
        ("understand the", "under", False),  # "stand" left after the common prefix: too long
        ("carry on with the", "carriage", False),
    ],
)
def test_similarity(prompt: str, target: str, expected: bool) -> None:
    assert similarity_ind(prompt, target) is expected


@pytest.mark.parametrize(
    "target, expected",
    [("up", False), ("time", False), ("out", False), ("the", False),
     ("moon", True), ("stone", True), ("eye", True), ("doornail", True)],
)
def test_frequent_target(target: str, expected: bool) -> None:
    """Generic words ("up", "time", "the") are flagged frequent (False), idiom targets are not (True)."""
    assert frequent_target_ind(target) is expected


# Content words (not stop words) just either side of the documented threshold, wordfreq English
# Zipf 5.8: "home" and "use" 5.81, "man" 5.82, "best" 5.84 are frequent; "part" and "state" 5.78,
# "find" 5.76, "thing" 5.72 are not. A threshold moved by more than ~0.02 either way, or a flipped
# comparison, fails here.
NEAR_THRESHOLD = [
    ("home", False), ("use", False), ("man", False), ("best", False),
    ("part", True), ("state", True), ("find", True), ("thing", True),
]


@pytest.mark.parametrize("word, expected", NEAR_THRESHOLD)
def test_frequent_target_threshold_is_zipf_5_8(word: str, expected: bool) -> None:
    """frequent_target_ind is True exactly below Zipf 5.8 for content words (else docs/datasets.md's rule is broken)."""
    from wordfreq import zipf_frequency

    assert rules.FREQUENT_ZIPF == 5.8
    zipf = zipf_frequency(word, "en")
    # premises (wordfreq's data): the word sits close to 5.8, on the side `expected` says, and is no stop word
    assert abs(zipf - 5.8) <= 0.1 and (zipf < 5.8) is expected, f"{word!r} has Zipf {zipf}"
    assert not rules.is_stop_word(word)
    assert frequent_target_ind(word) is expected
    assert frequent_target_ind(word.capitalize() + ",") is expected  # compared lower-cased, punctuation removed


def test_stop_words_are_frequent_whatever_their_zipf() -> None:
    """A stop word is never a rare target, even below Zipf 6.0 ("whom" 4.85); else stop words are ignored."""
    from wordfreq import zipf_frequency

    assert rules.is_stop_word("whom") and zipf_frequency("whom", "en") < rules.FREQUENT_ZIPF  # premises
    assert frequent_target_ind("whom") is False
    assert frequent_target_ind("Whom") is False


@pytest.mark.parametrize(
    "prompt, target, expected",
    [
        ("never give", "up", True),  # tail "give up" is a fixed phrase by itself
        ("see it with the naked", "eye", True),  # two-word tail + target
        ("for a very long", "time", True),  # corpus collocation long -> time (30/200 >= 0.1)
        ("once in a blue", "moon", False),  # blue -> moon is rare in general language
        ("at the end of the", "day", False),  # frequent bigram but a tiny share of what follows "the"
    ],
)
def test_prompt_comp(prompt: str, target: str, expected: bool) -> None:
    assert prompt_comp_ind(prompt, target, REF) is expected


def test_a_frame_with_many_completions_is_not_a_fixed_tail() -> None:
    """A tail + target phrase counts only when the tail starts at most TAIL_MAX_COMPLETIONS phrases."""
    countries = [f"capital of {c}" for c in ("kenya", "france", "peru", "chad", "mali", "oman")]
    ref = CompositionalityRef(frozenset({"drawing board", *countries}), Counter(), Counter())
    assert ref.completions == {"drawing": 1, "capital of": 6} and rules.TAIL_MAX_COMPLETIONS < 6
    assert prompt_comp_ind("back to the drawing", "board", ref) is True
    assert prompt_comp_ind("Nairobi is the capital of", "kenya", ref) is False


def test_wordnet_lemmas_are_tail_phrases() -> None:
    """The bundled reference holds WordNet's multi-word lemmas ("Cheshire cat") besides the dictionary's."""
    ref = build.compositionality_ref()
    assert {"cheshire cat", "dotted line", "give up"} <= ref.short_phrases
    assert prompt_comp_ind("grin like a Cheshire", "cat", ref) is True  # "cheshire" starts 2 phrases
    assert prompt_comp_ind("sign on the dotted", "line", ref) is True
    # "blue moon" is a lemma, but "blue" starts 83 phrases: a colour, not a fixed chunk
    assert "blue moon" in ref.short_phrases and ref.completions["blue"] > rules.TAIL_MAX_COMPLETIONS
    assert prompt_comp_ind("once in a blue", "moon", ref) is False


def test_hard_to_guess_combines_the_others() -> None:
    assert flags("once in a blue", "moon", REF)["hard_to_guess"] is True
    assert flags("let bygones be", "bygones", REF)["hard_to_guess"] is False
    assert flags("for a very long", "time", REF) == {
        "similarity_ind": False,
        "prompt_comp_ind": True,
        "frequent_target_ind": False,
        "hard_to_guess": False,
    }


def test_a_relation_s_majority_answer_is_guessable_and_a_rare_one_is_not() -> None:
    # language: 10 facts; "English" 4 (the majority, 0.4), "French" 2 (0.2: at the threshold),
    # 4 answers once each; element: 5 different answers (no majority); tie: 2 x "a", 2 x "b" in 9
    relations = ["language"] * 10 + ["element"] * 5 + ["tie"] * 9
    targets = (["English"] * 3 + ["english."] + ["French"] * 2 + ["Thai", "Lao", "Khmer", "Malay"]
               + ["iron", "gold", "tin", "lead", "zinc"]
               + ["a", "a", "b", "b", "c", "d", "e", "f", "g"])
    got = answer_guessable(relations, targets)
    assert got[:10] == [True] * 6 + [False] * 4  # "english." is "English" compared bare
    assert got[10:15] == [False] * 5  # every answer once: no majority, each share 0.2 but n = 1
    assert got[15:] == [True] * 4 + [False] * 5  # tied majority (2 of 9 = 0.22 each, and the most common)
    # below the threshold and not the majority: 2 of 11 "b" beside 3 "a"
    assert answer_guessable(["r"] * 11, ["a"] * 3 + ["b"] * 2 + list("cdefgh")) == [True] * 3 + [False] * 8
    # one fact per relation: never guessable, whatever the share
    assert answer_guessable(["x", "y"], ["Paris", "Paris"]) == [False, False]
    with pytest.raises(ValueError, match="one relation per target"):
        answer_guessable(["x"], [])


def test_bundled_idioms_carry_the_expected_flags() -> None:
    from idiom_lens.datasets import load_probes

    by_text = {p.text.lower(): p for p in load_probes("idioms")}
    assert by_text["once in a blue moon"].hard_to_guess is True
    assert by_text["let bygones be bygones"].similarity_ind is True
    assert by_text["kill two birds with one stone"].frequent_target_ind is True
    for probe in by_text.values():
        assert probe.hard_to_guess == (not probe.prompt_comp_ind and not probe.similarity_ind)
