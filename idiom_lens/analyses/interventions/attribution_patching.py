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
`patching_agreement` measures how far, pair by pair (Pearson and Spearman correlations, top-cell
overlap and recall, and the largest exact cell: its value, its estimate and the rank the estimate
gives it), leaving out the cells before the first swapped token, where both methods are zero by
construction.

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
    model: LoadedModel, ids: Sequence[int], target_id: int, names: list[str], *, gradient: bool,
    suffix_ids: Sequence[int] = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor], Float[Tensor, " d_vocab"]]:
    """One forward of `ids` (+ a masked LM's `suffix_ids`) and, with `gradient`, one backward of the
    target logit at the read position (the last of `ids`): each hook's activation [pos, d_model] at
    the positions of `ids`, its gradient (empty without `gradient`), and the read-position logits."""
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    seen: dict[str, Tensor] = {}

    read = len(ids) - 1

    def metric(logits: Tensor) -> Tensor:
        seen["logits"] = logits[0, read].detach().float()
        return logits[0, read, target_id]

    tokens = torch.tensor([[*ids, *suffix_ids]], dtype=torch.long, device=model.device)
    with torch.enable_grad():
        cache = cache_activation_and_gradient(model.bridge, tokens, metric, names_filter=names,
                                              compute_gradient=gradient)
    missing = [n for n in names if n not in cache.activations or (gradient and cache.gradients.get(n) is None)]
    if missing:
        raise FastPathError(
            f"attribution patching: the bridge gave no {'gradient' if gradient else 'activation'} at "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} ({versions_text()}); nothing was written"
        )
    acts = {n: cache.activations[n][0, : len(ids)].float() for n in names}
    grads = {n: cache.gradients[n][0, : len(ids)].float() for n in names} if gradient else {}  # type: ignore[index]
    return acts, grads, seen["logits"]


def _attribute(
    model: LoadedModel, *, clean_ids: Sequence[int], corrupted_ids: Sequence[int], target_id: int,
    sites: Sequence[str], suffix_ids: Sequence[int] = (),
) -> tuple[PairPatching, Float[Tensor, " d_vocab"], Float[Tensor, " d_vocab"]]:
    """The estimate of one pair, with the clean and corrupted last-position logits it used."""
    _check_pair(clean_ids, corrupted_ids, sites)
    n_layers = model.n_layers
    names = [f"blocks.{l}.{SITE_HOOKS[s]}" for s in sites for l in range(n_layers)]
    clean_acts, _, clean_logits = _capture(model, clean_ids, target_id, names, gradient=False, suffix_ids=suffix_ids)
    corr_acts, corr_grads, corr_logits = _capture(model, corrupted_ids, target_id, names, gradient=True,
                                                  suffix_ids=suffix_ids)
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
    suffix_ids: Sequence[int] = (),
) -> PairPatching:
    """Attribution-patching estimate of patching clean into corrupted at every (site, layer, position).

    `patched` is corrupted_logit + (clean_act - corrupted_act) . d(target_logit)/d(act), the
    gradient taken on the corrupted run, so `.restored` is the estimated restored share. With
    `check` (default) the clean and corrupted logits used are compared with a plain full forward
    (`FastPathError` when they differ); a probe set checks its first pair only. A masked LM's prompts
    end with the mask and are both followed by `suffix_ids` ([SEP]).
    """
    result, clean_logits, corr_logits = _attribute(
        model, clean_ids=clean_ids, corrupted_ids=corrupted_ids, target_id=target_id, sites=sites,
        suffix_ids=suffix_ids)
    if check:
        check_against_full_forward(model, clean_ids, clean_logits, what="attribution patching (clean run)",
                                   probe="pair", suffix_ids=suffix_ids)
        check_against_full_forward(model, corrupted_ids, corr_logits, what="attribution patching (corrupted run)",
                                   probe="pair", suffix_ids=suffix_ids)
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
            sites=options.sites, suffix_ids=pair.suffix_ids)
        if first:  # the hooked, grad-enabled runs under the installed versions, against a plain full forward
            check_against_full_forward(model, pair.clean_ids, clean_logits, suffix_ids=pair.suffix_ids,
                                       what="attribution patching (clean run)", probe=pair.probe_id)
            check_against_full_forward(model, pair.corrupted_ids, corr_logits, suffix_ids=pair.suffix_ids,
                                       what="attribution patching (corrupted run)", probe=pair.probe_id)
        return result

    notes = {"estimate": "patched - corrupted ~= (clean_act - corrupted_act) . d(target logit)/d(act) at the "
                         "corrupted run"}
    return _patch_set(model, probes, options, attribution, method="attribution", notes=notes, progress=progress)


