"""What every intervention shares: probe checks and sampling, a runner that replays one prompt
as many batch rows (one per configuration) with the prefix's key/value cache reused, and the
outcome metrics of a perturbed run (knockouts, layer skipping and patching use them alike)."""

from __future__ import annotations

import copy
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models import LoadedModel
from idiom_lens.selfcheck import check_against_full_forward, prefix_cache_works

HookFn = Callable[[Tensor, Any], Tensor | None]


def sample_probes(probes: Sequence[Probe], n: int | None, *, seed: int = 0) -> list[Probe]:
    """A seeded sample of `n` probes in their original order (all of them when n is None)."""
    probes = list(probes)
    if n is None or n >= len(probes):
        return probes
    if n < 1:
        raise InputError(f"sample size must be >= 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(probes)), n))
    return [probes[i] for i in keep]


def check_probes(probes: Sequence[Probe]) -> list[Probe]:
    probes = list(probes)
    if not probes:
        raise InputError("no probes given: expected at least one probe")
    ids = [p.id for p in probes]
    if len(set(ids)) != len(ids):
        raise InputError("probe ids must be unique")
    return probes


class PromptRunner:
    """Runs one prompt many times (one row per configuration) and returns last-position logits.

    With ``use_kv`` the prompt's prefix (all but the last token) runs once and its key/value
    cache is copied into every batch, so only the last token is recomputed: valid exactly when
    the hooks touch the last position only. Where the installed versions make the bridge ignore
    the cache (`selfcheck.prefix_cache_works`), whole prompts run instead: same numbers, slower.
    The unembedding runs on the last position only.
    """

    def __init__(self, model: LoadedModel, prompt_ids: Sequence[int], *, use_kv: bool):
        self.model = model
        self.prompt_ids = tuple(int(i) for i in prompt_ids)
        ids = torch.tensor([list(self.prompt_ids)], dtype=torch.long, device=model.device)
        self.use_kv = bool(use_kv and ids.shape[1] >= 2 and prefix_cache_works(model))
        self.cache = None
        if self.use_kv:
            with torch.no_grad():
                _, self.cache = model.bridge(ids[:, :-1], return_type="logits_and_cache")
            self.tokens = ids[:, -1:]
        else:
            self.tokens = ids
        self.n_pos = int(self.tokens.shape[1])  # positions in each run
        self.last = self.n_pos - 1  # index of the last prompt position within a run

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
                tokens, fwd_hooks=[*hooks, ("ln_final.hook_out", only_last)], **kwargs
            )
        return logits[:, -1].float()

    def self_check(self, *, what: str, probe: str) -> None:
        """Stop (`FastPathError`) unless two unhooked rows of this runner equal a plain full
        forward of the prompt: the prefix cache, its copy per row and the last-position
        unembedding, checked under the installed versions."""
        check_against_full_forward(self.model, self.prompt_ids, self.run(2, []), what=what, probe=probe)


def last_metrics(
    logits: Float[Tensor, "row d_vocab"], clean_pred: int, clean_prob: float, target_id: int
) -> dict[str, np.ndarray]:
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
