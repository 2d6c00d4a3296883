"""Per-component direct logit attribution (DLA) at the last prompt position (method.md section 6).

For each probe, the residual stream entering the unembedding is a sum of what every component
wrote: the embedding, every attention layer (a sum of heads, plus an output bias), every MLP
layer (a sum of neurons: activation x value vector, plus an output bias). With the final norm's
scale frozen at its clean-run value (`ln_final.hook_scale`, as usual in DLA), the logit is linear
in those pieces, so each piece's contribution is ``piece / scale_final . W_U[:, token]``.
A post-LN masked LM (BERT) is read at the mask, in raw mode, with every norm frozen
(`attribution_post_ln`); its results have the same shape.

What "the logit" is: the model's own final logit of the predicted token in **compatibility
mode** (`load_model(..., mode="compat")`: final-norm weight folded into ``W_U``, ``W_U`` centered
over the vocabulary). A compat logit is the raw logit minus the mean logit over the vocabulary at
that position; logit differences are identical in both modes. Every component is attributed to
both the predicted token's logit and the logit difference between the predicted token and a
second token: the target when the prediction misses it, else the runner-up.

Post-sublayer norms (Gemma 2/3: ``ln1_post``, ``ln2_post``): the block adds
``ln_post(sublayer_out)`` to the residual, so ``hook_attn_out`` / ``hook_mlp_out`` are already
the post-normed values. A head's (or neuron's) piece of it is its pre-norm output times the
post-norm's frozen scale and weight: ``(z_h W_O[h]) / s_post * w_post``. TransformerLens's
``ActivationCache.stack_head_results`` / ``stack_neuron_results`` stop before that norm (their
heads sum to ``attn.hook_out``, not ``hook_attn_out``), so we apply it here; the tests check that
heads (+ attention bias) sum to their layer's contribution and neurons (+ MLP bias) to theirs, on
Gemma 3 (post norms with non-trivial weights) and Llama (none), and compare with TransformerLens's
own `direct_logit_attribution` where it applies.

Cost: one batched forward pass per batch of probes (shared by all probes of the batch); hooks keep
only the last prompt position; neurons are contracted with the unembedding directions before
being multiplied by their activations, so no ``[batch, pos, d_mlp, d_model]`` tensor exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from idiom_lens.analyses.attribution_post_ln import (
    attribute_post_ln_batch,
    post_ln_hook_names,
    post_ln_promoted,
    post_ln_weights,
)
from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import Saved, SavedTables, decode_array, encode_array, records_from_frame
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.models.forward import iterate_forward, tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.tokenization import ProbeTokens, encode_prompt
from idiom_lens.models.vocab import valid_mask

Measure = Literal["logit", "logit_diff"]
MEASURES: tuple[Measure, ...] = ("logit", "logit_diff")
NeuronRank = Literal["logit", "logit_diff", "abs_logit"]
EMBED_LAYER = -1  # the embedding is written before layer 0
FRAME_COLUMNS = [
    "probe_id", "kind", "group", "memorized", "layer", "component", "sublayer", "head", "neuron",
    "contribution", "contribution_diff", "activation",
]


# --------------------------------------------------------------------------------------
# Result objects
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronAttribution:
    """One MLP neuron's direct effect (per probe, or the mean over a probe set)."""

    layer: int
    neuron: int
    activation: float  # mlp.hook_post at the last prompt position (set: mean)
    contribution: float  # to the predicted token's logit (set: mean)
    contribution_diff: float  # to the logit difference (set: mean)
    promoted: tuple[str, ...] = ()  # tokens sign(activation) x value vector promotes most (Geva et al. 2022)


