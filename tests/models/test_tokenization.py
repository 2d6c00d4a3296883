"""Probe tokenization: target = first sub-word token of the last word, BOS explicit."""

from __future__ import annotations

import pytest

from idiom_lens.errors import InputError
from idiom_lens.models.tokenization import encode_prompt, right_pad, split_probe


def test_split_matches_whole_sequence_tokenization(tiny_model):
    tok = tiny_model.tokenizer
    split = split_probe(tok, "once in a blue", "moon")
    whole = tok("once in a blue moon").input_ids
    assert list(split.prompt_ids + split.target_ids) == whole
    assert split.has_bos and split.prompt_ids[0] == tok.bos_token_id
    assert tok.decode(list(split.target_ids)) == " moon"
    assert split.target_id == split.target_ids[0]


def test_multi_token_target_keeps_all_sub_words(tiny_model):
    tok = tiny_model.tokenizer
    split = split_probe(tok, "the cat sat on the", "xylophonequ")  # unseen word: several BPE pieces
    assert len(split.target_ids) > 1
    assert tok.decode(list(split.target_ids)) == " xylophonequ"
    assert tok.decode([split.target_id]).startswith(" ")


def test_bos_can_be_dropped_or_added_explicitly(tiny_model):
    tok = tiny_model.tokenizer
    without = split_probe(tok, "break the", "ice", prepend_bos=False)
    with_bos = split_probe(tok, "break the", "ice", prepend_bos=True)
    assert not without.has_bos and with_bos.has_bos
    assert with_bos.prompt_ids[1:] == without.prompt_ids
    assert encode_prompt(tok, "break the", prepend_bos=False) == without.prompt_ids


@pytest.mark.parametrize("prompt, target",
                         [("", "moon"), ("   ", "moon"), ("once in a", ""), ("once in a", "blue moon")])
def test_bad_probes_are_clear_errors(tiny_model, prompt, target):
    with pytest.raises(InputError, match="prompt|target"):
        split_probe(tiny_model.tokenizer, prompt, target)


def test_empty_text_is_an_error(tiny_model):
    with pytest.raises(InputError, match="empty"):
        encode_prompt(tiny_model.tokenizer, "  ")


def test_right_pad():
    tokens, last = right_pad([(1, 2, 3), (4,)], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert last.tolist() == [2, 0]


@pytest.mark.embedded
def test_embedded_target_token_is_first_sub_word_with_space(embedded_model):
    split = split_probe(embedded_model.tokenizer, "once in a blue", "moon")
    assert embedded_model.tokenizer.convert_ids_to_tokens(list(split.target_ids)) == ["▁moon"]
    assert split.prompt_ids[0] == embedded_model.tokenizer.bos_token_id
