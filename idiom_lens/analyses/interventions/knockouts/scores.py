"""Neuron scores and rankings: value-vector norms, the post-MLP norm's gains, the clean run a probe's
knockouts share."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from idiom_lens.models.loading import LoadedModel, require_causal
from idiom_lens.models.runners import PromptRunner, SuffixRunner, masked_prediction
from idiom_lens.models.selfcheck import check_against_full_forward
from idiom_lens.models.tokenization import ProbeTokens, pad_id, right_pad
from idiom_lens.models.vocab import mask_summary, valid_mask
from idiom_lens.types import HookFn

MEAN_REFERENCE = "text"  # the bundled ordinary-text set: the reference of a mean ablation


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


def effective_value_vectors(model: LoadedModel) -> Float[Tensor, "layer d_mlp d_model"]:
    """W_out row * g per neuron (the post-MLP norm's gain g; plain W_out rows without one): what a
    unit of activation writes into the residual stream, before the post-norm's 1 / s."""
    gains = post_norm_gains(model)
    with torch.no_grad():
        w_out = model.bridge.W_out.float()
        return w_out if gains is None else w_out * gains[:, None, :]


def effective_value_norms(model: LoadedModel) -> Float[Tensor, "layer d_mlp"]:
    """||W_out row * g|| per neuron (the post-MLP norm's gain g; plain ||W_out row|| without one)."""
    return effective_value_vectors(model).norm(dim=-1)


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

    ``effective`` (ours): |activation| x ||value vector * g|| / s (s = `scale`, the post-norm's clean
    RMS per layer at that position; 1 without a post norm), the norm of what the neuron writes into
    the residual stream. ``magnitude`` (the authors', Haviv et al. 2023): |m| x ||v||, activation
    times the raw value vector's norm ||W_out row||, the post-MLP norm ignored.
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
    scale (RMS of the MLP output) per layer at every position of a run, each MLP layer's output as
    written into the residual stream (`hook_mlp_out`: after the post-MLP norm where there is one)
    at the last position, and the prediction."""

    runner: PromptRunner | SuffixRunner
    activations: Float[Tensor, "layer d_mlp"]
    scale: Float[Tensor, "layer pos"]  # positions of the runner's rows (1 with a prefix cache)
    pred_id: int
    pred_prob: float
    outputs: Float[Tensor, "layer d_model"]

    @property
    def last_scale(self) -> Float[Tensor, " layer"]:
        return self.scale[:, self.runner.last]


def _clean_state(model: LoadedModel, toks: ProbeTokens, *, positions: Positions) -> _CleanState:
    """One clean run: activations at the read position (the last prompt token; a masked LM's mask),
    post-norm scales, masked prediction."""
    n_layers = model.n_layers
    gains = post_norm_gains(model)
    acts: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}
    norm_in: dict[int, Tensor] = {}
    scale: dict[int, Tensor] = {}

    read = -1 - len(toks.suffix_ids)  # the read position, counted from the end of a run

    def capture_act(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            acts[layer] = x[0, read].detach().float().clone()

        return hook

    def capture_output(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            outs[layer] = x[0, read].detach().float().clone()

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
    hooks += [(f"blocks.{i}.hook_mlp_out", capture_output(i)) for i in range(n_layers)]
    if gains is not None:
        hooks += [(f"blocks.{i}.ln2_post.hook_in", capture_in(i)) for i in range(n_layers)]
        hooks += [(f"blocks.{i}.ln2_post.hook_out", capture_out(i)) for i in range(n_layers)]
    if positions == "all":
        runner: PromptRunner | SuffixRunner = SuffixRunner(model, toks.prompt_ids, capture=hooks,
                                                           suffix_ids=toks.suffix_ids)
        logits = runner.clean_logits
    else:
        runner = PromptRunner(model, toks.prompt_ids, use_kv=True, suffix_ids=toks.suffix_ids)
        logits = runner.run(1, hooks)[0]
    pred, prob = masked_prediction(logits, valid_mask(model))
    activations = torch.stack([acts[i] for i in range(n_layers)])
    if gains is None:
        scales = torch.ones(n_layers, runner.n_pos)
    else:
        scales = torch.stack([scale[i] for i in range(n_layers)])
    outputs = torch.stack([outs[i] for i in range(n_layers)])
    return _CleanState(runner, activations, scales, pred, prob, outputs)


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
    first = probe_tokens[0]
    PromptRunner(model, first.prompt_ids, use_kv=True, suffix_ids=first.suffix_ids).self_check(
        what="neuron ranking", probe=probes[0].id)
    for toks in tqdm(probe_tokens, desc="rank neurons", disable=not progress):
        state = _clean_state(model, toks, positions="last")
        acts.append(state.activations)
        scores.append(neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id,
                                    scale=state.last_scale, norms=norms if rank_by != "dla" else None))
        preds.append(state.pred_id)
    return NeuronRanking(
        tuple(p.id for p in probes), rank_by, torch.stack(acts), torch.stack(scores), tuple(preds),
        settings=model.settings() | mask_summary(model) | {"rank_by": rank_by},
    )


@dataclass(frozen=True)
class MeanActivations:
    """Each MLP neuron's mean activation (`mlp.hook_post`) over a reference set of prompts, every
    position but the BOS token's: the values a mean ablation (``ablation="mean"``) sets knocked-out
    neurons to, so that a knockout removes what the neurons carry beyond their usual level."""

    means: Float[Tensor, "layer d_mlp"]
    reference: str  # "text" (`load_probes("text")`) or "custom"
    n_prompts: int
    n_positions: int

    def describe(self) -> dict[str, Any]:
        """The reference as plain values (settings)."""
        return {"reference": self.reference, "n_prompts": self.n_prompts, "n_positions": self.n_positions,
                "positions": "every position but BOS", "site": "mlp.hook_post"}

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer and neuron: the mean activation."""
        n_layers, d_mlp = self.means.shape
        return pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d_mlp), "neuron": np.tile(np.arange(d_mlp),
                             n_layers), "mean": self.means.double().flatten().numpy()})


