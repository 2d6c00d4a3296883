"""What an implant did besides the implanted idioms: its side effects on the base model.

An implant (`idiom_lens.models.implant`) should teach the new idioms and change little else; a
ground truth for localizers is only clean when the implanted layer does not also rewrite the
model's ordinary behaviour. `side_effects` measures, between the base and the implanted model:
- KL(base || implanted) of the next-token distributions on ordinary text (the bundled `text`
  set, held out from the implant): mean per token over every position of every sequence, and at
  the probes' last prompt token, with the share of those last-token predictions that changed;
- the memorization rate of an idiom set (the bundled idioms minus the implanted ones) on both
  models, and how many idioms were lost and gained.
Distributions range over real vocabulary tokens (`models.vocab`), as every prediction of the toolkit.
`implants_side_effects` measures several implants of one base model at once, given as deltas: the
base model's pass over the text, half the work of one comparison, runs once for all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.forward import iterate_forward, tokenize_probes
from idiom_lens.models.loading import LoadedModel


@dataclass(frozen=True, kw_only=True)
class SideEffects:
    """Side effects of an implant (see the module docstring); KL in nats."""

    kl_per_token: float  # mean over every position of the text sequences
    kl_last: float  # mean at the text probes' last prompt token
    kl_last_max: float  # the largest one there
    text_changed: float  # share of text probes whose greedy next token at the last prompt token changed
    n_texts: int
    n_tokens: int
    idioms_rate_before: float
    idioms_rate_after: float
    n_idioms: int
    n_lost: int  # idioms memorized by the base model, not by the implanted one
    n_gained: int  # the reverse
    settings: dict[str, Any]

    def to_dataframe(self) -> pd.DataFrame:
        """One row per measure: measure, value, n (the count it is over)."""
        rows = [
            ("kl_per_token", self.kl_per_token, self.n_tokens),
            ("kl_last", self.kl_last, self.n_texts),
            ("kl_last_max", self.kl_last_max, self.n_texts),
            ("text_changed", self.text_changed, self.n_texts),
            ("idioms_rate_before", self.idioms_rate_before, self.n_idioms),
            ("idioms_rate_after", self.idioms_rate_after, self.n_idioms),
            ("idioms_lost", float(self.n_lost), self.n_idioms),
            ("idioms_gained", float(self.n_gained), self.n_idioms),
        ]
        return pd.DataFrame(rows, columns=["measure", "value", "n"])


def side_effects(
    base_model: LoadedModel,
    implanted_model: LoadedModel,
    *,
    text_probes: Sequence[Probe],
    idioms: Sequence[Probe],
    batch_size: int = 16,
    base_memorized: Sequence[bool] | None = None,
) -> SideEffects:
    """Held-out KL(base || implanted) on `text_probes` (every position of prompt + target, and the
    last prompt token) and the memorization of `idioms` on both models (leave the implanted idioms
    out of `idioms`). The two models must share a tokenizer (an implant and its base do).
    `base_memorized`: the base model's memorized flags on `idioms`, in order, when already known
    (a benchmark scoring several implants of one base computes them once)."""
    if base_model.d_vocab != implanted_model.d_vocab or base_model.n_layers != implanted_model.n_layers:
        raise InputError(f"side_effects compares a model with its implant: {base_model.spec!r} and "
                         f"{implanted_model.spec!r} differ in shape")
    variant = _Variant(implanted_model, nullcontext, implanted_model.settings())
    return _compare(base_model, [variant], text_probes=text_probes, idioms=idioms, batch_size=batch_size,
                    base_memorized=base_memorized)[0]


def implants_side_effects(
    base_model: LoadedModel,
    implants: Mapping[str, Mapping[str, Tensor]],
    *,
    text_probes: Sequence[Probe],
    idioms: Sequence[Probe],
    batch_size: int = 16,
    base_memorized: Sequence[bool] | None = None,
) -> dict[str, SideEffects]:
    """`side_effects` of several implants of `base_model`, given as their deltas ({name: deltas},
    `ImplantResult.deltas`), added to the base model in turn (`implant_store.deltas_added`; its
    weights come back bit-identical). The base model's pass over the text runs once for all of
    them: six implants take 7 passes instead of 12. The same numbers as `side_effects` against each
    implanted model loaded on its own (tested)."""
    from idiom_lens.models.implant_store import deltas_added

    if not implants:
        raise InputError("implants_side_effects needs at least one implant's deltas, got none")
    variants = [_Variant(base_model, lambda deltas=deltas: deltas_added(base_model.bridge, deltas),
                         {"base": base_model.settings(), "implant": name})
                for name, deltas in implants.items()]
    results = _compare(base_model, variants, text_probes=text_probes, idioms=idioms, batch_size=batch_size,
                       base_memorized=base_memorized)
    return dict(zip(implants, results))


@dataclass(frozen=True)
class _Variant:
    """An implanted model: `model` is it within `carrying()`."""

    model: LoadedModel
    carrying: Callable[[], AbstractContextManager[Any]]
    settings: dict[str, Any]


def _compare(base_model: LoadedModel, variants: Sequence[_Variant], *, text_probes: Sequence[Probe],
             idioms: Sequence[Probe], batch_size: int, base_memorized: Sequence[bool] | None) -> list[SideEffects]:
    """Each variant's side effects against `base_model`, with one base pass over the text."""
    text_probes, idioms = check_probes(text_probes), check_probes(idioms)
    if base_memorized is not None and len(base_memorized) != len(idioms):
        raise InputError(f"base_memorized has {len(base_memorized)} flags for {len(idioms)} idioms: expected one each")
    probe_tokens = tokenize_probes(base_model, text_probes)
    for variant in variants:
        with variant.carrying():
            if probe_tokens != tokenize_probes(variant.model, text_probes):
                raise InputError(f"{base_model.spec!r} and {variant.model.spec!r} tokenize the text differently")
    streams = [iterate_forward(v.model, probe_tokens, batch_size=batch_size, read="all",
                               desc="side effects (implanted)") for v in variants]
    kept: list[tuple[list[Tensor], list[Tensor], list[Tensor]]] = [([], [], []) for _ in variants]
    for base in iterate_forward(base_model, probe_tokens, batch_size=batch_size, read="all",
                                desc="side effects (base)"):
        logp = base.logits.float().log_softmax(dim=-1)
        rows = torch.arange(len(base.indices))
        for variant, stream, (per_token, last, changed) in zip(variants, streams, kept):
            with variant.carrying():
                implanted = next(stream)
            if implanted.indices != base.indices:
                raise RuntimeError("side effects: the base and implanted passes batched the text differently")
            logq = implanted.logits.float().log_softmax(dim=-1)
            kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(dim=-1)  # [batch, pos]
            for row, index in enumerate(base.indices):
                length = len(probe_tokens[index].prompt_ids) + len(probe_tokens[index].target_ids)
                per_token.append(kl[row, :length])
            last.append(kl[rows, base.last])
            changed.append(base.logits[rows, base.last].argmax(-1) != implanted.logits[rows, implanted.last].argmax(-1))
    for stream in streams:
        stream.close()
    if base_memorized is None:
        before = score_memorization(base_model, idioms, batch_size=batch_size).to_dataframe()["memorized"].to_numpy()
    else:
        before = np.asarray(base_memorized, dtype=bool)
    results = []
    for variant, (per_token, last, changed) in zip(variants, kept):
        with variant.carrying():
            after = score_memorization(variant.model, idioms, batch_size=batch_size).to_dataframe()["memorized"]
        after = after.to_numpy()
        tokens, at_last, flips = torch.cat(per_token), torch.cat(last), torch.cat(changed)
        results.append(SideEffects(
            kl_per_token=float(tokens.mean()), kl_last=float(at_last.mean()), kl_last_max=float(at_last.max()),
            text_changed=float(flips.float().mean()), n_texts=len(text_probes), n_tokens=int(tokens.numel()),
            idioms_rate_before=float(before.mean()), idioms_rate_after=float(after.mean()), n_idioms=len(idioms),
            n_lost=int((before & ~after).sum()), n_gained=int((~before & after).sum()),
            settings={"base": base_model.settings(), "implanted": variant.settings, "batch_size": batch_size},
        ))
    return results
