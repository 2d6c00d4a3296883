"""Tensor aliases used across idiom_lens, defined once (jaxtyping).

Dimension names: batch (probes), pos (token positions), layer, d_model, d_vocab, d_mlp, head.
"""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos d_vocab"]
LastLogits = Float[Tensor, "batch d_vocab"]
Residual = Float[Tensor, "batch d_model"]
TokenIds = Int[Tensor, " batch"]
Mask = Bool[Tensor, " batch"]

__all__ = ["Tokens", "AttentionMask", "Logits", "LastLogits", "Residual", "TokenIds", "Mask"]
