"""Neuron scores and rankings: value-vector norms, the post-MLP norm's gains, the clean run a probe's
knockouts share."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.interventions.knockouts.grid import RANKINGS, Positions, RankBy
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import PromptRunner, SuffixRunner, masked_prediction
from idiom_lens.models.vocab import mask_summary, valid_mask
from idiom_lens.types import HookFn


def value_vector_norms(model: LoadedModel) -> Float[Tensor, "layer d_mlp"]:
    """||W_out row|| of every neuron of every layer."""
    with torch.no_grad():
        return model.bridge.W_out.float().norm(dim=-1)


def rms_gain(norm: Any, model: LoadedModel, *, what: str) -> Float[Tensor, " d_model"]:
    """The per-feature gain g of an RMS-type norm module (y = x / s(x) * g), read off the module
    itself: a large constant input (s = its value) gives g; a random input checks that the module
    is a per-feature gain times one scale per position (else `InputError`)."""
    with torch.no_grad():
        g = norm(torch.full((1, 1, model.d_model), 1e3, device=model.device)).float().flatten()
        x = torch.randn(1, 1, model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device)
        y = norm(x).float().flatten()
        expected = x.flatten() * g
        expected = expected * (y.norm() / expected.norm())
    if float((y - expected).abs().max()) > 1e-4 * float(y.abs().max()):
        raise InputError(
            f"the {what} is not a per-feature gain times one scale (an RMSNorm): the effective ranking, "
            "the frozen norm and effective value vectors need one; use rank_by='magnitude', norm='live'"
        )
    return g


_GAINS: weakref.WeakKeyDictionary[object, Tensor | None] = weakref.WeakKeyDictionary()


def post_norm_gains(model: LoadedModel) -> Float[Tensor, "layer d_model"] | None:
    """The gain g of the norm applied to each MLP's output (`ln2_post`, Gemma's RMSNorm y = m / s * g,
    g = 1 + weight), read off the modules (`rms_gain`); None for models without one (GPT-2, Llama)."""
    bridge = model.bridge
    if bridge not in _GAINS:
        blocks = list(bridge.blocks)
        if all(hasattr(b, "ln2_post") for b in blocks):
            _GAINS[bridge] = torch.stack([rms_gain(b.ln2_post, model, what=f"layer {i}'s post-MLP norm")
                                          for i, b in enumerate(blocks)])
        else:
            _GAINS[bridge] = None
    return _GAINS[bridge]


def effective_value_norms(model: LoadedModel) -> Float[Tensor, "layer d_mlp"]:
    """||W_out row * g|| per neuron (the post-MLP norm's gain g; plain ||W_out row|| without one)."""
    gains = post_norm_gains(model)
    with torch.no_grad():
        w_out = model.bridge.W_out.float()
        return (w_out if gains is None else w_out * gains[:, None, :]).norm(dim=-1)


def neuron_scores(
    activations: Float[Tensor, "layer d_mlp"],
    model: LoadedModel,
    *,
    by: RankBy = "effective",
    pred_id: int | None = None,
    scale: Float[Tensor, " layer"] | None = None,
    norms: Float[Tensor, "layer d_mlp"] | None = None,
) -> Float[Tensor, "layer d_mlp"]:
    """Importance of every neuron at one position; higher = knocked out first.

    ``effective``: |activation| x ||value vector * g|| / s (s = `scale`, the post-norm's clean RMS per
    layer at that position; 1 without a post norm). ``magnitude``: |activation| x ||W_out row||.
    ``dla``: activation x (value vector * g / s) . W_U[:, pred] (final norm ignored: approximate).
    `norms` may pass precomputed `effective_value_norms` (effective) or `value_vector_norms` (magnitude).
    """
    scale = torch.ones(activations.shape[0]) if scale is None else scale.float()
    if by == "magnitude":
        norms = value_vector_norms(model) if norms is None else norms
        return activations.abs() * norms
    if by == "effective":
        norms = effective_value_norms(model) if norms is None else norms
        return activations.abs() * norms / scale[:, None]
    if by == "dla":
        if pred_id is None:
            raise InputError("rank_by='dla' needs the predicted token id")
        gains = post_norm_gains(model)
        with torch.no_grad():
            w_out = model.bridge.W_out.float()
            if gains is not None:
                w_out = w_out * gains[:, None, :]
            push = w_out @ model.bridge.W_U[:, pred_id].float()  # [layer, d_mlp]
        return activations * push / scale[:, None]
    raise InputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {by!r}")


@dataclass(frozen=True)
class _CleanState:
    """One probe's clean pass: the runner to replay it, the last-position activations, the post-norm
    scale (RMS of the MLP output) per layer at every position of a run, and the prediction."""

    runner: PromptRunner | SuffixRunner
    activations: Float[Tensor, "layer d_mlp"]
    scale: Float[Tensor, "layer pos"]  # positions of the runner's rows (1 with a prefix cache)
    pred_id: int
    pred_prob: float

    @property
    def last_scale(self) -> Float[Tensor, " layer"]:
        return self.scale[:, self.runner.last]


def _clean_state(model: LoadedModel, prompt_ids: Sequence[int], *, positions: Positions) -> _CleanState:
    """One clean run: activations at the last prompt position, post-norm scales, masked prediction."""
    n_layers = model.n_layers
    gains = post_norm_gains(model)
    acts: dict[int, Tensor] = {}
    norm_in: dict[int, Tensor] = {}
    scale: dict[int, Tensor] = {}

    def capture_act(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            acts[layer] = x[0, -1].detach().float().clone()

        return hook

    def capture_in(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            norm_in[layer] = x[0].detach().float().clone()

        return hook

    def capture_out(layer: int) -> HookFn:
        def hook(y: Tensor, hook: Any) -> None:  # s = ||m * g|| / ||y|| per position
            m = norm_in[layer]
            scale[layer] = (m * gains[layer]).norm(dim=-1) / y[0].detach().float().norm(dim=-1)

        return hook

    hooks = [(f"blocks.{i}.mlp.hook_post", capture_act(i)) for i in range(n_layers)]
    if gains is not None:
        hooks += [(f"blocks.{i}.ln2_post.hook_in", capture_in(i)) for i in range(n_layers)]
        hooks += [(f"blocks.{i}.ln2_post.hook_out", capture_out(i)) for i in range(n_layers)]
    if positions == "all":
        runner: PromptRunner | SuffixRunner = SuffixRunner(model, prompt_ids, capture=hooks)
        logits = runner.clean_logits
    else:
        runner = PromptRunner(model, prompt_ids, use_kv=True)
        logits = runner.run(1, hooks)[0]
    pred, prob = masked_prediction(logits, valid_mask(model))
    activations = torch.stack([acts[i] for i in range(n_layers)])
    if gains is None:
        scales = torch.ones(n_layers, runner.n_pos)
    else:
        scales = torch.stack([scale[i] for i in range(n_layers)])
    return _CleanState(runner, activations, scales, pred, prob)


@dataclass(frozen=True)
class NeuronRanking:
    """Per probe, the neuron activations and scores at the last prompt position."""

    probe_ids: tuple[str, ...]
    rank_by: str
    activations: Float[Tensor, "probe layer d_mlp"]
    scores: Float[Tensor, "probe layer d_mlp"]
    pred_ids: tuple[int, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int) -> Int[Tensor, "probe layer k"]:
        """Indices of the k highest-scoring neurons of every layer (ties: lower index first)."""
        order = self.scores.argsort(dim=-1, descending=True, stable=True)
        return order[..., : min(k, self.scores.shape[-1])]

    def to_dataframe(self, *, k: int = 10) -> pd.DataFrame:
        """The top-k neurons of every layer per probe (long format)."""
        top = self.top(k)
        rows = []
        for p, pid in enumerate(self.probe_ids):
            for layer in range(top.shape[1]):
                for rank, n in enumerate(top[p, layer].tolist()):
                    rows.append({
                        "probe_id": pid, "layer": layer, "rank": rank, "neuron": n,
                        "activation": float(self.activations[p, layer, n]),
                        "score": float(self.scores[p, layer, n]),
                    })
        return pd.DataFrame(rows)


def rank_neurons(
    model: LoadedModel, probes: Sequence[Probe], *, rank_by: RankBy = "effective", progress: bool = False
) -> NeuronRanking:
    """Rank every MLP neuron of every layer per probe at the last prompt position (clean pass)."""
    probes = check_probes(probes)
    if rank_by not in RANKINGS:
        raise InputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    norms = effective_value_norms(model) if rank_by == "effective" else value_vector_norms(model)
    acts, scores, preds = [], [], []
    probe_tokens = tokenize_probes(model, probes)
    PromptRunner(model, probe_tokens[0].prompt_ids, use_kv=True).self_check(what="neuron ranking", probe=probes[0].id)
    for toks in tqdm(probe_tokens, desc="rank neurons", disable=not progress):
        state = _clean_state(model, toks.prompt_ids, positions="last")
        acts.append(state.activations)
        scores.append(neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id,
                                    scale=state.last_scale, norms=norms if rank_by != "dla" else None))
        preds.append(state.pred_id)
    return NeuronRanking(
        tuple(p.id for p in probes), rank_by, torch.stack(acts), torch.stack(scores), tuple(preds),
        settings=model.settings() | mask_summary(model) | {"rank_by": rank_by},
    )
