"""Attribution patching: the gradient (first-order) estimate of activation patching, and how well
it agrees with the exact patching of `patching.py`.

Exact patching (`patch_pair`) runs the corrupted prompt once per (site, layer, position) with the
clean activation written in. Attribution patching (Nanda 2023; Syed et al. 2023) replaces those
runs by one linearization around the corrupted run:

    patched_logit - corrupted_logit  ~=  (a_clean - a_corrupted) . d(target_logit) / d(a)  at a_corrupted

summed over d_model, for every cell at once: one forward of the clean prompt (its activations) and
one forward plus one backward of the corrupted prompt (its activations and their gradients). The
metric is the one exact patching uses, the target token's logit at the last prompt position, so
`PairPatching.restored` and every table, plot and summary work unchanged. It is exact where the
logit is linear in the patched activation and drifts from exact patching where it is not
(attention patterns, MLP nonlinearities and norms between the cell and the logit):
`patching_agreement` measures how far, pair by pair.

TransformerLens 4.3 ships `attribution_patch` (`transformer_lens.tools.analysis`), but it scores
its own nodes (the embedding, each head's `attn.hook_z`, `hook_mlp_out`): not `hook_resid_pre`,
and not `hook_attn_out`, which on Gemma 3 comes after the post-attention norm, so per-head scores
of `hook_z` do not add up to it. Its building block `cache_activation_and_gradient` takes any hook
names and reads the gradients through backward hooks (the bridge hands forward hooks a reshaped
view at some points, whose `.grad` stays empty); it gives the right gradients on this bridge
(Gemma 3 and Llama, both with grouped-query attention: the tests compare it with finite
differences of the exact patched logit), so it is used here. Each pair's clean and corrupted
logits are checked against a plain full forward before anything is returned (first pair of a
probe set; every standalone call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from idiom_lens.analyses.interventions.patching import (
    PATCH_SITES,
    SITE_HOOKS,
    Corruption,
    PairPatching,
    PatchingOptions,
    PatchingResult,
    _check_pair,
    _patch_set,
    patch_probes,
)
from idiom_lens.analyses.saved import Saved, SavedTables
from idiom_lens.analyses.stats import bootstrap_mean_ci
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import masked_prediction
from idiom_lens.models.selfcheck import check_against_full_forward, versions_text
from idiom_lens.models.vocab import valid_mask

ALL = "all"  # the site (or variant) label of every site (variant) taken together


# --------------------------------------------------------------------------------------
# One pair
# --------------------------------------------------------------------------------------


def _capture(
    model: LoadedModel, ids: Sequence[int], target_id: int, names: list[str], *, gradient: bool
) -> tuple[dict[str, Tensor], dict[str, Tensor], Float[Tensor, " d_vocab"]]:
    """One forward of `ids` (and, with `gradient`, one backward of the target logit at the last
    position): each hook's activation [pos, d_model], its gradient (empty without `gradient`), and
    the last-position logits."""
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    seen: dict[str, Tensor] = {}

    def metric(logits: Tensor) -> Tensor:
        seen["logits"] = logits[0, -1].detach().float()
        return logits[0, -1, target_id]

    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
    with torch.enable_grad():
        cache = cache_activation_and_gradient(model.bridge, tokens, metric, names_filter=names,
                                              compute_gradient=gradient)
    missing = [n for n in names if n not in cache.activations or (gradient and cache.gradients.get(n) is None)]
    if missing:
        raise FastPathError(
            f"attribution patching: the bridge gave no {'gradient' if gradient else 'activation'} at "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({versions_text()}); nothing was written"
        )
    acts = {n: cache.activations[n][0].float() for n in names}
    grads = {n: cache.gradients[n][0].float() for n in names} if gradient else {}  # type: ignore[index]
    return acts, grads, seen["logits"]


def _attribute(
    model: LoadedModel, *, clean_ids: Sequence[int], corrupted_ids: Sequence[int], target_id: int,
    sites: Sequence[str],
) -> tuple[PairPatching, Float[Tensor, " d_vocab"], Float[Tensor, " d_vocab"]]:
    """The estimate of one pair, with the clean and corrupted last-position logits it used."""
    _check_pair(clean_ids, corrupted_ids, sites)
    n_layers = model.n_layers
    names = [f"blocks.{l}.{SITE_HOOKS[s]}" for s in sites for l in range(n_layers)]
    clean_acts, _, clean_logits = _capture(model, clean_ids, target_id, names, gradient=False)
    corr_acts, corr_grads, corr_logits = _capture(model, corrupted_ids, target_id, names, gradient=True)
    change = torch.stack([((clean_acts[n] - corr_acts[n]) * corr_grads[n]).sum(-1) for n in names])  # [site*layer, pos]
    corrupted_logit = float(corr_logits[target_id])
    patched = (corrupted_logit + change.double()).float().reshape(len(sites), n_layers, len(clean_ids))
    valid = valid_mask(model)
    result = PairPatching(
        tuple(sites), patched, float(clean_logits[target_id]), corrupted_logit,
        masked_prediction(clean_logits, valid)[0], masked_prediction(corr_logits, valid)[0],
    )
    return result, clean_logits, corr_logits


def attribution_patch_pair(
    model: LoadedModel,
    *,
    clean_ids: Sequence[int],
    corrupted_ids: Sequence[int],
    target_id: int,
    sites: Sequence[str] = PATCH_SITES,
    check: bool = True,
) -> PairPatching:
    """Attribution-patching estimate of patching clean into corrupted at every (site, layer, position).

    `patched` is corrupted_logit + (clean_act - corrupted_act) . d(target_logit)/d(act), the
    gradient taken on the corrupted run, so `.restored` is the estimated restored share. With
    `check` (default) the clean and corrupted logits used are compared with a plain full forward
    (`FastPathError` when they differ); a probe set checks its first pair only.
    """
    result, clean_logits, corr_logits = _attribute(
        model, clean_ids=clean_ids, corrupted_ids=corrupted_ids, target_id=target_id, sites=sites)
    if check:
        check_against_full_forward(model, clean_ids, clean_logits, what="attribution patching (clean run)",
                                   probe="pair")
        check_against_full_forward(model, corrupted_ids, corr_logits, what="attribution patching (corrupted run)",
                                   probe="pair")
    return result


# --------------------------------------------------------------------------------------
# A probe set
# --------------------------------------------------------------------------------------


def attribution_patch_probes(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: PatchingOptions = PatchingOptions(method="attribution"),
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchingResult:
    """`patch_probes` by attribution patching: the same pairs (`make_corruptions` with the same
    options), the same tables and columns, `settings["method"] == "attribution"`.
    `options.method` is not read here (`patch` dispatches on it).

    `batch_size` is accepted so that both methods take the same arguments; attribution patching
    runs one prompt at a time and does not use it. Raises `FastPathError` when the first pair's
    clean or corrupted logits differ from a plain full forward.
    """
    del batch_size  # one forward (clean) and one forward + backward (corrupted) per pair: nothing to batch
    _check_pair((), (), options.sites)

    def attribution(model: LoadedModel, pair: Corruption, first: bool) -> PairPatching:
        result, clean_logits, corr_logits = _attribute(
            model, clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids, target_id=pair.target_id,
            sites=options.sites)
        if first:  # the hooked, grad-enabled runs under the installed versions, against a plain full forward
            check_against_full_forward(model, pair.clean_ids, clean_logits,
                                       what="attribution patching (clean run)", probe=pair.probe_id)
            check_against_full_forward(model, pair.corrupted_ids, corr_logits,
                                       what="attribution patching (corrupted run)", probe=pair.probe_id)
        return result

    notes = {"estimate": "patched - corrupted ~= (clean_act - corrupted_act) . d(target logit)/d(act) at the "
                         "corrupted run"}
    return _patch_set(model, probes, options, attribution, method="attribution", notes=notes, progress=progress)


# --------------------------------------------------------------------------------------
# Agreement with exact patching
# --------------------------------------------------------------------------------------

_KEYS = ["probe_id", "variant", "site", "layer", "pos"]


def pearson(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"]) -> float:
    """Pearson correlation, NaN when either side is constant (no spread to correlate)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def top_overlap(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"], top: int) -> float:
    """|A ∩ B| / k for the k = min(top, n) cells of largest |value| on each side (ties: cell order)."""
    k = min(top, len(x))
    a = set(np.argsort(-np.abs(np.asarray(x)), kind="stable")[:k].tolist())
    b = set(np.argsort(-np.abs(np.asarray(y)), kind="stable")[:k].tolist())
    return len(a & b) / k if k else float("nan")


def _mean_interval(
    values: Float[np.ndarray, " n"], *, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Mean over pairs and its percentile-bootstrap interval (NaN values left out)."""
    values = np.asarray(values, dtype=np.float64)
    mean, low, high = bootstrap_mean_ci(values[~np.isnan(values)], n_boot=n_boot, level=level, seed=rng)
    return float(mean), float(low), float(high)


@dataclass(frozen=True)
class AgreementResult(Saved):
    """How attribution patching agrees with exact patching, pair by pair.

    `rows`: one row per (pair, site) with the Pearson correlation of the restored shares over the
    (layer, position) cells and the overlap of the top-`top` cells by |restored|; site "all" takes
    the pair's cells of every site together. `table`: per variant (and "all" when there are
    several) and site, the mean of
    both over pairs with a percentile-bootstrap interval, and the pooled correlation over every
    cell of every pair. Valid pairs (in both results) only. Saved as `agreement.parquet` and
    `agreement_summary.parquet` plus the descriptor.
    """

    rows: pd.DataFrame  # probe_id, variant, site, n_cells, correlation, overlap
    table: pd.DataFrame  # variant, site, n_pairs, correlation(+low/high), overlap(+low/high), pooled_correlation
    settings: dict[str, Any]

    default_name: ClassVar[str] = "agreement"

    def to_dataframe(self) -> pd.DataFrame:
        return self.rows.copy()

    def summary(self) -> pd.DataFrame:
        return self.table.copy()

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.rows, "summary": self.table}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> AgreementResult:
        return cls(rows=saved.tables[""], table=saved.tables["summary"], settings=saved.settings)


def patching_agreement(
    exact: PatchingResult,
    approx: PatchingResult,
    *,
    top: int = 5,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AgreementResult:
    """Agreement of `approx` (attribution patching) with `exact` (activation patching) on the
    restored share: per (pair, site), per site and overall (see `AgreementResult`).

    Raises `InputError` unless both results hold the same pairs and the same (site, layer,
    position) cells: agreement over different pairs would compare nothing.
    """
    if top < 1:
        raise InputError(f"top must be >= 1, got {top}")
    pairs_a = set(map(tuple, exact.pairs[["probe_id", "variant"]].to_numpy().tolist()))
    pairs_b = set(map(tuple, approx.pairs[["probe_id", "variant"]].to_numpy().tolist()))
    if pairs_a != pairs_b:
        raise InputError(
            f"the two patching results cover different pairs: {len(pairs_a - pairs_b)} only in the first, "
            f"{len(pairs_b - pairs_a)} only in the second (e.g. {sorted(pairs_a ^ pairs_b)[:2]}); run both with the "
            "same probes, variants, seed, bank and keep_last"
        )
    a = exact.rows[_KEYS + ["restored"]]
    b = approx.rows[_KEYS + ["restored"]]
    cells = a.merge(b, on=_KEYS, how="outer", suffixes=("_exact", "_approx"), indicator=True)
    if (cells["_merge"] != "both").any() or len(cells) != len(a) or len(cells) != len(b):
        raise InputError(
            f"the two patching results cover different cells (site, layer, position): {len(a)} and {len(b)} rows, "
            f"{int((cells['_merge'] != 'both').sum())} in one only; run both with the same sites and model"
        )
    valid_a = exact.pairs.set_index(["probe_id", "variant"])["valid"].astype(bool)
    valid_b = approx.pairs.set_index(["probe_id", "variant"])["valid"].astype(bool)
    valid = (valid_a & valid_b.reindex(valid_a.index)).rename("valid").reset_index()
    cells = cells.drop(columns="_merge").merge(valid, on=["probe_id", "variant"])
    cells = cells[cells["valid"]].sort_values(_KEYS, kind="stable")

    sites = list(dict.fromkeys(exact.rows["site"]))
    records = []
    for (probe_id, variant), part in cells.groupby(["probe_id", "variant"], sort=False):
        for site in [*sites, ALL]:
            sub = part if site == ALL else part[part["site"] == site]
            x, y = sub["restored_exact"].to_numpy(), sub["restored_approx"].to_numpy()
            records.append({"probe_id": probe_id, "variant": variant, "site": site, "n_cells": len(sub),
                            "correlation": pearson(x, y), "overlap": top_overlap(x, y, top)})
    rows = pd.DataFrame(records, columns=["probe_id", "variant", "site", "n_cells", "correlation", "overlap"])

    rng = np.random.default_rng(seed)
    summary = []
    variants = sorted(set(rows["variant"]))
    for variant in variants + ([ALL] if len(variants) > 1 else []):
        for site in [*sites, ALL]:
            sub = rows[(rows["site"] == site) & ((rows["variant"] == variant) | (variant == ALL))]
            pooled = cells[(cells["variant"] == variant) | (variant == ALL)]
            pooled = pooled if site == ALL else pooled[pooled["site"] == site]
            corr = _mean_interval(sub["correlation"].to_numpy(), n_boot=n_boot, level=level, rng=rng)
            over = _mean_interval(sub["overlap"].to_numpy(), n_boot=n_boot, level=level, rng=rng)
            summary.append({
                "variant": variant, "site": site, "n_pairs": len(sub),
                "correlation": corr[0], "correlation_low": corr[1], "correlation_high": corr[2],
                "overlap": over[0], "overlap_low": over[1], "overlap_high": over[2],
                "pooled_correlation": pearson(pooled["restored_exact"].to_numpy(), pooled["restored_approx"].to_numpy())
                if len(pooled) else float("nan"),
            })
    table = pd.DataFrame(summary, columns=["variant", "site", "n_pairs", "correlation", "correlation_low",
                                           "correlation_high", "overlap", "overlap_low", "overlap_high",
                                           "pooled_correlation"])
    settings = {
        "analysis": "patching_agreement", "top": top, "n_boot": n_boot, "level": level, "seed": seed,
        "methods": [str(exact.settings.get("method", "exact")), str(approx.settings.get("method", "attribution"))],
        "n_pairs": len(pairs_a), "n_valid_pairs": int(valid["valid"].sum()),
        "metric": "restored share of the target logit; Pearson over (layer, position) cells; top cells by |restored|",
    }
    return AgreementResult(rows, table, settings)


def patch(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: PatchingOptions = PatchingOptions(),
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchingResult:
    """Activation patching, exact (`patching.patch_probes`) or estimated by attribution patching
    (`attribution_patch_probes`), as `options.method` says."""
    run = patch_probes if options.method == "exact" else attribution_patch_probes
    return run(model, probes, options, batch_size=batch_size, progress=progress)
