"""The tolerances of the numeric tests, derived from fp32 rounding, not from what one CPU showed.

Two correct fp32 computations of the same quantity differ when they add in different orders:
another CPU's SIMD width or GEMM blocking (AVX2 vs AVX-512 vs AMX kernels), another batch shape
or padding, a prefix cache, another library's kernels (Hugging Face vs TransformerLens). Each
rounding is off by at most the unit roundoff u = 2^-24 of its result; over a sum of n terms the
errors add like a random walk, so one order is off by about sqrt(n) u M (M: the size of the
terms) and two orders differ by about sqrt(2 n) u M. A test allows SIGMAS = 4 standard deviations.

- `sum_atol(n, M)`: one sum or dot product of n terms of size up to M (e.g. a softmax normaliser
  over d_vocab probabilities: M = 1);
- `forward_rtol(model)`: anything a forward pass computes (residuals, logits), relative to its own
  scale: each block's widest accumulation (max(d_model, d_mlp) terms), over n_layers blocks, the
  blocks' errors adding as one walk of n_layers x width terms. On Gemma 3 270M (18 x 2048) that is
  6.5e-5 of the logits' scale; the worst fp32 noise seen over 120 bundled probes was 2.9e-6;
- `logit_atol(model, scale)`: forward_rtol times the logits' scale (their largest magnitude);
- `prob_atol(model, scale)`: when every logit moves by at most d, a probability moves by at most
  p (e^(2d) - 1), about 2d, and a log-probability by 2d; plus the normaliser's own sum over
  d_vocab terms. The same bound serves probabilities and log-probabilities;
- `entropy_atol(model, scale)`: H = -sum p log p moves by at most (2d + the normaliser's error)
  x (log d_vocab + 1).

A wrong fast path (a hook on the wrong position, an ignored cache) is off by 1 to 20 logits, four
orders of magnitude above these bounds, so the tests still catch it.

What is not an fp32 sum is compared otherwise: token ids and ranks exactly, except where a near
tie lets a correct computation reorder tokens, where the test allows the tie (`rank_slack`);
float64 statistics (bootstrap intervals, kappas, means of a few numbers) with pytest's default
approx (1e-6 relative, ten orders above float64 rounding of such short sums); copies and masks
with exact equality.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

U = 2.0**-24  # fp32 unit roundoff: the largest relative error of one rounding
SIGMAS = 4.0  # standard deviations of the rounding walk a test allows


def sum_atol(n_terms: int, magnitude: float = 1.0) -> float:
    """Largest difference between two fp32 sums of the same `n_terms` terms of size up to
    `magnitude`, added in different orders."""
    return SIGMAS * math.sqrt(2 * max(int(n_terms), 1)) * U * float(magnitude)


def _cfg(model: Any) -> Any:
    return model.bridge.cfg


def _width(model: Any) -> int:
    cfg = _cfg(model)
    return max(int(cfg.d_model), int(getattr(cfg, "d_mlp", None) or cfg.d_model))


def _scale(scale: float | torch.Tensor | np.ndarray) -> float:
    if isinstance(scale, torch.Tensor):
        scale = float(scale.detach().float().abs().max())
    elif isinstance(scale, np.ndarray):
        scale = float(np.abs(scale).max())
    return max(float(scale), 1.0)


def forward_rtol(model: Any, *, n_layers: int | None = None) -> float:
    """Relative difference of two correct fp32 forward passes (through `n_layers` blocks, default
    all) of `model`, from different kernels, batch shapes or libraries."""
    depth = int(_cfg(model).n_layers) if n_layers is None else n_layers
    return sum_atol(max(depth, 1) * _width(model))


def logit_atol(model: Any, scale: float | torch.Tensor | np.ndarray, *, n_layers: int | None = None) -> float:
    """Largest difference of logits (or residuals) of size up to `scale` (a number, or the values
    to take their largest magnitude from); `n_layers`: blocks the two computations went through."""
    return forward_rtol(model, n_layers=n_layers) * _scale(scale)


def prob_atol(model: Any, scale: float | torch.Tensor | np.ndarray, *, n_layers: int | None = None) -> float:
    """Largest difference of probabilities or log-probabilities read from logits of size up to `scale`."""
    return 2 * logit_atol(model, scale, n_layers=n_layers) + sum_atol(int(_cfg(model).d_vocab))


def entropy_atol(model: Any, scale: float | torch.Tensor | np.ndarray, *, n_layers: int | None = None) -> float:
    """Largest difference of entropies (nats) read from logits of size up to `scale`."""
    return prob_atol(model, scale, n_layers=n_layers) * (math.log(int(_cfg(model).d_vocab)) + 1)


def logit_scale(model: Any, tokens: list[int]) -> float:
    """The largest |logit| of `model` at the last position of `tokens` (one plain forward)."""
    with torch.no_grad():
        return float(model.bridge(torch.tensor([list(tokens)]))[0, -1].abs().max())


def rank_slack(logits: torch.Tensor, token: int, atol: float) -> int:
    """How many other tokens' logits lie within `atol` of `token`'s: the most a correct computation
    may move `token`'s rank by (masked tokens, at -inf, never count)."""
    logits = logits.detach().float()
    gap = (logits - logits[token]).abs()
    return int((gap <= atol).sum()) - 1


def assert_ranks_agree(a: Any, b: Any, slack: Any) -> None:
    """Ranks `a` and `b` equal, except by at most `slack` (near ties, `rank_slack`) where they differ."""
    a, b, slack = (np.asarray(x) for x in (a, b, slack))
    bad = np.abs(a - b) > slack
    assert not bad.any(), (
        f"ranks differ beyond their near ties at {np.argwhere(bad).tolist()}: "
        f"{a[bad].tolist()} vs {b[bad].tolist()} (ties {slack[bad].tolist()})")


def probes_prob_atol(model: Any, probes: Any) -> float:
    """`prob_atol` for probabilities read from `model`'s logits on `probes` (their largest logit)."""
    from idiom_lens.models.forward import tokenize_probes

    return prob_atol(model, max(logit_scale(model, t.prompt_ids) for t in tokenize_probes(model, list(probes))))
