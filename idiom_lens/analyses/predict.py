"""Next-token prediction for a free prompt: the quickest check of what a model recalls."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel, require_causal
from idiom_lens.models.tokenization import encode_prompt
from idiom_lens.models.vocab import mask_logits, valid_mask


@dataclass(frozen=True)
class NextTokenPrediction:
    """The top-k next tokens after `text`, most likely first."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    probs: tuple[float, ...]

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"rank": range(len(self.tokens)), "token": self.tokens, "token_id": self.token_ids, "prob": self.probs}
        )


def predict_next(model: LoadedModel, text: str, *, top: int = 5) -> NextTokenPrediction:
    """Run the model on `text` and return its `top` most probable next tokens (real vocabulary
    tokens only: special, placeholder and control tokens are masked, see `idiom_lens.models.vocab`).

    Raises `InputError` when `top` is below 1.
    """
    require_causal(model, "next-token prediction")
    if top < 1:
        raise InputError(f"top must be >= 1, got {top}")
    ids = encode_prompt(model.tokenizer, text)
    tokens = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        logits = mask_logits(model.bridge(tokens)[0, -1].float(), valid_mask(model))
    probs = logits.softmax(dim=-1)
    values, indices = probs.topk(min(top, int(valid_mask(model).sum())))
    return NextTokenPrediction(
        text=text,
        token_ids=tuple(indices.tolist()),
        tokens=tuple(model.tokenizer.decode([i]) for i in indices.tolist()),
        probs=tuple(values.tolist()),
    )
