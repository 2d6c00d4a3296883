"""The lens corpus installs from a package, and no probe prompt ever reaches it."""

from __future__ import annotations

import pytest

from idiom_lens.errors import InputError
from idiom_lens.lenses.cache import bundled_prompts
from idiom_lens.lenses.corpus import (
    LEE_HELDOUT,
    SAMPLES_HELDOUT,
    TEXT_FILE_HELDOUT,
    LensCorpus,
    build_corpus,
    check_disjoint,
    drop_probe_sentences,
    lee_sentences,
    split_sentences,
)


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def test_no_probe_prompt_appears_in_the_training_text(tiny_model):
    prompts = bundled_prompts()
    corpus = build_corpus(tiny_model, corpus="lee+samples", probe_prompts=prompts, n_samples=8)
    text = "\n".join(_normal(s) for s in corpus.train + corpus.heldout)
    found = [p for p in prompts if _normal(p) in text]
    assert found == []
    assert corpus.dropped > 0  # the Lee corpus does contain some probe prompts: they were removed
    assert len(corpus.train) > 2000 and len(corpus.heldout) > 100
    check_disjoint(corpus, prompts)
    # every held-out sentence names its origin: lee.cor first, then the 8 held-out samples
    # (max(8, 8 // 8)) of 4+ words
    assert len(corpus.heldout_origins) == len(corpus.heldout)
    pool = corpus.describe()["heldout_pool"]
    assert list(pool) == [LEE_HELDOUT, SAMPLES_HELDOUT] and sum(pool.values()) == len(corpus.heldout)
    assert 0 < pool[SAMPLES_HELDOUT] <= 8
    lee_only = [s for s, o in zip(corpus.heldout, corpus.heldout_origins) if o == LEE_HELDOUT]
    assert lee_only == drop_probe_sentences(lee_sentences()[1], prompts)[0]


def test_a_sentence_holding_a_probe_prompt_is_dropped():
    kept, dropped = drop_probe_sentences(["It happens Once  in a BLUE moon here.", "Nothing to see."],
                                         ["once in a blue"])
    assert kept == ["Nothing to see."] and dropped == 1


def test_a_users_text_file_is_split_and_held_out(tiny_model, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\n\n".join(f"Another one follows here. Sentence number {i} is about the weather today."
                                for i in range(20)))
    corpus = build_corpus(tiny_model, text_file=path, probe_prompts=["about the weather"])
    assert corpus.name == "file:mine.txt" and corpus.dropped == 20
    assert all("weather" not in s for s in corpus.train + corpus.heldout)
    assert len(corpus.heldout) == 4 and len(corpus.train) == 16  # every 10th of 40 sentences held out
    assert corpus.describe()["heldout_pool"] == {TEXT_FILE_HELDOUT: 4}
    with pytest.raises(InputError, match="no such file"):
        build_corpus(tiny_model, text_file=tmp_path / "missing.txt")
    with pytest.raises(InputError, match="lens corpus 'web' is unknown"):
        build_corpus(tiny_model, corpus="web")


def test_model_samples_are_seeded(tiny_model):
    from idiom_lens.lenses.corpus import model_samples

    a = model_samples(tiny_model, n=4, max_new_tokens=12, seed=5)
    assert a == model_samples(tiny_model, n=4, max_new_tokens=12, seed=5)
    assert a != model_samples(tiny_model, n=4, max_new_tokens=12, seed=6)


def test_sentences_are_split():
    assert split_sentences("One two three four. Five six seven eight! Tiny.\nNine ten eleven twelve") == [
        "One two three four.", "Five six seven eight!", "Nine ten eleven twelve"]


def test_held_out_origins_match_the_sentences():
    with pytest.raises(InputError, match="1 held-out origins for 2 held-out sentences"):
        LensCorpus(name="x", train=("a b c d",), heldout=("e f g h", "i j k l"), dropped=0, heldout_origins=("o",))
    assert LensCorpus(name="x", train=(), heldout=("e",), dropped=0).describe()["heldout_pool"] == {}
