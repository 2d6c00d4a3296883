"""The controls beside each targeted knockout: random neurons, the set matched on the removed
vector's norm (``matched``) and the set matched on the summed scalar score (``matched_score``).

What a knockout removes from a layer is a vector: with the post-MLP norm's scale frozen at its
clean value s, zeroing the neurons S takes sum_{i in S} a_i x W_out[i] x g / s out of what the
layer writes into the residual stream (a_i the activations at the last prompt position, g the
post-MLP norm's gain; g = s = 1 without a post-MLP norm); a mean ablation takes
sum_{i in S} (a_i - mean_i) x W_out[i] x g / s. These per-neuron vectors are the neuron's
*contributions* here. Contributions cancel, so a set whose summed scalar scores match the top-k's
can remove a much shorter vector (on Gemma 3 270M about 0.4x the top-100's): ``matched`` matches
the removed vector's norm instead, ``matched_score`` is kept to compare with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from idiom_lens.analyses.interventions.knockouts.grid import KnockoutCell
from idiom_lens.errors import InputError

MATCH_CANDIDATES = 256  # seeded random sets drawn by `matched_neurons` before its swaps
MATCH_TOLERANCE = 0.01  # `matched_neurons` stops swapping once |norm / target - 1| is within this


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_neurons(*, probe_id: str, layer: int, k: int, d_mlp: int, seed: int) -> Int[Tensor, " k"]:
    """The random control's k neurons of one layer for one probe: a seeded draw that depends only
    on (seed, probe id, layer, k), so that it is the same in every run, batch and window."""
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k))
    return torch.randperm(d_mlp, generator=gen)[:k]


WALK_ROUNDS = 4


def _walk(u: Tensor, chosen: Tensor, in_set: Tensor, target: float) -> tuple[Tensor, Tensor]:
    """One round of exchanges along the removed vector's direction r^: the members least along r^
    for the outside neurons most along it (to lengthen; the reverse to shorten), one pair at a
    time, stopping at the prefix whose norm lands closest to `target`. Returns the new set (`chosen`
    itself when no exchange brings the norm closer) and its removed vector; updates `in_set`."""
    removed = u[chosen].sum(0)
    norm = float(removed.norm())
    if norm == 0:
        return chosen, removed
    along = u @ (removed / norm)
    longer = norm < target
    members = chosen[along[chosen].argsort(descending=not longer, stable=True)]
    outside = (~in_set).nonzero().flatten()
    outside = outside[along[outside].argsort(descending=longer, stable=True)][: len(members)]
    m = len(outside)
    members = members[:m]
    gain = along[outside] - along[members]
    useful = int((gain > 0).sum()) if longer else int((gain < 0).sum())  # prefix that moves the right way
    steps = removed + (u[outside[:useful]] - u[members[:useful]]).cumsum(0)  # after 1..useful exchanges
    norms = torch.cat([torch.tensor([norm], dtype=steps.dtype), steps.norm(dim=-1)])
    t = int((norms - target).abs().argmin())
    if t == 0:
        return chosen, removed
    in_set[members[:t]], in_set[outside[:t]] = False, True
    keep = ~torch.isin(chosen, members[:t])
    chosen = torch.cat([chosen[keep], outside[:t]])
    return chosen, u[chosen].sum(0)


def _distance(squared_norms: Tensor, target: float) -> Tensor:
    """|norm - target| for squared norms (rounding below 0 read as 0)."""
    return (squared_norms.clamp(min=0).sqrt() - target).abs()


def matched_neurons(
    contributions: Float[Tensor, "d_mlp d_model"],
    top: Int[Tensor, " k"],
    *,
    probe_id: str,
    layer: int,
    k: int,
    seed: int,
    n_candidates: int = MATCH_CANDIDATES,
    tolerance: float = MATCH_TOLERANCE,
    max_swaps: int | None = None,
) -> Int[Tensor, " n"]:
    """The ``matched`` control of one layer for one probe: as many neurons as `top`, none of them in
    `top`, whose removed vector (the sum of their rows of `contributions`) has a norm as close as
    this search finds to the norm of the vector `top` removes.

    Three steps, deterministic per (seed, probe id, layer, k), each stopping once
    |norm / target - 1| <= `tolerance`:
    1. `n_candidates` seeded random sets of len(top) neurons from outside `top`; the one whose
       removed norm is closest to the target is kept (first on ties).
    2. Up to `WALK_ROUNDS` walks along the removed vector's direction (`_walk`): members least
       along it are exchanged, one pair at a time, for outside neurons most along it (the reverse
       when the norm is too long), stopping at the exchange that lands closest to the target.
    3. Greedy single exchanges (one member for one neuron outside the set and outside `top`), each
       made only if it brings the norm closer: the member whose removal alone lands closest, for
       the outside neuron that then lands closest; when that member has no such exchange, the best
       of every (member, outside neuron) pair. At most `max_swaps` (default len(top)); the search
       stops early when no exchange helps.

    When a random set already lands within `tolerance`, the control is a random set; otherwise the
    exchanges lean towards neurons whose contributions add up, so the set is random only in where it
    started. Where no set of this size reaches the target (the top-k's contributions are the
    layer's largest and point one way), the set is the closest found: callers report the achieved
    ratio (`matched_norm_ratio`). Fewer than len(top) neurons outside `top`: all of them.
    """
    d_mlp = contributions.shape[0]
    outside = torch.ones(d_mlp, dtype=torch.bool)
    outside[top] = False
    pool = outside.nonzero().flatten()
    n = min(len(top), len(pool))
    if n == 0:
        return pool[:0]
    if n == len(pool):
        return pool
    u = contributions[pool].double()  # [P, d_model]
    target = float(contributions[top].double().sum(0).norm())
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k, "matched_norm"))
    candidates = torch.stack([torch.randperm(len(pool), generator=gen)[:n] for _ in range(n_candidates)])
    sums = torch.nn.functional.embedding_bag(candidates, u, mode="sum")  # [n_candidates, d_model]
    best = int((sums.norm(dim=-1) - target).abs().argmin())
    chosen = candidates[best].clone()  # indices into pool
    removed = sums[best].clone()
    in_set = torch.zeros(len(pool), dtype=torch.bool)
    in_set[chosen] = True
    for _ in range(WALK_ROUNDS):
        if abs(float(removed.norm()) - target) <= tolerance * target:
            break
        walked, removed = _walk(u, chosen, in_set, target)
        if walked is chosen:  # no exchange brought it closer
            break
        chosen = walked
    squares = (u * u).sum(-1)  # ||u_j||^2
    for _ in range(n if max_swaps is None else max_swaps):
        gap = abs(float(removed.norm()) - target)
        if gap <= tolerance * target:
            break
        along = u @ removed  # r . u_j
        # ||r - u_a||^2 for the set's members a; then ||r - u_a + u_j||^2 = that + 2 (r - u_a) . u_j + ||u_j||^2
        without = float(removed @ removed) - 2 * along[chosen] + squares[chosen]
        a = int(_distance(without, target).argmin())  # the member whose removal lands closest
        new_sq = without[a] + 2 * (along - u @ u[chosen[a]]) + squares
        new_sq[in_set] = float("inf")
        error = _distance(new_sq, target)
        j = int(error.argmin())
        if float(error[j]) >= gap:  # that member has no good exchange: search every pair
            new_sq = without[:, None] + (2 * along + squares)[None, :] - 2 * (u[chosen] @ u.T)
            new_sq[:, in_set] = float("inf")
            error = _distance(new_sq, target)
            a, j = divmod(int(error.argmin()), len(pool))
            if float(error[a, j]) >= gap:
                break
        in_set[chosen[a]], in_set[j] = False, True
        chosen[a] = j
        removed = u[chosen].sum(0)
    return pool[chosen.sort().values]


def score_matched_neurons(
    scores: Float[Tensor, " d_mlp"], top: Int[Tensor, " k"], *, probe_id: str, layer: int, k: int, seed: int,
) -> Int[Tensor, " n"]:
    """The ``matched_score`` control (the earlier "magnitude-matched" one) of one layer for one
    probe: neurons outside `top` in a seeded random order (per seed, probe id, layer, k), the
    shortest prefix whose summed score reaches the top's summed score, minus its last neuron when
    the sum without it is closer; every neuron outside `top` when even their total falls short.
    Scalar scores add up where the vectors they measure cancel: see `matched_neurons`."""
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
    """Per probe: which neurons each control picks in each layer (cached), their scores and what
    removing them takes out of each layer's output.

    `vectors` (the value vectors times the post-MLP gain, W_out[i] x g, shared by every probe) and
    `coefficients` ((activation - ablation value) / clean post-norm scale, at the last prompt
    position) give neuron i's contribution in `layer`: coefficients[layer, i] x vectors[layer, i].
    Without them the ``matched`` control and `matched_norm_ratio` are not available."""

    order: Int[Tensor, "layer d_mlp"]  # the ranking, best first
    effective: Float[Tensor, "layer d_mlp"]  # effective scores (for matched_score and shares)
    probe_id: str
    seed: int
    vectors: Float[Tensor, "layer d_mlp d_model"] | None = None
    coefficients: Float[Tensor, "layer d_mlp"] | None = None
    cache: dict = field(default_factory=dict)

    @property
    def d_mlp(self) -> int:
        return int(self.order.shape[1])

    def contributions(self, layer: int) -> Float[Tensor, "d_mlp d_model"]:
        """Every neuron's contribution in `layer` (what knocking it out removes), float64."""
        if self.vectors is None or self.coefficients is None:
            raise InputError("the matched control needs the value vectors and coefficients")
        return self.vectors[layer].double() * self.coefficients[layer].double()[:, None]

    def removed_norm(self, config: KnockoutCell, layer: int) -> float:
        """||sum of the contributions of the neurons `config` knocks out in `layer`||: what knocking
        them out removes from the layer's output at the last position (through the clean post-norm
        scale). One matrix-vector product, cached per (layer, mode, control, k)."""
        key = ("removed", layer, config.mode, config.control, config.k)
        if key not in self.cache:
            if self.vectors is None or self.coefficients is None:
                raise InputError("removed vectors need the value vectors and coefficients")
            weights = self.coefficients[layer].float() * self.zero_mask(config, layer).float()
            self.cache[key] = float((weights @ self.vectors[layer].float()).norm())
        return self.cache[key]

    def chosen(self, control: str, layer: int, k: int) -> Tensor:
        """The set that stands in for the top-k in this layer (kept by keep_top, zeroed by zero_top)."""
        k = min(k, self.d_mlp)
        if control in ("targeted", "whole_mlp"):
            return self.order[layer, :k] if control == "targeted" else self.order[layer]
        if k == 0:
            return self.order[layer, :0]
        key = (control, layer, k)
        if key not in self.cache:
            top = self.order[layer, :k]
            if control == "random":
                self.cache[key] = random_neurons(probe_id=self.probe_id, layer=layer, k=k, d_mlp=self.d_mlp,
                                                 seed=self.seed)
            elif control == "matched":
                self.cache[key] = matched_neurons(self.contributions(layer), top, probe_id=self.probe_id,
                                                  layer=layer, k=k, seed=self.seed)
            elif control == "matched_score":
                self.cache[key] = score_matched_neurons(self.effective[layer], top, probe_id=self.probe_id,
                                                        layer=layer, k=k, seed=self.seed)
            else:
                raise InputError(f"unknown control {control!r}")
        return self.cache[key]

    def zero_mask(self, config: KnockoutCell, layer: int) -> Bool[Tensor, " d_mlp"]:
        """True for the neurons the configuration knocks out in `layer`."""
        chosen = self.chosen(config.control, layer, config.k)
        mask = torch.zeros(self.d_mlp, dtype=torch.bool)
        mask[chosen] = True
        return mask if config.mode == "zero_top" or config.control == "whole_mlp" else ~mask

    def config_stats(self, config: KnockoutCell) -> dict[str, float]:
        """Over the window's layers: `n_zeroed` (neurons knocked out), `zeroed_share` (their share of
        the window's summed effective score), `score_ratio` (summed score of the set standing in for
        the top-k / the top-k's) and `matched_norm_ratio` (the mean over the window's layers of the
        norm of the vector this configuration removes / the norm of the vector its targeted
        counterpart, same mode and k, removes; 1 for targeted rows, NaN for the whole-MLP ceiling,
        which has no counterpart, and without contributions)."""
        zeroed, zeroed_score, total, chosen_score, top_score = 0, 0.0, 0.0, 0.0, 0.0
        ratios = []
        for layer in config.layers:
            eff = self.effective[layer].double()
            mask = self.zero_mask(config, layer)
            zeroed += int(mask.sum())
            zeroed_score += float(eff[mask].sum())
            total += float(eff.sum())
            chosen_score += float(eff[self.chosen(config.control, layer, config.k)].sum())
            top_score += float(eff[self.chosen("targeted" if config.control != "whole_mlp" else "whole_mlp",
                                               layer, config.k)].sum())
            if config.control != "whole_mlp" and self.vectors is not None:
                target = self.removed_norm(KnockoutCell(config.mode, "targeted", config.k, layer, layer), layer)
                mine = self.removed_norm(config, layer)
                ratios.append(mine / target if target > 0 else float("nan"))
        share = zeroed_score / total if total > 0 else float("nan")
        ratio = chosen_score / top_score if top_score > 0 else float("nan")
        norm_ratio = float(np.mean(ratios)) if ratios else float("nan")
        return {"n_zeroed": zeroed, "zeroed_share": share, "score_ratio": ratio, "matched_norm_ratio": norm_ratio}
