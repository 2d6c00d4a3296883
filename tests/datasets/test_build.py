"""The builder reproduces the bundled files byte for byte; bundled sets meet their requirements.

Building needs the build-data extra (`build.BUILD_PACKAGES`): this test fails, never skips, when
they are missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from idiom_lens.datasets import FACT_RELATIONS, bundled_names, bundled_path, fact_relation, load_probes
from idiom_lens.datasets.build import BUILD_PACKAGES, BUNDLED, SLOT_WORDS, build_all, missing_build_packages
from idiom_lens.datasets.flags import STOP_WORDS, answer_guessable, bare


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert not missing_build_packages(), "install the build-data extra: pip install 'idiom-lens[build-data]'"
    return build_all(tmp_path_factory.mktemp("built"))


def test_builder_reproduces_bundled_files(built: dict[str, Path]) -> None:
    """Every bundled set but the implanted idioms, which need a model (tests/datasets/test_implanted.py)."""
    assert sorted(built) == sorted(BUNDLED)
    assert bundled_names() == sorted([*BUNDLED, "implanted"])
    for name, path in built.items():
        assert path.read_bytes() == bundled_path(name).read_bytes(), (
            f"{name}.jsonl differs: run `idiom-lens data build`")


def test_bundled_files_are_plain_utf8_jsonl() -> None:
    total = 0
    for name in bundled_names():
        data = bundled_path(name).read_bytes()
        total += len(data)
        assert b"\r" not in data and data.endswith(b"\n")
        data.decode("utf-8")
    assert total < 2_000_000


def _words(text: str) -> list[str]:
    return text.split()


def test_idioms_requirements() -> None:
    idioms = load_probes("idioms")
    assert len(idioms) >= 800
    for probe in idioms:
        words = _words(probe.text)
        assert probe.kind == "idiom" and len(words) >= 4, probe
        assert not {bare(w) for w in words} & SLOT_WORDS, probe
        assert not all(bare(w) in STOP_WORDS for w in _words(probe.prompt)), probe
        assert re.fullmatch(r"[A-Za-z]+", probe.target), probe
        assert probe.source.startswith("englishidioms")
    assert len({p.text.lower() for p in idioms}) == len(idioms)


def test_text_requirements() -> None:
    text, idioms = load_probes("text"), load_probes("idioms")
    assert len(text) >= 500
    assert all(p.kind == "text" and re.fullmatch(r"[A-Za-z]+", p.target) for p in text)
    assert all(bare(p.target) not in STOP_WORDS for p in text)
    assert all(p.source.startswith("wikipedia '") and "CC BY-SA 3.0" in p.source for p in text)
    # running prose from many articles, not one
    articles = Counter(p.source.split("'")[1] for p in text)
    assert len(articles) >= 50 and max(articles.values()) < 0.05 * len(text)
    # no bundled idiom inside a text probe
    idiom_texts = {f" {p.text.lower()} " for p in idioms}
    assert not any(i in f" {p.text.lower()} " for p in text for i in idiom_texts)
    # word-count distribution matches the idioms' one (stratified sample, TEXT_PER_IDIOM per idiom)
    text_hist = Counter(len(_words(p.text)) for p in text)
    idiom_hist = Counter(len(_words(p.text)) for p in idioms)
    assert set(text_hist) == set(idiom_hist)
    distance = 0.5 * sum(abs(text_hist[n] / len(text) - idiom_hist[n] / len(idioms)) for n in idiom_hist)
    assert distance < 0.02, distance


def test_facts_requirements() -> None:
    facts = load_probes("facts")
    assert len(facts) >= 300
    assert all(p.kind == "fact" and re.fullmatch(r"[A-Za-z]+(['-][A-Za-z]+)?", p.target) for p in facts)
    relations = Counter(fact_relation(p) for p in facts)
    assert set(relations) == set(FACT_RELATIONS) and len(relations) >= 6
    assert min(relations.values()) >= 20, relations
    for p in facts:
        relation = fact_relation(p)
        assert p.id.startswith(f"fact-{relation}-") and p.source.split()[0] == relation, p
        assert not p.similarity_ind, p  # answers that can be copied from the prompt are left out
    # the first token is not shared: no answer of a relation starts another answer of it
    for relation in relations:
        answers = {p.target.lower() for p in facts if fact_relation(p) == relation}
        assert not [(a, b) for a in answers for b in answers if a != b and b.startswith(a)], relation


def test_facts_are_well_posed() -> None:
    """Articles where English needs them; ambiguous, contested and renamed subjects left out."""
    by_prompt = {p.prompt: p.target for p in load_probes("facts")}
    assert by_prompt["The rufiyaa is the currency of the"] == "Maldives"
    assert by_prompt["The capital of the Netherlands is"] == "Amsterdam"
    assert by_prompt["Manila is the capital of the"] == "Philippines"
    assert by_prompt["The capital of France is"] == "Paris"
    assert by_prompt["The baht is the currency of"] == "Thailand"
    assert by_prompt["The chemical element with the symbol Fe is"] == "iron"
    assert by_prompt["The capital of the state of Texas is"] == "Austin"
    prompts = " | ".join(by_prompt)
    for absent in (
        "Victoria is the capital",  # also Victoria, British Columbia
        "Hamilton is the capital",  # also Hamilton, Ontario
        "of Maldives",  # needs "the"
        "Kingston is the capital",  # also Kingston, Ontario
        "The capital of Bolivia",  # Sucre or La Paz
        "The capital of South Africa",  # three capitals
        "euro is the currency",  # shared by many countries
        "symbol Al is",  # aluminum or aluminium
        "Swaziland",  # renamed Eswatini
        "(",
    ):
        assert absent not in prompts, absent
    assert "Niger" not in by_prompt.values() and "Nigeria" not in by_prompt.values()  # same first token


@pytest.mark.parametrize("name", ["idioms", "text", "facts"])
def test_unique_ids_and_prompts(name: str) -> None:
    probes = load_probes(name)
    assert len({p.id for p in probes}) == len(probes)
    assert len({p.prompt.lower() for p in probes}) == len(probes)  # one target per prompt
    guessable = (answer_guessable([fact_relation(p) for p in probes], [p.target for p in probes])
                 if name == "facts" else [False] * len(probes))
    assert all(p.hard_to_guess == (not p.prompt_comp_ind and not p.similarity_ind and not g)
               for p, g in zip(probes, guessable))
    assert all(None not in (p.similarity_ind, p.prompt_comp_ind, p.frequent_target_ind) for p in probes)


def test_bundled_facts_with_a_guessable_answer_are_not_hard_to_guess() -> None:
    """The rule recomputed from the bundled facts themselves: "English" is the answer of 35 of the
    90 language facts (0.39 >= 0.2); "India", "China" and "Pakistan" share city_country's majority
    (5 of 34 each); every other answer stays hard to guess (a capital is the answer of one fact)."""
    facts = load_probes("facts")
    easy = Counter((fact_relation(p), p.target) for p in facts if not p.hard_to_guess)
    assert easy == {("language", "English"): 35, ("city_country", "India"): 5, ("city_country", "China"): 5,
                    ("city_country", "Pakistan"): 5}
    assert sum(bool(p.hard_to_guess) for p in facts) == len(facts) - 50


def test_runtime_import_needs_no_build_package() -> None:
    code = (
        "import sys; import idiom_lens.datasets as d; d.load_probes('idioms'); "
        f"bad = [m for m in {BUILD_PACKAGES!r} if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