# --------------------------------------------------------------------------------------
# Agreement with exact patching
# --------------------------------------------------------------------------------------

_KEYS = ["probe_id", "variant", "site", "layer", "pos"]
STRUCTURAL_ZEROS = ("cells at positions before the first position where the clean and corrupted prompts differ "
                    "(decoded tokens): the two runs are identical there (causal attention), so exact and "
                    "attribution patching are both zero by construction")


def pearson(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"]) -> float:
    """Pearson correlation, NaN when either side is constant (no spread to correlate)."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float(np.clip((x * y).sum() / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def spearman(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"]) -> float:
    """Spearman rank correlation: Pearson of the ranks (ties share their average rank); NaN when
    either side is constant."""
    rank_x = pd.Series(np.asarray(x, dtype=np.float64)).rank(method="average").to_numpy()
    rank_y = pd.Series(np.asarray(y, dtype=np.float64)).rank(method="average").to_numpy()
    return pearson(rank_x, rank_y)


def _top_cells(values: Float[np.ndarray, " n"], k: int, atol: float = 0.0) -> set[int]:
    """Indices of the min(k, n) cells of largest |value|; with `atol` > 0 the magnitudes are first
    rounded to multiples of `atol`, so values equal up to rounding noise tie. Ties: cell order."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    if atol > 0:
        magnitude = np.round(magnitude / atol)
    return set(np.argsort(-magnitude, kind="stable")[:k].tolist())


def top_overlap(x: Float[np.ndarray, " n"], y: Float[np.ndarray, " n"], top: int, *, atol: float = 0.0) -> float:
    """|A ∩ B| / k for the k = min(top, n) cells of largest |value| on each side (ties: cell
    order; `atol` as in `_top_cells`)."""
    k = min(top, len(x))
    return len(_top_cells(x, k, atol) & _top_cells(y, k, atol)) / k if k else float("nan")


def top_recall(
    exact: Float[np.ndarray, " n"], approx: Float[np.ndarray, " n"], top: int, shortlist: int, *, atol: float = 0.0
) -> float:
    """Of the k = min(top, n) cells of largest |exact|, the share among the `shortlist` cells of
    largest |approx| (ties: cell order; `atol` as in `_top_cells`): how many of the cells that
    matter an attribution shortlist of that length would catch. With shortlist == top it equals
    `top_overlap`."""
    k = min(top, len(exact))
    return len(_top_cells(exact, k, atol) & _top_cells(approx, shortlist, atol)) / k if k else float("nan")


def first_difference(clean_tokens: Sequence[str], corrupted_tokens: Sequence[str]) -> int:
    """The first position whose clean and corrupted tokens differ; 0 when none does (then no
    position can be shown to be a structural zero, and none is excluded)."""
    return next((i for i, (a, b) in enumerate(zip(clean_tokens, corrupted_tokens, strict=True)) if a != b), 0)


@dataclass(frozen=True)
class CellComparison:
    """Attribution against exact patching over one set of cells (a pair's cells of one site, or of
    all sites): correlations, top-cell agreement and the largest exact cell.

    `spread`: whether the exact values differ by `atol` or more; without spread no cell matters
    more than another (a word swapped at the last prompt position leaves resid_pre only that
    position, which restores everything in every layer), and correlation, spearman, overlap and
    recall are NaN. `largest`: index (in the cells given) of the largest |exact| cell, the first
    in cell order among those within `atol` of it, -1 without cells; `largest_rank`: the rank
    attribution gives it by |estimate|, 1 = first, counting the cells it puts above it by more
    than `atol` (the same tolerance that chose it: otherwise a near-tie, which fp32 rounding
    breaks differently on each CPU, ranks an exact copy of the values second)."""

    n_cells: int
    spread: bool
    correlation: float
    spearman: float
    overlap: float
    recall: float
    largest: int
    largest_exact: float
    largest_approx: float
    largest_rank: float


def compare_cells(
    exact: Float[np.ndarray, " n"],
    approx: Float[np.ndarray, " n"],
    *,
    top: int = 5,
    shortlist: int = 20,
    atol: float = 1e-3,
) -> CellComparison:
    """`CellComparison` of attribution estimates `approx` with exact values `exact` of the same
    cells, in cell order (restored shares): Pearson, Spearman, top-`top` overlap, recall of the
    exact top-`top` in the attribution top-`shortlist`, the largest exact cell.

    `atol`: exact values closer than this are taken as equal (fp32 rounding of the patched logits
    moves a restored share by about 1e-5): for the spread, the top cells and the largest cell.
    NaN (and largest -1) without cells."""
    exact = np.asarray(exact, dtype=np.float64)
    approx = np.asarray(approx, dtype=np.float64)
    nan = float("nan")
    if len(exact) != len(approx):
        raise InputError(f"exact and approx must hold the same cells, got {len(exact)} and {len(approx)} values")
    if len(exact) == 0:
        return CellComparison(0, False, nan, nan, nan, nan, -1, nan, nan, nan)
    magnitude = np.abs(exact)
    largest = int(np.flatnonzero(magnitude >= magnitude.max() - atol)[0])
    spread = bool(np.ptp(exact) >= atol)
    return CellComparison(
        n_cells=len(exact), spread=spread,
        correlation=pearson(exact, approx) if spread else nan,
        spearman=spearman(exact, approx) if spread else nan,
        overlap=top_overlap(exact, approx, top, atol=atol) if spread else nan,
        recall=top_recall(exact, approx, top, shortlist, atol=atol) if spread else nan,
        largest=largest, largest_exact=float(exact[largest]), largest_approx=float(approx[largest]),
        largest_rank=float(1 + np.sum(np.abs(approx) > abs(approx[largest]) + atol)),
    )


def _mean_interval(
    values: Float[np.ndarray, " n"], *, n_boot: int, level: float, rng: np.random.Generator
) -> tuple[float, float, float]:
    """Mean over pairs and its percentile-bootstrap interval (NaN values left out)."""
    values = np.asarray(values, dtype=np.float64)
    mean, low, high = bootstrap_mean_ci(values[~np.isnan(values)], n_boot=n_boot, level=level, seed=rng)
    return float(mean), float(low), float(high)


ROW_COLUMNS = ["probe_id", "variant", "site", "n_cells", "correlation", "overlap",  # the columns of old rows
               "n_excluded", "swap_pos", "spearman", "recall", "largest_site", "largest_layer", "largest_pos",
               "largest_exact", "largest_approx", "largest_rank", "correlation_all_cells"]
MEAN_MEASURES = ("spearman", "recall", "largest_exact", "largest_approx", "largest_rank", "correlation_all_cells")
TABLE_COLUMNS = ["variant", "site", "n_pairs", "correlation", "correlation_low", "correlation_high", "overlap",
                 "overlap_low", "overlap_high", "pooled_correlation",  # the columns of old tables
                 "n_correlated", "n_cells", "n_excluded",
                 *[f"{m}{end}" for m in MEAN_MEASURES for end in ("", "_low", "_high")],
                 "largest_rank_median", "pooled_correlation_all_cells"]

# Two narrower views of the table, for printing and publishing.
CORRELATION_COLUMNS = ["variant", "site", "n_pairs", "n_correlated", "n_cells", "n_excluded", "correlation",
                       "correlation_low", "correlation_high", "spearman", "spearman_low", "spearman_high",
                       "pooled_correlation", "correlation_all_cells", "correlation_all_cells_low",
                       "correlation_all_cells_high", "pooled_correlation_all_cells"]
TOP_CELL_COLUMNS = ["variant", "site", "n_pairs", "overlap", "overlap_low", "overlap_high", "recall", "recall_low",
                    "recall_high", "largest_exact", "largest_exact_low", "largest_exact_high", "largest_approx",
                    "largest_approx_low", "largest_approx_high", "largest_rank", "largest_rank_low",
                    "largest_rank_high", "largest_rank_median"]


@dataclass(frozen=True)
class AgreementResult(Saved):
    """How attribution patching agrees with exact patching, pair by pair.

    `rows`: one row per (pair, site), site "all" taking the pair's cells of every site together,
    over the pair's (layer, position) cells that are not structural zeros (`STRUCTURAL_ZEROS`; all
    cells when the agreement was asked to keep them): n_cells kept and n_excluded, swap_pos (the
    first position where the prompts differ), the Pearson correlation and Spearman rank
    correlation of the restored shares, the overlap of the top-`top` cells by |restored|, the
    recall of the exact top-`top` cells in the attribution top-`shortlist` (these four NaN where
    the kept exact values are all equal: `CellComparison`), the largest exact cell
    (largest_site/_layer/_pos, its exact value largest_exact, its estimate largest_approx, and the
    rank attribution gives it, largest_rank, 1 = first; of exact values equal within `atol` the
    first in cell order: the sites in the results' order, then layer, then position, so the
    earliest layer), and correlation_all_cells: the Pearson
    correlation over every cell, structural zeros included (the measure of older tables).
    `table`: per variant (and "all" when there are several) and site, the mean of every measure
    over pairs with a percentile-bootstrap interval (`_low`/`_high`; NaN left out, n_correlated
    pairs with a correlation), the median largest_rank, the summed n_cells and n_excluded, and
    the correlation pooled over the kept cells of every
    pair (`pooled_correlation`) and over all cells (`pooled_correlation_all_cells`). Valid pairs
    (in both results) only. The columns of older tables come first, under the same names (their
    numbers now over the kept cells). Saved as `agreement.parquet` and
    `agreement_summary.parquet` plus the descriptor.
    """

    rows: pd.DataFrame  # ROW_COLUMNS
    table: pd.DataFrame  # TABLE_COLUMNS
    settings: dict[str, Any]

    default_name: ClassVar[str] = "agreement"

    def to_dataframe(self) -> pd.DataFrame:
        return self.rows.copy()

    def summary(self) -> pd.DataFrame:
        return self.table.copy()

    def correlations(self) -> pd.DataFrame:
        """The table's correlation columns (`CORRELATION_COLUMNS`): over the kept cells and over all."""
        return self.table[CORRELATION_COLUMNS].copy()

    def top_cells(self) -> pd.DataFrame:
        """The table's top-cell columns (`TOP_CELL_COLUMNS`): overlap, recall and the largest exact cell."""
        return self.table[TOP_CELL_COLUMNS].copy()

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.rows, "summary": self.table}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> AgreementResult:
        return cls(rows=saved.tables[""], table=saved.tables["summary"], settings=saved.settings)


