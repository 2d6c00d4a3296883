"""The Lee news corpus read from gensim's test data (`datasets.lee`)."""

from __future__ import annotations

from idiom_lens.datasets.lee import lee_sentences, split_sentences


def test_lee_has_a_training_and_a_separate_held_out_part():
    train, heldout = lee_sentences()
    assert len(train) > 1000 and len(heldout) > 100
    assert not set(train) & set(heldout)
    assert all(len(s.split()) >= 4 for s in train + heldout)


def test_sentences_are_split_at_their_ends_and_short_ones_dropped():
    text = 'The cat sat on the mat. It was warm there today!\nToo short. "Quoted words start here," he said.'
    assert split_sentences(text) == ["The cat sat on the mat.", "It was warm there today!",
                                     '"Quoted words start here," he said.']
