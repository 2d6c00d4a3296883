"""The controls beside each targeted knockout: random neurons and the magnitude-matched set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from idiom_lens.analyses.interventions.knockouts.grid import KnockoutCell
from idiom_lens.errors import InputError


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_neurons(*, probe_id: str, layer: int, k: int, d_mlp: int, seed: int) -> Int[Tensor, " k"]:
    """The random control's k neurons of one layer for one probe: a seeded draw that depends only
    on (seed, probe id, layer, k), so that it is the same in every run, batch and window."""
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k))
    return torch.randperm(d_mlp, generator=gen)[:k]


def matched_neurons(
    scores: Float[Tensor, " d_mlp"], top: Int[Tensor, " k"], *, probe_id: str, layer: int, k: int, seed: int,
) -> Int[Tensor, " n"]:
    """The magnitude-matched control of one layer for one probe: neurons outside `top` in a seeded
    random order (per seed, probe id, layer, k), the shortest prefix whose summed score reaches the
    top's summed score, minus its last neuron when the sum without it is closer; every neuron
    outside `top` when even their total falls short."""
    d_mlp = scores.shape[0]
    outside = torch.ones(d_mlp, dtype=torch.bool)
    outside[top] = False
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k, "matched"))
    order = torch.randperm(d_mlp, generator=gen)
    order = order[outside[order]]
    if len(top) == 0 or len(order) == 0:
        return order[:0]
    goal = float(scores[top].double().sum())
    cumulative = scores[order].double().cumsum(0)
    reached = int(torch.searchsorted(cumulative, torch.tensor([goal], dtype=torch.float64))[0])
    if reached >= len(order):
        return order
    n = reached + 1
    below = float(cumulative[reached - 1]) if reached > 0 else 0.0
    if reached > 0 and goal - below < float(cumulative[reached]) - goal:
        n = reached
    return order[:n]


@dataclass
class _ProbeNeurons:
    """Per probe: which neurons each control picks in each layer (cached), and their scores."""

    order: Int[Tensor, "layer d_mlp"]  # the ranking, best first
    effective: Float[Tensor, "layer d_mlp"]  # effective scores (for matching and shares)
    probe_id: str
    seed: int
    cache: dict = field(default_factory=dict)

    @property
    def d_mlp(self) -> int:
        return int(self.order.shape[1])

    def chosen(self, control: str, layer: int, k: int) -> Tensor:
        """The set that stands in for the top-k in this layer (kept by keep_top, zeroed by zero_top)."""
        k = min(k, self.d_mlp)
        if control in ("targeted", "whole_mlp"):
            return self.order[layer, :k] if control == "targeted" else self.order[layer]
        key = (control, layer, k)
        if key not in self.cache:
            if control == "random":
                self.cache[key] = random_neurons(probe_id=self.probe_id, layer=layer, k=k, d_mlp=self.d_mlp,
                                                 seed=self.seed)
            elif control == "matched":
                self.cache[key] = matched_neurons(self.effective[layer], self.order[layer, :k],
                                                  probe_id=self.probe_id, layer=layer, k=k, seed=self.seed)
            else:
                raise InputError(f"unknown control {control!r}")
        return self.cache[key]

    def zero_mask(self, config: KnockoutCell, layer: int) -> Bool[Tensor, " d_mlp"]:
        """True for the neurons the configuration zeroes in `layer`."""
        chosen = self.chosen(config.control, layer, config.k)
        mask = torch.zeros(self.d_mlp, dtype=torch.bool)
        mask[chosen] = True
        return mask if config.mode == "zero_top" or config.control == "whole_mlp" else ~mask

    def config_stats(self, config: KnockoutCell) -> tuple[int, float, float]:
        """(neurons zeroed, their share of the window's summed effective score, summed score of the
        set standing in for the top-k / the top-k's summed score), over the window's layers."""
        zeroed, zeroed_score, total, chosen_score, top_score = 0, 0.0, 0.0, 0.0, 0.0
        for layer in config.layers:
            eff = self.effective[layer].double()
            mask = self.zero_mask(config, layer)
            zeroed += int(mask.sum())
            zeroed_score += float(eff[mask].sum())
            total += float(eff.sum())
            chosen_score += float(eff[self.chosen(config.control, layer, config.k)].sum())
            top_score += float(eff[self.chosen("targeted" if config.control != "whole_mlp" else "whole_mlp",
                                               layer, config.k)].sum())
        share = zeroed_score / total if total > 0 else float("nan")
        ratio = chosen_score / top_score if top_score > 0 else float("nan")
        return zeroed, share, ratio
