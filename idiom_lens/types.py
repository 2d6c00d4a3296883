"""Types used across idiom_lens, defined once (jaxtyping tensor aliases, the hook function type).

Dimension names: batch (probes), pos (token positions), d_vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxtyping import Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos d_vocab"]
# A TransformerLens forward hook: (activation, hook point) -> a replacement activation, or None.
HookFn = Callable[[Tensor, Any], Tensor | None]

__all__ = ["HookFn", "Logits", "Tokens"]
