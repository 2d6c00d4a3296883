"""Probe tokenization: the prompt tokens the model sees and the target token it should recall.

method.md section 2: tokenize the whole sequence; the target token is the first sub-word token of
the last word (with its leading space); the model runs on the prompt tokens only. We split the
whole-sequence tokenization at the character where the last word's leading space begins, so the
prompt tokens are exactly those of the full text (no re-tokenization drift). BOS follows the
tokenizer's own setting unless `prepend_bos` is given, and is recorded on every `ProbeTokens`.

A masked LM (BERT) reads ``[CLS] prompt [MASK] [SEP]``: the same split of the whole sequence's
tokens, the last word's tokens replaced by one mask token, the tokenizer's closing special tokens
kept after it (`split_masked_probe`); the prediction is read at the mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from idiom_lens.errors import InputError
from idiom_lens.types import Tokens


@dataclass(frozen=True, slots=True)
class ProbeTokens:
    """Token ids of one probe: what the model reads and what it should predict."""

    prompt_ids: tuple[int, ...]  # up to the read position: a masked LM's ends with its mask token
    target_ids: tuple[int, ...]  # every sub-word token of the last word; [0] is the target
    has_bos: bool
    suffix_ids: tuple[int, ...] = ()  # read after the prompt by a masked LM ([SEP]); causal LMs: none

    @property
    def target_id(self) -> int:
        return self.target_ids[0]

    @property
    def input_ids(self) -> tuple[int, ...]:
        """What the model reads for the prediction: the prompt, and a masked LM's closing tokens."""
        return self.prompt_ids + self.suffix_ids


def _encode(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``prompt + " " + target`` with the tokenizer's special
    tokens; `InputError` for an empty prompt or a target that is not one word."""
    if not prompt or not prompt.strip():
        raise InputError(f"probe prompt is empty (target {target!r}): expected at least one word")
    if not target or not target.strip() or any(c.isspace() for c in target):
        raise InputError(f"probe target {target!r} must be a single non-empty word (prompt {prompt!r})")
    encoded = tokenizer(f"{prompt} {target}", return_offsets_mapping=True, add_special_tokens=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _first_target(offsets: Sequence[tuple[int, int]], prompt: str, target: str) -> int:
    """Index of the target word's first token: the first real token ending after the space before
    it; `InputError` when there is none or it starts inside the prompt (merged with it)."""
    boundary = len(prompt)  # the space before the target word
    text = f"{prompt} {target}"
    first = next((i for i, (start, end) in enumerate(offsets) if end > boundary and end > start), None)
    if first is None:
        raise InputError(f"could not locate target {target!r} in the tokenization of {text!r}")
    if offsets[first][0] < boundary:
        raise InputError(f"the tokenizer merges the end of the prompt with the target in {text!r}: "
                         "no token boundary before the last word")
    return first


def split_probe(
    tokenizer: Any, prompt: str, target: str, *, prepend_bos: bool | None = None
) -> ProbeTokens:
    """Tokenize ``prompt + " " + target`` and split it at the start of the last word."""
    ids, offsets = _encode(tokenizer, prompt, target)
    bos_id = tokenizer.bos_token_id
    has_bos = bool(ids) and bos_id is not None and ids[0] == bos_id and offsets[0] == (0, 0)
    if has_bos and prepend_bos is False:
        ids, offsets, has_bos = ids[1:], offsets[1:], False
    elif not has_bos and prepend_bos:
        if bos_id is None:
            raise InputError("prepend_bos=True but the tokenizer has no BOS token")
        ids, offsets, has_bos = [bos_id, *ids], [(0, 0), *offsets], True

    first_target = _first_target(offsets, prompt, target)
    prompt_ids = tuple(ids[:first_target])
    target_ids = tuple(ids[first_target:])
    if len(prompt_ids) == int(has_bos):
        raise InputError(f"probe prompt {prompt!r} produced no tokens")
    return ProbeTokens(prompt_ids=prompt_ids, target_ids=target_ids, has_bos=has_bos)


def split_masked_probe(tokenizer: Any, prompt: str, target: str) -> ProbeTokens:
    """Tokenize ``prompt + " " + target`` with the tokenizer's special tokens and put one mask
    token in place of the last word: prompt_ids = [CLS] + the prompt's tokens + [MASK], suffix_ids
    = the closing special tokens ([SEP]), target_ids = the last word's tokens."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise InputError("the tokenizer has no mask token: a masked LM reads the last word as one")
    ids, offsets = _encode(tokenizer, prompt, target)
    real = [end > start for start, end in offsets]  # special tokens span no characters
    first_target = _first_target(offsets, prompt, target)
    end = max(i for i, r in enumerate(real) if r) + 1
    if not any(real[:first_target]):
        raise InputError(f"probe prompt {prompt!r} produced no tokens")
    return ProbeTokens(prompt_ids=(*ids[:first_target], int(mask_id)), target_ids=tuple(ids[first_target:end]),
                       has_bos=False, suffix_ids=tuple(ids[end:]))


def encode_prompt(tokenizer: Any, text: str, *, prepend_bos: bool | None = None) -> tuple[int, ...]:
    """Token ids of a free prompt (for `predict`): BOS handled as in `split_probe`."""
    if not text or not text.strip():
        raise InputError("text is empty: expected a prompt to continue")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos_id = tokenizer.bos_token_id
    has_bos = bool(ids) and bos_id is not None and ids[0] == bos_id
    if has_bos and prepend_bos is False:
        ids = ids[1:]
    elif not has_bos and prepend_bos and bos_id is not None:
        ids = [bos_id, *ids]
    return tuple(ids)


def right_pad(
    sequences: Sequence[Sequence[int]], *, pad_id: int
) -> tuple[Tokens, torch.Tensor]:
    """Right-pad token sequences into one batch, and return each sequence's last index.

    With causal attention, right padding never changes the activations at real positions, so
    no attention mask is needed and batched results equal unbatched ones.
    """
    if not sequences:
        raise InputError("no sequences to batch")
    longest = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    last = torch.tensor([len(s) - 1 for s in sequences], dtype=torch.long)
    return tokens, last


def pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def tokenize_sentences(model: Any, sentences: Sequence[str], *, max_tokens: int = 48) -> list[list[int]]:
    """Each sentence as BOS (when the model uses one) + up to `max_tokens - 1` tokens; sentences
    of fewer than 3 tokens are left out (the lens corpus, the implant's preservation sentences)."""
    out = []
    for sentence in sentences:
        ids = list(model.tokenizer(sentence, add_special_tokens=False)["input_ids"])
        if model.prepend_bos and model.tokenizer.bos_token_id is not None:
            ids = [model.tokenizer.bos_token_id, *ids]
        if len(ids) >= 3:
            out.append(ids[:max_tokens])
    return out
