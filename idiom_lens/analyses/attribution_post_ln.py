"""Direct logit attribution on a post-LN masked LM (BERT), read at the mask (issue 27).

In a pre-norm model the residual stream is a sum of what every component wrote, and freezing
the final norm's scale makes the logit linear in the pieces (`attribution`). BERT normalizes
after every sublayer (``x' = LN1(x + attn(x))``, ``x'' = LN2(x' + mlp(x'))``) and reads the
last layer through its MLM head (dense, GELU, LayerNorm, decoder). With every LayerNorm's scale
(``sqrt(var + eps)``) and the head's GELU gate (``gelu(h) / h``) frozen at their clean-run
values, the logit is again affine in what each component wrote, and the split is exact: a
LayerNorm ``y = g * C(u) / s + b`` (``C`` centers over d_model) becomes a linear map plus its
bias, so each component's piece is read through the product of every later norm.

The computation pulls the read-out direction back layer by layer: from the head to the last
layer's output (``r``), then through LN2 to the MLP's output (``p2 = C(g2 * r) / s2``), then
through LN1 to attention's output (``p1 = C(g1 * p2) / s1``), which is also the direction at the
layer's input. Pieces, each the dot product of what it wrote with its direction:

- ``embed``: the embedding block's output (word + position + token type, after its LayerNorm);
- a head: ``z_h W_O[h]``; a neuron: its GELU output times its value vector (``W_out`` row);
- ``attn_bias``: the attention output bias and LN1's bias; ``mlp_bias``: the MLP output bias
  and LN2's bias (a sublayer's biases, its norm's included);
- ``unembed_bias``: the head's constants (its dense bias through GELU and LayerNorm, the
  LayerNorm's bias, the decoder bias).

So ``embed + attn.sum() + mlp.sum() + unembed_bias`` is the model's own raw MLM logit (no
centering: BERT's logits are not compat logits), checked on every batch, as are the norms'
reconstruction of the captured residual stream and the heads' and neurons' sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel


@dataclass(frozen=True)
class PostLNWeights:
    """A BERT's weights as the attribution reads them (detached)."""

    W_O: list[Float[Tensor, "head d_head d_model"]]
    b_O: list[Float[Tensor, " d_model"]]
    W_out: list[Float[Tensor, "d_mlp d_model"]]  # value vectors
    b_out: list[Float[Tensor, " d_model"]]
    ln1: list[tuple[Tensor, Tensor, float]]  # (weight, bias, eps) of the norm after attention
    ln2: list[tuple[Tensor, Tensor, float]]  # ... after the MLP
    head_dense: tuple[Tensor, Tensor]  # the MLM head's dense (weight [out, in], bias)
    head_act: Any  # its activation (a module)
    head_ln: tuple[Tensor, Tensor, float]
    W_dec: Float[Tensor, "d_vocab d_model"]  # the decoder (tied word embeddings)
    b_dec: Float[Tensor, " d_vocab"]


