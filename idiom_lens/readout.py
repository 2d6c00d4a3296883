"""The logit-lens kernel: read residual-stream vectors through the model's own final norm and
unembedding, keeping only the statistics the analyses need.

It computes the same thing as TransformerLens's `tools.analysis.logit_readout` (ln_final, W_U,
b_U, the adapter's output transform such as Gemma's softcap), which the tests check, but tracks
several per-row tokens in one pass over the vocabulary (the predicted and the target token), and
works in row chunks so at most `chunk_rows x d_vocab` logits exist at once (262,144 columns for
Gemma 3: 128 rows are 128 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from idiom_lens.errors import InputError
from idiom_lens.models import LoadedModel


@dataclass(frozen=True)
class Readout:
    """Per-row statistics of the read-out distribution."""

    top_id: Int[Tensor, " n"]  # argmax token
    entropy: Float[Tensor, " n"]  # nats
    logprob: Float[Tensor, "n k"]  # log-probability of each tracked token
    rank: Int[Tensor, "n k"]  # 0 = top-1: number of tokens with a strictly larger logit


def read_out(
    model: LoadedModel,
    vectors: Float[Tensor, "n d_model"],
    tracked: Int[Tensor, "n k"],
    *,
    apply_norm: bool = True,
    chunk_rows: int = 128,
) -> Readout:
    """Read each row of `vectors` through ln_final -> unembed -> output transform."""
    bridge = model.bridge
    if vectors.ndim != 2 or vectors.shape[1] != model.d_model:
        raise InputError(f"vectors must be [n, {model.d_model}], got {tuple(vectors.shape)}")
    if tracked.ndim != 2 or tracked.shape[0] != vectors.shape[0]:
        raise InputError(f"tracked must be [n, k] with n={vectors.shape[0]}, got {tuple(tracked.shape)}")
    W_U, b_U = bridge.W_U, bridge.b_U
    transform = getattr(bridge.adapter, "apply_output_logits_transform", None)
    tops, ents, lps, ranks = [], [], [], []
    with torch.no_grad():
        for start in range(0, vectors.shape[0], chunk_rows):
            x = vectors[start : start + chunk_rows].to(W_U.device, W_U.dtype)
            ids = tracked[start : start + chunk_rows].to(W_U.device)
            if apply_norm:
                x = bridge.ln_final(x.unsqueeze(0)).squeeze(0)
            logits = x @ W_U
            if b_U is not None:
                logits = logits + b_U
            if callable(transform):
                logits = transform(logits)
            logits = logits.float()
            top_val, top_id = logits.max(dim=-1)
            shifted = torch.sub(logits, top_val[:, None]).exp_()  # softmax numerators
            z = shifted.sum(dim=-1)
            log_z = z.log() + top_val
            # entropy = log Z - E_p[logit]
            ents.append(log_z - torch.linalg.vecdot(shifted, logits) / z)
            del shifted
            picked = logits.gather(1, ids)
            lps.append(picked - log_z[:, None])
            greater = torch.empty(logits.shape, dtype=torch.bool, device=logits.device)
            ranks.append(
                torch.stack(
                    [
                        torch.gt(logits, picked[:, j : j + 1], out=greater)
                        .view(torch.uint8)
                        .sum(dim=-1, dtype=torch.int64)
                        for j in range(ids.shape[1])
                    ],
                    dim=1,
                )
            )
            tops.append(top_id)
    return Readout(
        top_id=torch.cat(tops).cpu(),
        entropy=torch.cat(ents).cpu(),
        logprob=torch.cat(lps).cpu(),
        rank=torch.cat(ranks).cpu(),
    )
