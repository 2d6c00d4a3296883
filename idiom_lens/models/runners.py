"""Forward engines the interventions share: two runners that replay one prompt as many batch rows
(one per configuration), and the outcome metrics of a perturbed run (knockouts, layer skipping,
patching and attention knockout use them alike). They sit here, next to `forward`, because they
are forward passes; the probe checks and sampling are in `idiom_lens.datasets.selection`.

- `PromptRunner`: the prefix's key/value cache reused, only the last token recomputed (for hooks
  that touch the last position only), or the whole prompt.
- `SuffixRunner`: the whole prompt, resumed at a layer from the clean residual stream (for hooks
  at every position that touch no layer below the resume layer: the layers below run once); or
  only the positions from one on, the earlier ones' keys and values given (`PrefixKV`, recorded
  in an earlier run by `KVRecorder`): causal tracing reuses its corrupted runs' keys and values
  below the restored position.

A masked LM's closing tokens (`suffix_ids`, BERT's [SEP]) run after the prompt, and the read
position stays the prompt's last token (the mask): no prefix cache then (bidirectional attention:
earlier positions read later ones).

Predictions range over real vocabulary tokens (`idiom_lens.models.vocab`): every argmax and probability
here is taken on masked logits."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.readout import final_transform
from idiom_lens.models.selfcheck import (
    check_against_full_forward,
    check_close,
    plain_last_logits,
    prefix_cache_works,
)
from idiom_lens.models.vocab import mask_logits
from idiom_lens.types import HookFn


class PromptRunner:
    """Runs one prompt many times (one row per configuration) and returns last-position logits.

    With ``use_kv`` the prompt's prefix (all but the last token) runs once and its key/value
    cache is copied into every batch, so only the last token is recomputed: valid exactly when
    the hooks touch the last position only. Where the installed versions make the bridge ignore
    the cache (`selfcheck.prefix_cache_works`), whole prompts run instead: same numbers, slower.
    The unembedding runs on the last position only. A masked LM runs the whole sequence, prompt
    and `suffix_ids`, and is read at the prompt's last token (its mask).
    """

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], *, use_kv: bool,
                 suffix_ids: Sequence[int] = ()):
        self.model = model
        self.prompt_ids = tuple(int(i) for i in prompt_ids)
        self.suffix_ids = tuple(int(i) for i in suffix_ids)
        ids = torch.tensor([[*self.prompt_ids, *self.suffix_ids]], dtype=torch.long, device=model.device)
        self.use_kv = bool(use_kv and not model.masked and not self.suffix_ids and ids.shape[1] >= 2
                           and prefix_cache_works(model))
        self.cache = None
        if self.use_kv:
            with torch.no_grad():
                _, self.cache = model.bridge(ids[:, :-1], return_type="logits_and_cache")
            self.tokens = ids[:, -1:]
        else:
            self.tokens = ids
        self.n_pos = int(self.tokens.shape[1])  # positions in each run
        self.last = self.n_pos - 1 - len(self.suffix_ids)  # the read position (the prompt's last) in a run

    def run(self, n_rows: int, hooks: Sequence[tuple[str, HookFn]]) -> Float[Tensor, "row d_vocab"]:
        tokens = self.tokens.expand(n_rows, -1).contiguous()
        last = self.last

        def only_last(x: Tensor, hook: Any) -> Tensor:  # unembed the last position only
            return x[:, last : last + 1]

        kwargs: dict[str, Any] = {}
        if self.use_kv:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(n_rows)
            kwargs["past_key_values"] = cache
        with torch.no_grad():
            logits = self.model.bridge.run_with_hooks(
                tokens, fwd_hooks=[*hooks, ("unembed.hook_in", only_last)], **kwargs
            )
        return logits[:, -1].float()

    def self_check(self, *, what: str, probe: str) -> None:
        """Stop (`FastPathError`) unless two unhooked rows of this runner equal a plain full
        forward of the prompt: the prefix cache, its copy per row and the last-position
        unembedding, checked under the installed versions."""
        check_against_full_forward(self.model, self.prompt_ids, self.run(2, []), what=what, probe=probe,
                                   suffix_ids=self.suffix_ids)


class SuffixRunner:
    """Runs one whole prompt many times (one row per configuration), resuming at a layer.

    The clean pass runs once through the bridge (`run_with_hooks`, with the caller's capture
    hooks); a pre-hook on every block records the residual stream entering it (all positions)
    and the keyword arguments the model passes it (attention mask, rotary embeddings). A run
    from layer `start` feeds the clean residual entering `start` to blocks start..n-1, called
    one after the other with those arguments, under `bridge.hooks(...)`; then the final norm and
    the unembedding of the last position. Valid exactly when no hook touches a layer below
    `start` (those layers would compute the clean values again). TransformerBridge's own
    `start_at_layer` still executes the lower blocks (its docs say so), so it saves nothing. A
    masked LM's `suffix_ids` run after the prompt; the read position is the prompt's last token.
    """

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], *, capture: Sequence[tuple[str, HookFn]] = (),
                 suffix_ids: Sequence[int] = ()):
        self.model = model
        self.prompt_ids = tuple(int(i) for i in prompt_ids)
        self.suffix_ids = tuple(int(i) for i in suffix_ids)
        bridge = model.bridge
        ids = torch.tensor([[*self.prompt_ids, *self.suffix_ids]], dtype=torch.long, device=model.device)
        self.resid: list[Tensor] = [torch.empty(0)] * model.n_layers  # [1, pos, d_model] entering each block
        self.block_kwargs: list[dict[str, Any]] = [{}] * model.n_layers

        def record(layer: int) -> Callable:
            def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                self.resid[layer] = hidden.detach().clone()
                kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                kept["past_key_values"] = None  # the clean pass's cache object must not be written to
                if "use_cache" in kept:
                    kept["use_cache"] = False
                self.block_kwargs[layer] = kept

            return pre_hook

        handles = [block.register_forward_pre_hook(record(i), with_kwargs=True)
                   for i, block in enumerate(bridge.blocks)]
        try:
            with torch.no_grad():
                logits = bridge.run_with_hooks(ids, fwd_hooks=list(capture))
        finally:
            for handle in handles:
                handle.remove()
        self.n_pos = len(self.prompt_ids) + len(self.suffix_ids)
        self.last = len(self.prompt_ids) - 1  # the read position
        self.clean_logits: Float[Tensor, " d_vocab"] = logits[0, self.last].float()
        config = getattr(getattr(bridge, "original_model", None), "config", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def run(
        self, n_rows: int, hooks: Sequence[tuple[str, HookFn]], *, start: int = 0,
        resid: Float[Tensor, "row pos d_model"] | None = None, from_pos: int = 0,
        past: PrefixKV | KVRecorder | None = None, unembed: bool = True,
    ) -> Float[Tensor, "row d_vocab"] | Float[Tensor, "row d_model"]:
        """Read-position logits of `n_rows` rows resumed at block `start` with `hooks` active.

        `unembed=False` returns what the unembedding would read instead (the final norm's output,
        [row, d_model]; `logits` unembeds it, outside the hooks): Gemma's unembedding streams its
        671 MB matrix once per call, so a call costs about as much for 2 rows as for 32, and a
        caller running many small batches (one per start layer) unembeds them together.

        `resid` is the residual stream entering `start`, one per row (default: the clean one):
        causal tracing resumes corrupted runs this way. With `from_pos` > 0 only the positions
        from `from_pos` on run (`resid` holds those; hooks see them at index position -
        `from_pos`), the earlier positions' keys and values coming from `past` (a `PrefixKV`
        holding every layer from `start` on); a `KVRecorder` as `past` records a run's keys and
        values instead."""
        bridge = self.model.bridge
        if not 0 <= start < self.model.n_layers:
            raise InputError(f"start layer must be in 0..{self.model.n_layers - 1}, got {start}")
        if not 0 <= from_pos <= self.last:
            raise InputError(f"from_pos must be in 0..{self.last}, got {from_pos}")
        if from_pos and not isinstance(past, PrefixKV):
            raise InputError(f"from_pos {from_pos} needs the earlier positions' keys and values (past=PrefixKV)")
        width = self.resid[start].shape[1:]
        expected = (n_rows, width[0] - from_pos, width[1])
        if resid is None:
            x = self.resid[start][:, from_pos:].expand(n_rows, -1, -1).contiguous()
        elif resid.shape != expected:
            raise InputError(f"resid must have shape {expected}, got {tuple(resid.shape)}")
        else:
            x = resid
        with torch.no_grad(), bridge.hooks(fwd_hooks=list(hooks)):
            for layer in range(start, self.model.n_layers):
                out = bridge.blocks[layer](x, **_suffix_kwargs(self.block_kwargs[layer], from_pos, past))
                x = out[0] if isinstance(out, tuple) else out
            at = self.last - from_pos
            read = final_transform(self.model, x[:, at : at + 1])
            if not unembed:
                return read[:, -1]
            logits = bridge.unembed(read)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits[:, -1].float()

    def logits(self, read: Float[Tensor, "row d_model"], *, chunk: int = 256) -> Float[Tensor, "row d_vocab"]:
        """The logits of final-norm outputs (`run(..., unembed=False)`), `chunk` rows per call."""
        parts = []
        with torch.no_grad():
            for i in range(0, read.shape[0], chunk):
                logits = self.model.bridge.unembed(read[i : i + chunk][:, None])[:, -1]
                if self.softcap:
                    logits = torch.tanh(logits / self.softcap) * self.softcap
                parts.append(logits.float())
        return torch.cat(parts)

    def token_logits(self, read: Float[Tensor, "row d_model"], token_id: int) -> Float[Tensor, " row"]:
        """One token's logit per row of final-norm outputs (`run(..., unembed=False)`): what
        `logits(read)[:, token_id]` gives (up to fp32 summation order) from one column of the
        unembedding instead of all of them; for a metric that reads one logit."""
        bridge = self.model.bridge
        with torch.no_grad():
            logit = read.to(bridge.W_U.dtype) @ bridge.W_U[:, token_id]
            if bridge.b_U is not None:
                logit = logit + bridge.b_U[token_id]
            if self.softcap:
                logit = torch.tanh(logit / self.softcap) * self.softcap
        return logit.float()

    def self_check(self, *, what: str, probe: str, token_id: int | None = None) -> None:
        """Stop (`FastPathError`) unless rows resumed at the first, a middle and the last layer
        equal a plain full forward of the prompt (the recorded block arguments, the direct
        block calls, the last-position unembedding), under the installed versions; with
        `token_id`, also `token_logits` of those rows against the plain forward's logit."""
        plain = plain_last_logits(self.model, self.prompt_ids, self.suffix_ids) if token_id is not None else None
        for start in sorted({0, self.model.n_layers // 2, self.model.n_layers - 1}):
            check_against_full_forward(self.model, self.prompt_ids, self.run(2, [], start=start),
                                       what=f"{what} (resumed at layer {start})", probe=probe,
                                       suffix_ids=self.suffix_ids)
            if plain is not None:
                one = self.token_logits(self.run(2, [], start=start, unembed=False), token_id)
                check_close(one, plain[token_id].expand(2), probe=probe,
                            what=f"{what} (one token's logit, resumed at layer {start})")


class KVRecorder:
    """Passed as the blocks' `past_key_values`: keeps each layer's keys and values (after RoPE, as
    attention reads them; [row, kv_head, pos, d_head]) and hands them back unchanged. TransformerBridge's
    attention calls `update(keys, values, layer_idx)` on whatever cache it is given."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.keys[layer_idx], self.values[layer_idx] = keys.detach(), values.detach()
        return keys, values


class PrefixKV:
    """Passed as the blocks' `past_key_values` in a suffix run: each layer's keys and values of the
    positions before the suffix (one per row), put before the suffix's own."""

    def __init__(self, keys: dict[int, Tensor], values: dict[int, Tensor]) -> None:
        self.keys, self.values = keys, values

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return (torch.cat([self.keys[layer_idx].to(keys.dtype), keys], dim=2),
                torch.cat([self.values[layer_idx].to(values.dtype), values], dim=2))


def _suffix_kwargs(kwargs: dict[str, Any], from_pos: int, past: Any) -> dict[str, Any]:
    """A block's recorded keyword arguments for the positions from `from_pos` on: the attention
    mask's query rows, the rotary embeddings and position ids of those positions (the keys keep
    every position), and the cache `past`. Every architecture the toolkit loads passes exactly
    these (the self-checks compare with a plain forward)."""
    out = dict(kwargs)
    if from_pos:
        if out.get("attention_mask") is not None:
            out["attention_mask"] = out["attention_mask"][..., from_pos:, :]
        if out.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(t[:, from_pos:] for t in out["position_embeddings"])
        if out.get("position_ids") is not None:
            out["position_ids"] = out["position_ids"][:, from_pos:]
        if out.get("cache_position") is not None:
            out["cache_position"] = out["cache_position"][from_pos:]
    out["past_key_values"] = past
    return out


def masked_prediction(logits: Float[Tensor, " d_vocab"], valid: Bool[Tensor, " d_vocab"]) -> tuple[int, float]:
    """The prediction over real vocabulary tokens and its probability (masked softmax)."""
    masked = mask_logits(logits.float(), valid)
    pred = int(masked.argmax())
    return pred, float(masked.softmax(-1)[pred])


def last_metrics(
    logits: Float[Tensor, "row d_vocab"], clean_pred: int, clean_prob: float, target_id: int, *,
    valid: Bool[Tensor, " d_vocab"],
) -> dict[str, np.ndarray]:
    """Outcome of perturbed rows against the clean prediction, on masked logits (`valid`)."""
    logits = mask_logits(logits.float(), valid)
    log_probs = logits.log_softmax(dim=-1)
    pred = logits.argmax(dim=-1)
    prob_clean_pred = log_probs[:, clean_pred].exp()
    return {
        "new_pred_id": pred.cpu().numpy().astype(np.int64),
        "changed": (pred != clean_pred).cpu().numpy(),
        "prob_of_clean_pred": prob_clean_pred.cpu().numpy().astype(np.float64),
        "prob_drop": (clean_prob - prob_clean_pred).cpu().numpy().astype(np.float64),
        "new_is_target": (pred == target_id).cpu().numpy(),
        "target_prob": log_probs[:, target_id].exp().cpu().numpy().astype(np.float64),
    }
