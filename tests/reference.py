"""An independent, deliberately plain logit lens on the Hugging Face model, one probe at a time.

This is how the paper's code reads layers (all hidden states, final norm and unembedding per
layer, softmax and a full argsort). It shares no code with `trajectory` beyond tokenization, so
the tests use it to check our batched TransformerLens path, and the benchmark uses it as the
baseline to beat.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from idiom_lens.models.tokenization import ProbeTokens


def load_hf_model(model_dir: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def reference_trajectory(
    hf_model: Any, probe_tokens: Sequence[ProbeTokens], *, masked_ids: Sequence[int] = ()
) -> dict[str, np.ndarray]:
    """resid_post lens per layer for each probe: ranks/probs of the final prediction and target.

    Returns arrays [probe, layer] keyed pred_rank, pred_prob, target_rank, target_prob, and
    pred_id [probe]. Hugging Face's last hidden state already has the final norm applied.
    `masked_ids` (e.g. `vocab.masked_token_ids`) are out of the distribution (logit -inf).
    """
    masked = torch.tensor(list(masked_ids), dtype=torch.long)
    norm = hf_model.model.norm
    head = hf_model.lm_head
    out: dict[str, list] = {k: [] for k in ("pred_rank", "pred_prob", "target_rank", "target_prob", "pred_id")}
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
            rows = {k: [] for k in ("pred_rank", "pred_prob", "target_rank", "target_prob")}
            for logits in layer_logits:
                probs = logits.softmax(-1)
                order = torch.argsort(logits, descending=True)
                position = torch.empty_like(order)
                position[order] = torch.arange(order.numel())
                for name, token in (("pred", pred), ("target", toks.target_id)):
                    rows[f"{name}_rank"].append(int(position[token]))
                    rows[f"{name}_prob"].append(float(probs[token]))
            for k, v in rows.items():
                out[k].append(v)
            out["pred_id"].append(pred)
    return {k: np.asarray(v) for k, v in out.items()}
