"""An independent, deliberately plain logit lens on the Hugging Face model, one probe at a time.

This is how the paper's code reads layers (all hidden states, final norm and unembedding per
layer, softmax and a full argsort). It shares no code with `trajectory` beyond tokenization, so
the tests use it to check our batched TransformerLens path, and the benchmark uses it as the
baseline to beat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from idiom_lens.models.tokenization import ProbeTokens


def load_hf_model(model_dir: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def reference_trajectory(
    hf_model: Any, probe_tokens: Sequence[ProbeTokens], *, masked_ids: Sequence[int] = (),
    tie_atol: Callable[[float], float] | None = None,
) -> dict[str, np.ndarray]:
    """resid_post lens per layer for each probe: ranks/probs of the final prediction and target.

    Returns arrays [probe, layer] keyed pred_rank, pred_prob, target_rank, target_prob, and
    pred_id [probe]. Hugging Face's last hidden state already has the final norm applied.
    `masked_ids` (e.g. `vocab.masked_token_ids`) are out of the distribution (logit -inf).
    With `tie_atol` (the largest |logit| -> a width), also pred_ties and target_ties [probe, layer]:
    how many other tokens' logits lie within that width of the token's (near ties), and
    logit_scale, the largest |logit| seen.
    """
    masked = torch.tensor(list(masked_ids), dtype=torch.long)
    norm = hf_model.model.norm
    head = hf_model.lm_head
    out: dict[str, list] = {k: [] for k in ("pred_rank", "pred_prob", "target_rank", "target_prob", "pred_id",
                                            "pred_ties", "target_ties")}
    largest = 0.0
    with torch.no_grad():
        for toks in probe_tokens:
            ids = torch.tensor([toks.prompt_ids])
            hidden = hf_model(ids, output_hidden_states=True).hidden_states
            n_layers = len(hidden) - 1
            layer_logits = []
            for layer in range(n_layers):
                h = hidden[layer + 1][0, -1]
                h = h if layer == n_layers - 1 else norm(h)
                logits = head(h)
                softcap = getattr(hf_model.config, "final_logit_softcapping", None)
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                if len(masked):
                    logits = logits.index_fill(0, masked, -torch.inf)
                layer_logits.append(logits)
            pred = int(layer_logits[-1].argmax())
            scale = max(float(l[l.isfinite()].abs().max()) for l in layer_logits)
            largest = max(largest, scale)
            rows = {k: [] for k in ("pred_rank", "pred_prob", "target_rank", "target_prob", "pred_ties", "target_ties")}
            for logits in layer_logits:
                probs = logits.softmax(-1)
                order = torch.argsort(logits, descending=True)
                position = torch.empty_like(order)
                position[order] = torch.arange(order.numel())
                for name, token in (("pred", pred), ("target", toks.target_id)):
                    rows[f"{name}_rank"].append(int(position[token]))
                    rows[f"{name}_prob"].append(float(probs[token]))
                    if tie_atol is not None:
                        near = (logits - logits[token]).abs() <= tie_atol(scale)
                        rows[f"{name}_ties"].append(int(near.sum()) - 1)
            for k, v in rows.items():
                out[k].append(v)
            out["pred_id"].append(pred)
    return {k: np.asarray(v) for k, v in out.items() if v and v[0] != []} | {"logit_scale": largest}


def _site_modules(hf_model: Any, site: str) -> list[Any]:
    """Per layer, the Hugging Face module whose output is the site (`resid`: the decoder layer;
    `attn` / `mlp`: what is added to the residual, after Gemma's post-norms when it has them)."""
    gpt2 = hasattr(hf_model, "transformer")  # GPT-2: transformer.h[i].attn / .mlp
    layers = hf_model.transformer.h if gpt2 else hf_model.model.layers
    if site == "resid":
        return list(layers)
    post = "post_attention_layernorm" if site == "attn" else "post_feedforward_layernorm"
    inner = ("attn" if gpt2 else "self_attn") if site == "attn" else "mlp"
    if hasattr(layers[0], "post_feedforward_layernorm"):  # Gemma: sandwich norms
        return [getattr(layer, post) for layer in layers]
    return [getattr(layer, inner) for layer in layers]


def reference_causal_trace(
    hf_model: Any, prompt_ids: Sequence[int], *, noised: Sequence[int], noise: torch.Tensor,
    specs: Sequence[tuple[str, int]], masked_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Causal tracing the naive way, on the Hugging Face model: one full forward per (noise
    sample, site/window, layer, position), the noise added to `inputs_embeds` (Gemma's embedding
    module applies its scale) and the clean activation written by forward hooks on the modules.

    Returns restored [spec, layer, pos, sample], corrupted [sample], clean_prob and pred."""
    masked = torch.tensor(list(masked_ids), dtype=torch.long)
    n_layers = hf_model.config.num_hidden_layers
    ids = torch.tensor([list(prompt_ids)])
    noised_t = torch.tensor(list(noised))

    def prob(logits: torch.Tensor, token: int | None = None) -> tuple[int, float]:
        logits = logits[0, -1].float()
        if len(masked):
            logits = logits.index_fill(0, masked, -torch.inf)
        token = int(logits.argmax()) if token is None else token
        return token, float(logits.softmax(-1)[token])

    def unpack(out: Any) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out

    clean: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for site in {s for s, _ in specs}:
        for layer, module in enumerate(_site_modules(hf_model, site)):
            def keep(module, args, out, key=(site, layer)):
                clean[key] = unpack(out)[0].detach().clone()
            handles.append(module.register_forward_hook(keep))
    with torch.no_grad():
        embeds = hf_model.get_input_embeddings()(ids)
        pred, clean_prob = prob(hf_model(inputs_embeds=embeds).logits)
    for h in handles:
        h.remove()

    def noisy(sample: int) -> torch.Tensor:
        x = embeds.clone()
        x[0, noised_t] += noise[sample].to(x.dtype)
        return x

    n_samples = noise.shape[0]
    with torch.no_grad():
        corrupted = torch.tensor([prob(hf_model(inputs_embeds=noisy(s)).logits, pred)[1] for s in range(n_samples)])
    restored = torch.zeros(len(specs), n_layers, len(prompt_ids), n_samples)
    for si, (site, window) in enumerate(specs):
        modules = _site_modules(hf_model, site)
        for layer in range(n_layers):
            layers = range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window))
            for pos in range(len(prompt_ids)):
                handles = []
                for l in layers:
                    def put(module, args, out, l=l, pos=pos, site=site):
                        value = unpack(out).clone()
                        value[0, pos] = clean[(site, l)][pos]
                        return (value, *out[1:]) if isinstance(out, tuple) else value
                    handles.append(modules[l].register_forward_hook(put))
                with torch.no_grad():
                    for s in range(n_samples):
                        restored[si, layer, pos, s] = prob(hf_model(inputs_embeds=noisy(s)).logits, pred)[1]
                for h in handles:
                    h.remove()
    return {"restored": restored, "corrupted": corrupted, "clean_prob": clean_prob, "pred": pred}