@dataclass(frozen=True)
class ProbeAttribution:
    """Direct logit attribution of one probe's prediction.

    Every tensor's last axis is ``(logit, logit_diff)``: the contribution to the predicted token's
    (compat) logit and to ``logit[pred] - logit[other]``.
    """

    probe_id: str
    kind: str
    group: str
    memorized: bool | None  # None when no target was given
    prompt: str
    target: str | None
    target_id: int | None
    pred_id: int
    pred_token: str
    other_id: int
    other_token: str
    other_is: Literal["target", "runner_up"]
    logit: float  # the model's own final (compat, centered) logit of pred_id
    logit_diff: float  # the model's own logit[pred] - logit[other]
    embed: Float[Tensor, "2"]  # token (+ positional) embedding  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    attn: Float[Tensor, "layer 2"]  # hook_attn_out of each layer
    mlp: Float[Tensor, "layer 2"]  # hook_mlp_out of each layer
    heads: Float[Tensor, "layer head 2"]
    attn_bias: Float[Tensor, "layer 2"]  # b_O through the post-norm (attn - sum of heads)
    mlp_bias: Float[Tensor, "layer 2"]  # b_out through the post-norm (mlp - sum of neurons)
    unembed_bias: Float[Tensor, "2"]  # b_U[pred] (- b_U[other])  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    top_neurons: tuple[NeuronAttribution, ...]

    @property
    def n_layers(self) -> int:
        return int(self.attn.shape[0])

    def reconstructed(self) -> Float[Tensor, "2"]:  # noqa: UP037 (a jaxtyping shape, not a forward reference)
        """embed + attention layers + MLP layers + unembedding bias: equals (logit, logit_diff)."""
        return self.embed + self.attn.sum(0) + self.mlp.sum(0) + self.unembed_bias

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy rows: embed, attn/mlp per layer, heads, biases, top neurons."""
        base = {"probe_id": self.probe_id, "kind": self.kind, "group": self.group, "memorized": self.memorized}
        rows: list[dict[str, Any]] = []

        def add(layer: int, component: str, sublayer: str | None, values: Tensor, *, head=None, neuron=None, act=None):
            rows.append(base | {
                "layer": layer, "component": component, "sublayer": sublayer, "head": head,
                "neuron": neuron, "contribution": float(values[0]), "contribution_diff": float(values[1]),
                "activation": act,
            })

        add(EMBED_LAYER, "embed", None, self.embed)
        for layer in range(self.n_layers):
            add(layer, "attn", "attn", self.attn[layer])
            for head in range(self.heads.shape[1]):
                add(layer, "head", "attn", self.heads[layer, head], head=head)
            add(layer, "bias", "attn", self.attn_bias[layer])
            add(layer, "mlp", "mlp", self.mlp[layer])
            add(layer, "bias", "mlp", self.mlp_bias[layer])
        add(self.n_layers, "bias", "unembed", self.unembed_bias)
        for n in self.top_neurons:
            add(n.layer, "neuron", "mlp", torch.tensor([n.contribution, n.contribution_diff]),
                neuron=n.neuron, act=n.activation)
        frame = pd.DataFrame(rows, columns=FRAME_COLUMNS)
        return frame.astype({"head": "Int64", "neuron": "Int64", "activation": "float64", "memorized": "boolean"})

    def neurons_dataframe(self) -> pd.DataFrame:
        return _neurons_frame(self.top_neurons, {"probe_id": self.probe_id, "group": self.group})


# The per-probe tensors `AttributionResult.save` stores exactly (dtype, shape, bytes).
_SAVED_TENSORS = ("embed", "attn", "mlp", "heads", "attn_bias", "mlp_bias", "unembed_bias")
_TENSOR_COLUMNS = ["scope", "probe_index", "group", "field", "dtype", "shape", "data"]
_TOP_NEURON_COLUMNS = ["scope", "probe_index", "group", "rank", "layer", "neuron", "activation", "contribution",
                       "contribution_diff", "promoted"]


@dataclass(frozen=True)
class AttributionResult(Saved):
    """Direct logit attribution of a probe set on one model, with the settings used.

    `set_neurons[group]` holds the top neurons of each comparison set ranked by their mean
    contribution over the set's probes; `neuron_means[group]` the full ``[layer, d_mlp, 2]`` means.
    `checks` holds the largest absolute error of each sum invariant seen during the run.

    Saved (`save`/`load`) as `attribution_probes.parquet` (one row per probe),
    `attribution_tensors.parquet` (every per-probe tensor and set mean, exact: dtype, shape, bytes;
    scope "probe" with the probe's position, or "set" with its group), `attribution_top_neurons.parquet`
    (top neurons per probe and per set, promoted tokens as lists), the descriptor, and for readers
    `attribution.parquet` and `attribution_neurons.parquet` (as `to_parquet` writes them).
    """

    probes: tuple[ProbeAttribution, ...]
    set_neurons: dict[str, tuple[NeuronAttribution, ...]]
    neuron_means: dict[str, Float[Tensor, "layer d_mlp 2"]]
    group_counts: dict[str, int]
    checks: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.probes)

    @property
    def n_layers(self) -> int:
        return self.probes[0].n_layers if self.probes else int(self.settings.get("n_layers", 0))

    def to_dataframe(self) -> pd.DataFrame:
        """All probes' tidy rows (see `ProbeAttribution.to_dataframe`)."""
        if not self.probes:
            return pd.DataFrame(columns=FRAME_COLUMNS)
        return pd.concat([p.to_dataframe() for p in self.probes], ignore_index=True)

    def probes_dataframe(self) -> pd.DataFrame:
        """One row per probe: prediction, contrast token, and the model's own logit / diff."""
        keys = ["probe_id", "kind", "group", "memorized", "prompt", "target", "target_id", "pred_id",
                "pred_token", "other_id", "other_token", "other_is", "logit", "logit_diff"]
        frame = pd.DataFrame([{k: getattr(p, k) for k in keys} for p in self.probes], columns=keys)
        return frame.astype({"target_id": "Int64", "memorized": "boolean"})

    def neurons_dataframe(self) -> pd.DataFrame:
        """Top neurons per probe (scope "probe") and per set (scope "set", means)."""
        parts = [p.neurons_dataframe().assign(scope="probe") for p in self.probes]
        parts += [_neurons_frame(ns, {"probe_id": None, "group": g}).assign(scope="set")
                  for g, ns in self.set_neurons.items()]
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else _neurons_frame((), {}).assign(scope=[])

    default_name = "attribution"

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        tensors = [
            {"scope": "probe", "probe_index": i, "group": None, "field": name,
             **encode_array(getattr(p, name).detach().cpu().numpy())}
            for i, p in enumerate(self.probes) for name in _SAVED_TENSORS
        ] + [
            {"scope": "set", "probe_index": -1, "group": g, "field": "neuron_means",
             **encode_array(m.detach().cpu().numpy())}
            for g, m in self.neuron_means.items()
        ]
        owners = [("probe", i, None, p.top_neurons) for i, p in enumerate(self.probes)]
        owners += [("set", -1, g, ns) for g, ns in self.set_neurons.items()]
        neurons = [
            {"scope": scope, "probe_index": i, "group": g, "rank": rank, "layer": n.layer, "neuron": n.neuron,
             "activation": n.activation, "contribution": n.contribution, "contribution_diff": n.contribution_diff,
             "promoted": list(n.promoted)}
            for scope, i, g, ns in owners for rank, n in enumerate(ns)
        ]
        return {
            "probes": self.probes_dataframe(),
            "tensors": pd.DataFrame(tensors, columns=_TENSOR_COLUMNS),
            "top_neurons": pd.DataFrame(neurons, columns=_TOP_NEURON_COLUMNS),
        }

    def derived_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.to_dataframe(), "neurons": self.neurons_dataframe()}

    def saved_meta(self) -> dict[str, Any]:
        return {"set_groups": list(self.set_neurons), "group_counts": [[g, n] for g, n in self.group_counts.items()],
                "checks": [[k, v] for k, v in self.checks.items()]}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> AttributionResult:
        tensors, top = saved.tables["tensors"], saved.tables["top_neurons"]
        per_probe: dict[int, dict[str, Any]] = {}
        neuron_means: dict[str, Tensor] = {}
        for row in tensors.itertuples(index=False):
            value = torch.from_numpy(decode_array(row.dtype, row.shape, row.data))
            if row.scope == "probe":
                per_probe.setdefault(int(row.probe_index), {})[str(row.field)] = value
            else:
                neuron_means[str(row.group)] = value
        lists: dict[tuple[str, Any], list[NeuronAttribution]] = {}
        for row in top.itertuples(index=False):  # written per owner in rank order
            key = ("probe", int(row.probe_index)) if row.scope == "probe" else ("set", str(row.group))
            lists.setdefault(key, []).append(NeuronAttribution(
                int(row.layer), int(row.neuron), float(row.activation), float(row.contribution),
                float(row.contribution_diff), tuple(str(t) for t in row.promoted)))
        frame = saved.tables["probes"]
        extra = [per_probe.get(i, {}) | {"top_neurons": tuple(lists.get(("probe", i), ()))} for i in range(len(frame))]
        meta = saved.meta
        return cls(
            probes=records_from_frame(ProbeAttribution, frame, extra=extra),
            set_neurons={g: tuple(lists.get(("set", g), ())) for g in meta["set_groups"]},
            neuron_means=neuron_means, group_counts=dict(meta["group_counts"]), checks=dict(meta["checks"]),
            settings=saved.settings,
        )