def _swap_positions(rows: pd.DataFrame) -> dict[tuple[str, str], int]:
    """Per (probe_id, variant): the first position whose clean and corrupted tokens differ (0 when none)."""
    lacking = [c for c in ("clean_token", "corrupted_token") if c not in rows.columns]
    if lacking:
        raise InputError(f"the exact patching rows lack {lacking}: structural zeros cannot be found; "
                         "pass exclude_structural_zeros=False")
    one_site = rows[rows["site"] == rows["site"].iloc[0]].drop_duplicates(["probe_id", "variant", "pos"])
    return {key: first_difference(part["clean_token"].tolist(), part["corrupted_token"].tolist())
            for key, part in one_site.sort_values("pos", kind="stable").groupby(["probe_id", "variant"], sort=False)}


def patching_agreement(
    exact: PatchingResult,
    approx: PatchingResult,
    *,
    top: int = 5,
    shortlist: int = 20,
    exclude_structural_zeros: bool = True,
    atol: float = 1e-3,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AgreementResult:
    """Agreement of `approx` (attribution patching) with `exact` (activation patching) on the
    restored share: per (pair, site), per site and overall (see `AgreementResult`).

    By default the structural zeros (`STRUCTURAL_ZEROS`) are left out of every measure: both
    methods are zero there whatever they get right, and these shared zeros inflate a correlation
    (they made up about half the cells of the published benchmark). Each row records how many were
    left out (n_excluded) and keeps the all-cells correlation (correlation_all_cells) beside;
    `exclude_structural_zeros=False` keeps them in every measure, as older tables did. `top`: cells
    compared by the overlap and the recall; `shortlist`: the attribution cells the recall searches;
    `atol`: exact restored shares closer than this count as equal (`compare_cells`): a pair whose
    kept cells of a site are all equal gets NaN correlations, overlap and recall there, and the
    table's n_correlated counts the pairs with a correlation.

    Raises `InputError` for `top` or `shortlist` below 1 or a negative `atol`, and unless both results hold the same
    pairs and the same (site, layer, position) cells: agreement over different pairs would compare
    nothing.
    """
    if top < 1:
        raise InputError(f"top must be >= 1, got {top}")
    if shortlist < 1:
        raise InputError(f"shortlist must be >= 1, got {shortlist}")
    if not atol >= 0:
        raise InputError(f"atol must be >= 0, got {atol}")
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
    sites = list(dict.fromkeys(exact.rows["site"]))
    cells = cells.drop(columns="_merge").merge(valid, on=["probe_id", "variant"])
    cells = cells[cells["valid"]].assign(site_order=lambda f: f["site"].map(sites.index))
    # cell order (ties go to the first): the results' site order, then layer, then position
    cells = cells.sort_values(["probe_id", "variant", "site_order", "layer", "pos"], kind="stable")
    # a masked LM attends both ways: no cell is zero by construction there
    bidirectional = exact.settings.get("objective") == "masked"
    swap = _swap_positions(exact.rows) if exclude_structural_zeros and len(cells) and not bidirectional else {}
    swap_pos = np.array([swap.get(key, 0) for key in zip(cells["probe_id"], cells["variant"])], dtype=np.int64)
    cells = cells.assign(swap_pos=swap_pos, kept=cells["pos"].to_numpy() >= swap_pos)

    records = []
    for (probe_id, variant), part in cells.groupby(["probe_id", "variant"], sort=False):
        for site in [*sites, ALL]:
            sub = part if site == ALL else part[part["site"] == site]
            kept = sub[sub["kept"]]
            c = compare_cells(kept["restored_exact"].to_numpy(), kept["restored_approx"].to_numpy(), top=top,
                              shortlist=shortlist, atol=atol)
            cell = kept.iloc[c.largest] if c.largest >= 0 else None
            records.append({
                "probe_id": probe_id, "variant": variant, "site": site, "n_cells": c.n_cells,
                "correlation": c.correlation, "overlap": c.overlap, "n_excluded": len(sub) - len(kept),
                "swap_pos": int(part["swap_pos"].iloc[0]), "spearman": c.spearman, "recall": c.recall,
                "largest_site": cell["site"] if cell is not None else "",
                "largest_layer": int(cell["layer"]) if cell is not None else -1,
                "largest_pos": int(cell["pos"]) if cell is not None else -1,
                "largest_exact": c.largest_exact, "largest_approx": c.largest_approx, "largest_rank": c.largest_rank,
                "correlation_all_cells": pearson(sub["restored_exact"].to_numpy(), sub["restored_approx"].to_numpy()),
            })
    rows = pd.DataFrame(records, columns=ROW_COLUMNS)

    rng = np.random.default_rng(seed)
    summary = []
    variants = sorted(set(rows["variant"]))
    for variant in variants + ([ALL] if len(variants) > 1 else []):
        for site in [*sites, ALL]:
            sub = rows[(rows["site"] == site) & ((rows["variant"] == variant) | (variant == ALL))]
            pooled = cells[(cells["variant"] == variant) | (variant == ALL)]
            pooled = pooled if site == ALL else pooled[pooled["site"] == site]
            kept = pooled[pooled["kept"]]
            record: dict[str, Any] = {"variant": variant, "site": site, "n_pairs": len(sub),
                                      "n_correlated": int(sub["correlation"].notna().sum())}
            for measure in ("correlation", "overlap", *MEAN_MEASURES):
                mean, low, high = _mean_interval(sub[measure].to_numpy(), n_boot=n_boot, level=level, rng=rng)
                record |= {measure: mean, f"{measure}_low": low, f"{measure}_high": high}
            record |= {
                "pooled_correlation": pearson(kept["restored_exact"].to_numpy(), kept["restored_approx"].to_numpy())
                if len(kept) else float("nan"),
                "n_cells": int(sub["n_cells"].sum()), "n_excluded": int(sub["n_excluded"].sum()),
                "largest_rank_median": float(sub["largest_rank"].median()) if len(sub) else float("nan"),
                "pooled_correlation_all_cells": pearson(pooled["restored_exact"].to_numpy(),
                                                        pooled["restored_approx"].to_numpy())
                if len(pooled) else float("nan"),
            }
            summary.append(record)
    table = pd.DataFrame(summary, columns=TABLE_COLUMNS)
    settings = {
        "analysis": "patching_agreement", "top": top, "shortlist": shortlist, "atol": atol, "n_boot": n_boot,
        "level": level, "seed": seed,
        "methods": [str(exact.settings.get("method", "exact")), str(approx.settings.get("method", "attribution"))],
        "n_pairs": len(pairs_a), "n_valid_pairs": int(valid["valid"].sum()),
        "exclude_structural_zeros": exclude_structural_zeros, "structural_zeros": STRUCTURAL_ZEROS,
        "n_cells": int(cells["kept"].sum()), "n_excluded": int((~cells["kept"]).sum()),
        "metric": "restored share of the target logit; Pearson and Spearman over (layer, position) cells; top cells "
                  "by |restored|; largest exact cell by |restored|, its attribution rank by |estimate|",
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