def post_ln_weights(model: LoadedModel) -> PostLNWeights:
    """Read a `BertForMaskedLM`'s weights; `InputError` for any other masked LM."""
    hf = model.bridge.original_model
    if not (hasattr(hf, "bert") and hasattr(hf, "cls")):
        raise InputError(f"direct logit attribution on a masked LM reads BertForMaskedLM, got {type(hf).__name__}")
    n_heads = model.bridge.cfg.n_heads
    norm = lambda ln: (ln.weight.detach(), ln.bias.detach(), float(ln.eps))  # noqa: E731
    W_O, b_O, W_out, b_out, ln1, ln2 = [], [], [], [], [], []
    for layer in hf.bert.encoder.layer:
        dense = layer.attention.output.dense
        d_model = dense.weight.shape[0]
        W_O.append(dense.weight.detach().T.reshape(n_heads, d_model // n_heads, d_model))
        b_O.append(dense.bias.detach())
        W_out.append(layer.output.dense.weight.detach().T)
        b_out.append(layer.output.dense.bias.detach())
        ln1.append(norm(layer.attention.output.LayerNorm))
        ln2.append(norm(layer.output.LayerNorm))
    transform, decoder = hf.cls.predictions.transform, hf.cls.predictions.decoder
    bias = decoder.bias if decoder.bias is not None else hf.cls.predictions.bias
    return PostLNWeights(W_O, b_O, W_out, b_out, ln1, ln2,
                         (transform.dense.weight.detach(), transform.dense.bias.detach()), transform.transform_act_fn,
                         norm(transform.LayerNorm), decoder.weight.detach(), bias.detach())


def post_ln_hook_names(model: LoadedModel) -> list[str]:
    """What the attribution captures at the mask: each sublayer's own output (before its norm),
    the norms' inputs and outputs, the heads' z and the neurons' GELU outputs."""
    names = ["hook_embed"]
    for layer in range(model.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.attn.o.hook_out", f"blocks.{layer}.ln1.hook_in",
                  f"blocks.{layer}.ln1.hook_out", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.mlp.out.hook_out",
                  f"blocks.{layer}.ln2.hook_in", f"blocks.{layer}.ln2.hook_out"]
    return names


def _scale(u: Float[Tensor, "B d"], eps: float) -> Float[Tensor, "B 1"]:
    """A LayerNorm's scale on its input: sqrt(var + eps), as `torch.nn.LayerNorm` computes it."""
    return (u.var(-1, unbiased=False, keepdim=True) + eps).sqrt()


def _center(x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True)


def _layer_norm(u: Tensor, norm: tuple[Tensor, Tensor, float]) -> Tensor:
    weight, bias, eps = norm
    return weight * _center(u) / _scale(u, eps) + bias


def _pull_back(direction: Float[Tensor, "B k d"], weight: Tensor, scale: Float[Tensor, "B 1"]) -> Tensor:
    """The direction at a LayerNorm's input that reads what `direction` reads at its output, the
    scale frozen: the transpose of ``u -> weight * C(u) / scale`` (``C`` is symmetric)."""
    return _center(direction * weight) / scale[:, :, None]


def attribute_post_ln_batch(
    model: LoadedModel, w: PostLNWeights, batch: Any, pred: Tensor, other: Tensor
) -> dict[str, Any]:
    """All contributions of one forward batch at the mask to the logit of `pred` and its
    difference with `other`; every output's last axis is ``(logit, logit_diff)``, as
    `attribution._attribute_batch` returns them."""
    cap = {k: v.double() for k, v in batch.captured.items()}
    n_layers, n = model.n_layers, len(batch.indices)
    rows = torch.arange(n, device=batch.logits.device)
    final = batch.logits[rows, batch.last].float()
    logit = torch.stack([final[rows, pred], final[rows, pred] - final[rows, other]], dim=-1)
    dbl = lambda t: t.double()  # noqa: E731  (the pull-back runs in float64: exact to float32's noise)

    # The head, its LayerNorm's scale and GELU's gate frozen at the clean run: logit = r . x_L + const.
    x_last = cap[f"blocks.{n_layers - 1}.ln2.hook_out"]
    dense_w, dense_b = dbl(w.head_dense[0]), dbl(w.head_dense[1])
    h = x_last @ dense_w.T + dense_b
    act = w.head_act(h)
    gate = torch.where(h == 0, torch.full_like(h, 0.5), act / torch.where(h == 0, torch.ones_like(h), h))
    ln_w, ln_b, ln_eps = w.head_ln
    s_head = _scale(act, ln_eps)
    W_dec, b_dec = dbl(w.W_dec), dbl(w.b_dec)
    read_out: Float[Tensor, "B 2 d_model"] = torch.stack([W_dec[pred], W_dec[pred] - W_dec[other]], dim=1)
    q = _pull_back(read_out, dbl(ln_w), s_head) * gate[:, None, :]  # at the dense's output
    direction = torch.einsum("bko,oi->bki", q, dense_w)  # at the last layer's output
    head_const = (torch.einsum("bko,o->bk", q, dense_b) + torch.einsum("bkd,d->bk", read_out, dbl(ln_b))
                  + torch.stack([b_dec[pred], b_dec[pred] - b_dec[other]], dim=-1))

    def dot(x: Tensor, d: Tensor) -> Tensor:  # [B, d] or [d] with [B, 2, d] -> [B, 2]
        return torch.einsum("bd,bkd->bk", x.expand(n, -1), d)

    attn, mlp, heads, attn_bias, mlp_bias, neuron, acts = ([None] * n_layers for _ in range(7))
    resid_error = 0.0
    for layer in reversed(range(n_layers)):
        g1, b1, eps1 = (dbl(t) if isinstance(t, Tensor) else t for t in w.ln1[layer])
        g2, b2, eps2 = (dbl(t) if isinstance(t, Tensor) else t for t in w.ln2[layer])
        u1, u2 = cap[f"blocks.{layer}.ln1.hook_in"], cap[f"blocks.{layer}.ln2.hook_in"]
        for u, norm, out in ((u1, (g1, b1, eps1), f"blocks.{layer}.ln1.hook_out"),
                             (u2, (g2, b2, eps2), f"blocks.{layer}.ln2.hook_out")):
            resid_error = max(resid_error, float((_layer_norm(u, norm) - cap[out]).abs().max()))
        p2 = _pull_back(direction, g2, _scale(u2, eps2))  # at the MLP's output
        p1 = _pull_back(p2, g1, _scale(u1, eps1))  # at attention's output, and at the layer's input
        a_post = cap[f"blocks.{layer}.mlp.hook_post"]
        proj = torch.einsum("nd,bkd->bnk", dbl(w.W_out[layer]), p2)
        neuron[layer] = a_post[:, :, None] * proj
        acts[layer] = a_post
        mlp_bias[layer] = dot(dbl(w.b_out[layer]), p2) + dot(b2, direction)
        mlp[layer] = dot(cap[f"blocks.{layer}.mlp.out.hook_out"], p2) + dot(b2, direction)
        per_head = torch.einsum("bhe,hed->bhd", cap[f"blocks.{layer}.attn.hook_z"], dbl(w.W_O[layer]))
        heads[layer] = torch.einsum("bhd,bkd->bhk", per_head, p1)
        attn_bias[layer] = dot(dbl(w.b_O[layer]), p1) + dot(b1, p2)
        attn[layer] = dot(cap[f"blocks.{layer}.attn.o.hook_out"], p1) + dot(b1, p2)
        direction = p1
    embed = dot(cap["hook_embed"], direction)
    attn_t, mlp_t = torch.stack(attn, 1), torch.stack(mlp, 1)
    heads_t, neuron_t = torch.stack(heads, 1), torch.stack(neuron, 1)
    attn_bias_t, mlp_bias_t = torch.stack(attn_bias, 1), torch.stack(mlp_bias, 1)
    total = embed + attn_t.sum(1) + mlp_t.sum(1) + head_const
    checks = {
        "logit": float((total - logit.double()).abs().max()),
        "heads_vs_attn": float((heads_t.sum(2) + attn_bias_t - attn_t).abs().max()),
        "neurons_vs_mlp": float((neuron_t.sum(2) + mlp_bias_t - mlp_t).abs().max()),
        "resid": resid_error,
    }
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    return {
        "pred": pred.cpu(), "other": other.cpu(), "logit": cpu(logit), "embed": cpu(embed),
        "attn": cpu(attn_t), "mlp": cpu(mlp_t), "heads": cpu(heads_t), "attn_bias": cpu(attn_bias_t),
        "mlp_bias": cpu(mlp_bias_t), "unembed_bias": cpu(head_const), "neuron": cpu(neuron_t),
        "acts": cpu(torch.stack(acts, 1)), "checks": checks,
    }


def post_ln_promoted(w: PostLNWeights, keys: Sequence[tuple[int, int, int]], k: int, decode: Any,
                     valid: Tensor) -> dict[tuple[int, int, int], tuple[str, ...]]:
    """Top-`k` real tokens (`valid`: special and unused ones are never listed) each (layer, neuron,
    sign) value vector promotes, read through the decoder (BERT's tied word embeddings) alone: the
    later norms and the head's transform are skipped, as Geva et al. (2022) read value vectors
    through the embedding matrix."""
    if k <= 0 or not keys:
        return {key: () for key in keys}
    vecs = torch.stack([w.W_out[l][n] * s for l, n, s in keys])
    scores = (vecs @ w.W_dec.T).masked_fill(~valid.to(vecs.device), float("-inf"))
    top = scores.topk(k, dim=-1).indices
    return {key: tuple(decode([i]) for i in ids) for key, ids in zip(keys, top.tolist())}