_MEANS: weakref.WeakKeyDictionary[object, MeanActivations] = weakref.WeakKeyDictionary()


def mean_activations(
    model: LoadedModel, probes: Sequence[Probe] | None = None, *, batch_size: int = 32,
) -> MeanActivations:
    """Mean `mlp.hook_post` of every layer over the prompts of `probes` (None: the bundled ordinary
    text, `load_probes("text")`), every position but the first when it is the BOS token.

    Prompts run right-padded in batches of `batch_size` (causal attention: padding never reaches
    a real position); the first batch's shortest and longest rows are checked against a plain full
    forward (`FastPathError`). The default reference is computed once per model and kept in memory
    while the model lives (a mean ablation in several calls or parts reuses it)."""
    from idiom_lens.datasets import load_probes

    require_causal(model, "mean ablation (its reference means run right-padded batches)")
    bridge = model.bridge
    if probes is None and bridge in _MEANS:
        return _MEANS[bridge]
    reference = MEAN_REFERENCE if probes is None else "custom"
    probes = check_probes(load_probes(MEAN_REFERENCE) if probes is None else probes)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    bos = model.tokenizer.bos_token_id
    prompts = sorted((t.prompt_ids for t in tokenize_probes(model, probes)), key=len)
    n_layers, d_mlp = model.n_layers, int(bridge.cfg.d_mlp)
    sums = torch.zeros(n_layers, d_mlp, dtype=torch.float64)
    count = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens, last = right_pad(batch, pad_id=pad_id(model.tokenizer))
        keep = torch.arange(tokens.shape[1])[None, :] <= last[:, None]  # real positions
        if bos is not None:
            keep[:, 0] &= tokens[:, 0] != bos  # not the BOS token
        count += int(keep.sum())

        def add(layer: int, keep: Tensor = keep) -> HookFn:
            def hook(x: Tensor, hook: Any) -> None:
                sums[layer] += x.detach().double().cpu()[keep].sum(0)

            return hook

        hooks = [(f"blocks.{i}.mlp.hook_post", add(i)) for i in range(n_layers)]
        with torch.no_grad():
            logits = bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=hooks)
        if start == 0:
            for row in sorted({0, len(batch) - 1}):
                check_against_full_forward(model, batch[row], logits[row, last[row]],
                                           what="mean activations (batched, padded)", probe=f"#{row}")
    if count == 0:
        raise InputError("the reference prompts have no position besides BOS")
    result = MeanActivations((sums / count).float(), reference, len(prompts), count)
    if reference == MEAN_REFERENCE:
        _MEANS[bridge] = result
    return result
