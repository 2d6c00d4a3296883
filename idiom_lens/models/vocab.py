"""Which token ids are real vocabulary: every prediction, rank and probability ranges over them.

Gemma 3's vocabulary holds 6,249 special and unused tokens (`<unused0>` ..., `<start_of_image>`,
`<eos>`, ...). Its greedy prediction is `<start_of_image>` for dozens of bundled probes, which then
sit among the non-memorized curves for a reason that has nothing to do with recall. So, as
method.md section 3 asks, special and unused tokens are masked out of the argmax and of every
read-out: their logits are set to the lowest float before ranking and softmax (the distribution
is renormalised over real tokens). Which ids were masked is recorded in every result's settings.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

_UNUSED = re.compile(r"<unused\d+>")
_MASKS: "weakref.WeakKeyDictionary[object, Tensor]" = weakref.WeakKeyDictionary()


def masked_token_ids(tokenizer: Any, d_vocab: int) -> list[int]:
    """Ids that are not real vocabulary: the tokenizer's special tokens, added tokens marked
    special or named `<unusedN>`, and ids the model has but the tokenizer does not."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items():
        content = str(getattr(token, "content", token))
        if getattr(token, "special", False) or _UNUSED.fullmatch(content):
            ids.add(int(i))
    ids.update(range(len(tokenizer), d_vocab))
    return sorted(i for i in ids if 0 <= i < d_vocab)


def valid_mask(model: Any) -> Bool[Tensor, " d_vocab"]:
    """True for real vocabulary tokens of `model` (a `LoadedModel`), computed once per model."""
    bridge = model.bridge
    if bridge not in _MASKS:
        d_vocab = int(bridge.cfg.d_vocab)
        mask = torch.ones(d_vocab, dtype=torch.bool)
        mask[masked_token_ids(model.tokenizer, d_vocab)] = False
        if not mask.any():
            raise ValueError(f"{model.spec}: every token id is special; nothing to predict")
        _MASKS[bridge] = mask.to(model.device)
    return _MASKS[bridge]


def mask_logits(logits: Float[Tensor, "*batch d_vocab"], valid: Bool[Tensor, " d_vocab"]) -> Tensor:
    """`logits` with masked tokens at the lowest float: never the argmax, never outrank a real token,
    probability 0 after softmax (finite, so that p x logit stays 0 in the entropy)."""
    return logits.masked_fill(~valid.to(logits.device), torch.finfo(logits.dtype).min)


def mask_summary(model: Any) -> dict[str, Any]:
    """What a result records about the mask."""
    valid = valid_mask(model)
    return {"masked_tokens": "special and unused tokens", "n_masked_tokens": int((~valid).sum())}