def _neurons_frame(neurons: Sequence[NeuronAttribution], base: dict[str, Any]) -> pd.DataFrame:
    cols = ["probe_id", "group", "rank", "layer", "neuron", "activation", "contribution", "contribution_diff",
            "promoted"]
    rows = [base | asdict(n) | {"rank": i, "promoted": " | ".join(n.promoted)} for i, n in enumerate(neurons)]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def attribute_probe(
    model: LoadedModel,
    prompt: str,
    target: str | None = None,
    *,
    kind: str = "idiom",
    top_neurons: int = 20,
    promoted_tokens: int = 5,
    value_vector_final_norm: bool = True,
    rank_neurons_by: NeuronRank = "logit",
) -> ProbeAttribution:
    """Attribute the model's next-token prediction after `prompt` (notebook use).

    With `target` (one word), the contrast token is the target's first sub-word when the
    prediction misses it, else the runner-up; without it, always the runner-up.
    """
    _check_model(model)
    if target is None:
        if model.masked:
            raise InputError("a masked LM is read at a [MASK] in place of the last word: give `target`")
        toks = ProbeTokens(prompt_ids=encode_prompt(model.tokenizer, prompt), target_ids=(), has_bos=False)
        probe = Probe(id="probe", prompt=prompt, target="", kind="text")
        return _run(model, [probe], [toks], [None], batch_size=1, top_neurons=top_neurons,
                    promoted_tokens=promoted_tokens, value_vector_final_norm=value_vector_final_norm,
                    rank_neurons_by=rank_neurons_by, progress=False).probes[0]
    probe = Probe(id="probe", prompt=prompt, target=target, kind=kind)  # type: ignore[arg-type]
    return attribute_probes(model, [probe], batch_size=1, top_neurons=top_neurons, promoted_tokens=promoted_tokens,
                            value_vector_final_norm=value_vector_final_norm, rank_neurons_by=rank_neurons_by).probes[0]


def attribute_probes(
    model: LoadedModel,
    probes: Sequence[Probe],
    *,
    batch_size: int = 16,
    top_neurons: int = 20,
    promoted_tokens: int = 5,
    value_vector_final_norm: bool = True,
    rank_neurons_by: NeuronRank = "logit",
    progress: bool = False,
) -> AttributionResult:
    """Direct logit attribution for every probe, one shared forward pass per batch.

    `top_neurons`: neurons kept per probe and per set; `promoted_tokens`: how many tokens to list
    per top neuron (0 skips the value-vector projection); `value_vector_final_norm`: whether that
    projection reads the value vector through the final norm's weight (True: the compat ``W_U``,
    into which the weight is folded) or through the bare unembedding; `rank_neurons_by`: the
    contribution that orders neurons ("abs_logit" = by magnitude).

    Raises `InputError` when `probes` is empty.
    """
    _check_model(model)
    probes = list(probes)
    if not probes:
        raise InputError("probes is empty: expected at least one probe")
    probe_tokens = tokenize_probes(model, probes)
    return _run(model, probes, probe_tokens, [t.target_id for t in probe_tokens], batch_size=batch_size,
                top_neurons=top_neurons, promoted_tokens=promoted_tokens,
                value_vector_final_norm=value_vector_final_norm, rank_neurons_by=rank_neurons_by,
                progress=progress)


# --------------------------------------------------------------------------------------
# Validation and model facts
# --------------------------------------------------------------------------------------


def _check_model(model: LoadedModel) -> None:
    if model.masked:  # post-LN BERT, read in raw mode (`attribution_post_ln`)
        post_ln_weights(model)
        return
    bridge = model.bridge
    if model.mode != "compat" or not getattr(bridge, "compatibility_mode", False):
        raise InputError(
            f"direct logit attribution needs a model loaded in compatibility mode (folded norms), "
            f"got mode={model.mode!r}: use load_model(spec, mode='compat')"
        )
    weight = getattr(bridge.ln_final, "weight", None)
    if isinstance(weight, Tensor):
        identity = (torch.zeros_like(weight) if getattr(bridge.cfg, "rmsnorm_uses_offset", False)
                    else torch.ones_like(weight))
        if not torch.equal(weight, identity):
            raise InputError("the model's final norm weight is not folded into W_U: load it with mode='compat'")
    if bridge.cfg.normalization_type not in ("RMS", "RMSPre", "LN", "LNPre"):
        raise InputError(f"unsupported normalization {bridge.cfg.normalization_type!r} for attribution")


@dataclass(frozen=True)
class _Weights:
    """Per-layer weights read once per run (detached)."""

    W_O: list[Float[Tensor, "head d_head d_model"]]
    b_O: list[Float[Tensor, " d_model"] | None]
    W_out: list[Float[Tensor, "d_mlp d_model"]]  # post-norm weight folded in (the written direction)
    b_out: list[Float[Tensor, " d_model"] | None]  # post-norm weight folded in
    attn_post: list[bool]
    mlp_post: list[bool]
    W_U: Float[Tensor, "d_model d_vocab"]
    b_U: Float[Tensor, " d_vocab"] | None
    has_pos_embed: bool


# Kept rather than TL's stack_head_results / stack_neuron_results: they stop before Gemma's post-sublayer norms.
def _weights(model: LoadedModel) -> _Weights:
    bridge = model.bridge
    offset = bool(getattr(bridge.cfg, "rmsnorm_uses_offset", False))
    W_O, b_O, W_out, b_out, attn_post, mlp_post = [], [], [], [], [], []
    for block in bridge.blocks:
        w1, w2 = (_post_weight(block, n, offset) for n in ("ln1_post", "ln2_post"))
        wo = block.attn.W_O.detach()
        bo = getattr(block.attn, "b_O", None)
        bo = None if bo is None else bo.detach()
        wout = block.mlp.W_out.detach()
        bout = getattr(block.mlp, "b_out", None)
        bout = None if bout is None else bout.detach()
        if w1 is not None:
            wo = wo * w1
            bo = None if bo is None else bo * w1
        if w2 is not None:
            wout = wout * w2
            bout = None if bout is None else bout * w2
        W_O.append(wo)
        b_O.append(bo)
        W_out.append(wout)
        b_out.append(bout)
        attn_post.append(w1 is not None)
        mlp_post.append(w2 is not None)
    b_U = getattr(bridge, "b_U", None)
    has_pos = getattr(bridge.cfg, "positional_embedding_type", "") == "standard"
    return _Weights(W_O, b_O, W_out, b_out, attn_post, mlp_post, bridge.W_U.detach(),
                    None if b_U is None else b_U.detach(), has_pos)


def _post_weight(block: Any, name: str, offset: bool) -> Tensor | None:
    try:
        norm = getattr(block, name, None)
    except Exception:  # a bridge's __getattr__ may raise more than AttributeError for absent parts
        norm = None
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, Tensor):
        raise InputError(f"post-sublayer norm {name} has no weight: unsupported architecture")
    bias = getattr(norm, "bias", None)
    if isinstance(bias, Tensor) and torch.any(bias != 0):
        raise InputError(f"post-sublayer norm {name} has a bias: unsupported architecture")
    return weight.detach() + 1.0 if offset else weight.detach()


def _hook_names(model: LoadedModel, w: _Weights) -> list[str]:
    names = ["hook_embed", "ln_final.hook_scale", f"blocks.{model.n_layers - 1}.hook_resid_post"]
    if w.has_pos_embed:
        names.append("hook_pos_embed")
    for layer in range(model.n_layers):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out",
                  f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"]
        if w.attn_post[layer]:
            names.append(f"blocks.{layer}.ln1_post.hook_scale")
        if w.mlp_post[layer]:
            names.append(f"blocks.{layer}.ln2_post.hook_scale")
    return names


def final_norm_weight(model: LoadedModel) -> Float[Tensor, " d_model"]:
    """The final norm's effective weight before compat mode folded it into ``W_U``.

    Read from the model directory's safetensors (``model.norm.weight``), since folding drops it
    from the bridge. Raises `InputError` when the model has no local weights to read it from.
    """
    from safetensors import safe_open

    files = sorted(Path(model.source_path).glob("*.safetensors")) if model.source_path else []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key in ("model.norm.weight", "model.final_layernorm.weight", "transformer.ln_f.weight"):
                    weight = f.get_tensor(key).to(model.bridge.W_U.dtype)
                    return weight + 1.0 if getattr(model.bridge.cfg, "rmsnorm_uses_offset", False) else weight
    raise InputError(
        "value_vector_final_norm=False needs the final norm weight, which compat mode folds away and "
        f"which could not be read from the model's files ({model.source_path or 'no local directory'})"
    )


def promoted_tokens_of(
    model: LoadedModel,
    neurons: Sequence[tuple[int, int]],
    *,
    k: int = 5,
    final_norm: bool = True,
    signs: Sequence[float] | None = None,
    chunk: int = 64,
) -> dict[tuple[int, int, int], tuple[str, ...]]:
    """Top-`k` tokens each neuron's value vector promotes (Geva et al. 2022), keyed (layer, neuron, sign).

    The value vector is ``W_out[layer][neuron]`` (times the post-MLP norm's weight where the model
    has one: that is the direction the neuron writes), multiplied by the sign of the neuron's
    activation (`signs`, default +1: gated MLPs have negative activations, which write ``-v``),
    read through the unembedding: the compat ``W_U`` with the final norm weight folded in
    (`final_norm=True`) or the bare unembedding. The norms' scales are positive scalars and
    ``W_U``'s centering is a per-row constant, so neither changes the ranking.
    """
    _check_model(model)
    w = _weights(model)
    W_U = w.W_U if final_norm else w.W_U / final_norm_weight(model)[:, None]
    signs = [1.0] * len(neurons) if signs is None else list(signs)
    if len(signs) != len(neurons):
        raise InputError(f"signs must have one entry per neuron ({len(neurons)}), got {len(signs)}")
    keys = list(dict.fromkeys((int(l), int(n), -1 if s < 0 else 1) for (l, n), s in zip(neurons, signs)))
    out: dict[tuple[int, int, int], tuple[str, ...]] = {}
    if k <= 0:
        return {key: () for key in keys}
    decode = model.tokenizer.decode
    with torch.no_grad():
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            vecs = torch.stack([w.W_out[l][n] * sign for l, n, sign in part]).to(W_U.dtype)
            top = (vecs @ W_U).topk(k, dim=-1).indices
            for key, ids in zip(part, top.tolist()):
                out[key] = tuple(decode([i]) for i in ids)
    return out


# --------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------


def _run(
    model: LoadedModel,
    probes: Sequence[Probe],
    probe_tokens: Sequence[ProbeTokens],
    target_ids: Sequence[int | None],
    *,
    batch_size: int,
    top_neurons: int,
    promoted_tokens: int,
    value_vector_final_norm: bool,
    rank_neurons_by: NeuronRank,
    progress: bool,
) -> AttributionResult:
    if top_neurons < 0 or promoted_tokens < 0:
        raise InputError(f"top_neurons and promoted_tokens must be >= 0, got {top_neurons}, {promoted_tokens}")
    if rank_neurons_by not in ("logit", "logit_diff", "abs_logit"):
        raise InputError(f"rank_neurons_by must be 'logit', 'logit_diff' or 'abs_logit', got {rank_neurons_by!r}")
    if not value_vector_final_norm and promoted_tokens and not model.masked:
        final_norm_weight(model)  # fail before the forward passes
    w: Any = post_ln_weights(model) if model.masked else _weights(model)
    hook_names = post_ln_hook_names(model) if model.masked else _hook_names(model, w)
    attribute_batch = attribute_post_ln_batch if model.masked else _attribute_batch
    n_layers = model.n_layers
    d_mlp = w.W_out[0].shape[0]
    decode = model.tokenizer.decode
    records: list[dict[str, Any] | None] = [None] * len(probes)
    sums: dict[str, Tensor] = {}
    act_sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    checks = {"logit": 0.0, "heads_vs_attn": 0.0, "neurons_vs_mlp": 0.0, "resid": 0.0}

    for batch in iterate_forward(model, probe_tokens, hook_names=hook_names, batch_size=batch_size,
                                 include_target=False, progress=progress, desc="attribution"):
        pred_other = contrast_tokens(batch, [target_ids[i] for i in batch.indices])
        out = attribute_batch(model, w, batch, *pred_other)
        _enforce_sums(out, batch.logits.dtype)
        for key in checks:
            checks[key] = max(checks[key], out["checks"][key])
        neuron = out["neuron"]  # [B, L, d_mlp, 2]
        acts = out["acts"]  # [B, L, d_mlp]
        rank_key = {"logit": neuron[..., 0], "logit_diff": neuron[..., 1],
                    "abs_logit": neuron[..., 0].abs()}[rank_neurons_by]
        k = min(top_neurons, n_layers * d_mlp)
        top = rank_key.flatten(1).topk(k, dim=-1).indices if k else torch.zeros(len(batch.indices), 0, dtype=torch.long)
        for row, index in enumerate(batch.indices):
            pred, other, target = int(out["pred"][row]), int(out["other"][row]), target_ids[index]
            memorized = None if target is None else pred == target
            probe = probes[index]
            group = probe_group(probe.kind, bool(memorized))
            flat_n = neuron[row].flatten(0, 1)
            flat_a = acts[row].flatten()
            top_list = [
                (int(f) // d_mlp, int(f) % d_mlp, float(flat_a[f]), float(flat_n[f, 0]), float(flat_n[f, 1]))
                for f in top[row].tolist()
            ]
            records[index] = dict(
                probe=probe, target_id=target, memorized=memorized, group=group, pred=pred, other=other,
                other_is="target" if target is not None and other == target else "runner_up",
                logit=float(out["logit"][row, 0]), logit_diff=float(out["logit"][row, 1]),
                embed=out["embed"][row], attn=out["attn"][row], mlp=out["mlp"][row], heads=out["heads"][row],
                attn_bias=out["attn_bias"][row], mlp_bias=out["mlp_bias"][row], unembed_bias=out["unembed_bias"][row],
                top=top_list,
            )
            if group not in sums:
                sums[group] = torch.zeros(n_layers, d_mlp, 2, dtype=torch.float64)
                act_sums[group] = torch.zeros(n_layers, d_mlp, dtype=torch.float64)
                counts[group] = 0
            sums[group] += neuron[row].double()
            act_sums[group] += acts[row].double()
            counts[group] += 1

    neuron_means = {g: (sums[g] / counts[g]).float() for g in sums}
    set_top: dict[str, list[tuple[int, int, float, float, float]]] = {}
    for g, mean in neuron_means.items():
        key = {"logit": mean[..., 0], "logit_diff": mean[..., 1], "abs_logit": mean[..., 0].abs()}[rank_neurons_by]
        k = min(top_neurons, key.numel())
        idx = key.flatten().topk(k).indices.tolist() if k else []
        act_mean = (act_sums[g] / counts[g]).float().flatten()
        flat = mean.flatten(0, 1)
        set_top[g] = [(f // d_mlp, f % d_mlp, float(act_mean[f]), float(flat[f, 0]), float(flat[f, 1])) for f in idx]

    wanted = {(l, n, _sign(a)) for r in records if r for (l, n, a, *_rest) in r["top"]}
    wanted |= {(l, n, _sign(a)) for lst in set_top.values() for (l, n, a, *_rest) in lst}
    wanted_list = sorted(wanted)
    if model.masked:
        promoted = post_ln_promoted(w, wanted_list, promoted_tokens, decode, valid_mask(model))
    else:
        promoted = promoted_tokens_of(model, [(l, n) for l, n, _ in wanted_list],
                                      signs=[s for *_, s in wanted_list], k=promoted_tokens,
                                      final_norm=value_vector_final_norm)

    def neurons(items: list[tuple[int, int, float, float, float]]) -> tuple[NeuronAttribution, ...]:
        return tuple(NeuronAttribution(l, n, a, c, d, promoted.get((l, n, _sign(a)), ())) for l, n, a, c, d in items)

    results = []
    for r in records:
        assert r is not None
        probe: Probe = r["probe"]
        results.append(ProbeAttribution(
            probe_id=probe.id, kind=probe.kind, group=r["group"], memorized=r["memorized"], prompt=probe.prompt,
            target=probe.target or None, target_id=r["target_id"], pred_id=r["pred"], pred_token=decode([r["pred"]]),
            other_id=r["other"], other_token=decode([r["other"]]), other_is=r["other_is"], logit=r["logit"],
            logit_diff=r["logit_diff"], embed=r["embed"], attn=r["attn"], mlp=r["mlp"], heads=r["heads"],
            attn_bias=r["attn_bias"], mlp_bias=r["mlp_bias"], unembed_bias=r["unembed_bias"],
            top_neurons=neurons(r["top"]),
        ))
    settings = model.settings() | {
        "analysis": "direct_logit_attribution",
        "contrast": "target if the prediction misses it, else the runner-up",
        "top_neurons": top_neurons,
        "rank_neurons_by": rank_neurons_by,
        "promoted_tokens": promoted_tokens,
        "value_vector_final_norm": value_vector_final_norm,
        "batch_size": batch_size,
    } | (_MASKED_SETTINGS if model.masked else _CAUSAL_SETTINGS)
    return AttributionResult(
        probes=tuple(results), set_neurons={g: neurons(v) for g, v in set_top.items()},
        neuron_means=neuron_means, group_counts=dict(counts), checks=checks, settings=settings,
    )


_CAUSAL_SETTINGS = {
    "position": "last prompt token",
    "logit": "compat-mode logit (final norm folded into W_U, W_U centered over the vocabulary)",
    "final_norm_scale": "frozen from the clean run (ln_final.hook_scale)",
    "post_norms": "per-head/per-neuron pieces scaled by the post-sublayer norm's frozen scale and weight",
}
_MASKED_SETTINGS = {
    "position": "the mask",
    "logit": "raw MLM logit (the head's dense, GELU, LayerNorm and decoder)",
    "final_norm_scale": "every LayerNorm's scale and the head's GELU gate frozen from the clean run",
    "post_norms": "each piece read through every later LayerNorm (attribution_post_ln)",
    "promoted_tokens_read": "value vectors through the decoder (tied word embeddings) alone",
}


def _enforce_sums(out: dict[str, Any], dtype: torch.dtype) -> None:
    """Stop the run when a sum invariant fails (the pieces must add up to the model's own logit,
    heads to their layer, neurons to theirs, the captured stream to itself) beyond float noise:
    1e-3 (or 100 epsilons of a coarser dtype) per unit of the batch's largest logit."""
    scale = 1.0 + float(out["logit"].abs().max())
    tolerance = max(1e-3, 100 * torch.finfo(dtype).eps) * scale
    for name, error in out["checks"].items():
        if not error <= tolerance:
            raise FastPathError(f"direct logit attribution: the {name} sum is off by {error:.3g} "
                                f"(tolerance {tolerance:.3g}): the split does not add up, nothing was written")


def contrast_tokens(batch: Any, target_ids: Sequence[int | None]) -> tuple[Tensor, Tensor]:
    """Each row's prediction and contrast token: the target when the prediction misses it, else
    (and when the target is a masked token, such as BERT's [UNK], which has no logit) the runner-up."""
    rows = torch.arange(len(target_ids), device=batch.logits.device)
    final = batch.logits[rows, batch.last]
    top2 = final.topk(2, dim=-1).indices
    pred, runner = top2[:, 0], top2[:, 1]
    target = torch.tensor([-1 if t is None else t for t in target_ids], device=pred.device)
    has_logit = final.gather(1, target.clamp(min=0)[:, None])[:, 0] > torch.finfo(final.dtype).min
    return pred, torch.where((target >= 0) & (target != pred) & has_logit, target, runner)


def _attribute_batch(model: LoadedModel, w: _Weights, batch: Any, pred: Tensor, other: Tensor) -> dict[str, Any]:
    """All contributions of one forward batch; every output's last axis is (logit, logit_diff)."""
    cap = batch.captured
    n_layers = model.n_layers
    rows = torch.arange(len(batch.indices), device=batch.logits.device)
    final = batch.logits[rows, batch.last].float()  # [B, V]
    W_U = w.W_U
    u_pred, u_other = W_U[:, pred].T, W_U[:, other].T  # [B, d]
    dirs: Float[Tensor, "B 2 d_model"] = torch.stack([u_pred, u_pred - u_other], dim=1)
    inv_sf = 1.0 / cap["ln_final.hook_scale"].reshape(-1, 1, 1)  # [B,1,1]

    def read(x: Float[Tensor, "B d_model"]) -> Float[Tensor, "B 2"]:
        return torch.einsum("bd,bkd->bk", x.to(dirs.dtype), dirs) * inv_sf[:, :, 0]

    logit = torch.stack([final[rows, pred], final[rows, pred] - final[rows, other]], dim=-1)
    embed_vec = cap["hook_embed"] + (cap["hook_pos_embed"] if w.has_pos_embed else 0)
    embed = read(embed_vec)
    if w.b_U is not None:
        unembed_bias = torch.stack([w.b_U[pred], w.b_U[pred] - w.b_U[other]], dim=-1).float()
    else:
        unembed_bias = torch.zeros_like(embed)
    attn, mlp, heads, attn_bias, mlp_bias, neuron, acts = [], [], [], [], [], [], []
    resid = embed_vec.clone()
    for layer in range(n_layers):
        attn_out, mlp_out = cap[f"blocks.{layer}.hook_attn_out"], cap[f"blocks.{layer}.hook_mlp_out"]
        resid = resid + attn_out + mlp_out
        attn.append(read(attn_out))
        mlp.append(read(mlp_out))
        inv_s1 = (1.0 / cap[f"blocks.{layer}.ln1_post.hook_scale"]).reshape(-1, 1) if w.attn_post[layer] else None
        inv_s2 = (1.0 / cap[f"blocks.{layer}.ln2_post.hook_scale"]).reshape(-1, 1) if w.mlp_post[layer] else None
        # heads: z_h W_O[h] (post-norm weight already in W_O), / post-norm scale
        z = cap[f"blocks.{layer}.attn.hook_z"]  # [B, head, d_head]
        per_head = torch.einsum("bhe,hed->bhd", z, w.W_O[layer])
        if inv_s1 is not None:
            per_head = per_head * inv_s1[:, :, None]
        heads.append(torch.einsum("bhd,bkd->bhk", per_head.to(dirs.dtype), dirs) * inv_sf)
        attn_bias.append(_bias(w.b_O[layer], inv_s1, read, len(rows)))
        # neurons: activation x (W_out[n] . direction), contracted before the expansion
        a = cap[f"blocks.{layer}.mlp.hook_post"]  # [B, d_mlp]
        proj = torch.einsum("nd,bkd->bnk", w.W_out[layer].to(dirs.dtype), dirs)  # [B, d_mlp, 2]
        scale = inv_sf if inv_s2 is None else inv_sf * inv_s2[:, :, None]
        neuron.append(a[:, :, None].to(dirs.dtype) * proj * scale)
        acts.append(a.float())
        mlp_bias.append(_bias(w.b_out[layer], inv_s2, read, len(rows)))
    attn_t, mlp_t = torch.stack(attn, 1), torch.stack(mlp, 1)
    heads_t, neuron_t = torch.stack(heads, 1), torch.stack(neuron, 1)
    attn_bias_t, mlp_bias_t = torch.stack(attn_bias, 1), torch.stack(mlp_bias, 1)
    total = embed + attn_t.sum(1) + mlp_t.sum(1) + unembed_bias
    checks = {
        "logit": float((total - logit).abs().max()),
        "heads_vs_attn": float((heads_t.sum(2) + attn_bias_t - attn_t).abs().max()),
        "neurons_vs_mlp": float((neuron_t.sum(2) + mlp_bias_t - mlp_t).abs().max()),
        "resid": float((resid - cap[f"blocks.{n_layers - 1}.hook_resid_post"]).abs().max()),
    }
    cpu = lambda t: t.detach().float().cpu()  # noqa: E731
    return {
        "pred": pred.cpu(), "other": other.cpu(), "logit": cpu(logit), "embed": cpu(embed),
        "attn": cpu(attn_t), "mlp": cpu(mlp_t), "heads": cpu(heads_t), "attn_bias": cpu(attn_bias_t),
        "mlp_bias": cpu(mlp_bias_t), "unembed_bias": cpu(unembed_bias), "neuron": cpu(neuron_t),
        "acts": cpu(torch.stack(acts, 1)), "checks": checks,
    }


def _sign(x: float) -> int:
    return -1 if x < 0 else 1


def _bias(b: Tensor | None, inv_s: Tensor | None, read: Any, n: int) -> Tensor:
    if b is None:
        return torch.zeros(n, 2)
    vec = b.expand(n, -1)
    if inv_s is not None:
        vec = vec * inv_s
    return read(vec)
