"""Attribution patching on the tiny random Gemma 3 and Llama: the gradient against finite
differences of exact patching, exactness where the logit is linear in the cell, and the result
tables and agreement measures against `patch_probes`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from tolerances import U, logit_atol, logit_scale  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import (
    CorruptionOptions,
    PatchingOptions,
    make_corruptions,
    patch_pair,
    patch_probes,
)
from idiom_lens.analyses.interventions.attribution_patching import (
    AgreementResult,
    attribution_patch_pair,
    attribution_patch_probes,
    patching_agreement,
)
from idiom_lens.analyses.interventions.patching import PatchingResult, site_activations
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import FastPathError, InputError

# Words the tiny tokenizer knows as single tokens (trained on the fixture corpus).
BANK = ("moon", "eye", "stone", "room", "cake", "ice", "mat", "book", "market", "history", "cat", "walked")
HOOK = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from idiom_lens.models.loading import load_model

    return load_model(str(tiny_llama_dir), mode="raw", progress=False)


@pytest.fixture(params=["gemma3", "llama"])
def model(request, tiny_model, tiny_llama):
    return tiny_model if request.param == "gemma3" else tiny_llama


def _early_swap(model):
    """'kill two birds with one' with its second word swapped: one token differs, early, so every
    later position and layer carries a difference."""
    probe = Probe("k", "kill two birds with one", "stone", "idiom")
    options = CorruptionOptions(bank=BANK, variants=("word_swap",), word_index=1)
    return make_corruptions(model, [probe], options).pairs[0]


def _logit_with(model, ids, target_id, hook_name, hook):
    tokens = torch.tensor([list(ids)])
    with torch.no_grad():
        return float(model.bridge.run_with_hooks(tokens, fwd_hooks=[(hook_name, hook)])[0, -1, target_id])


def test_estimate_is_the_derivative_of_the_exact_patched_logit(model):
    """For the largest cell of each site, the estimate equals the central finite difference of the
    exact patched logit along (clean - corrupted): a wrong gradient (another cell's, a detached
    view's zero, a missing conversion) fails here."""
    pair = _early_swap(model)
    result = attribution_patch_pair(model, clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids,
                                    target_id=pair.target_id)
    change = result.patched - result.corrupted_logit
    clean_acts, _ = site_activations(model, pair.clean_ids, result.sites)
    corr_acts, _ = site_activations(model, pair.corrupted_ids, result.sites)
    eps = 2e-3
    for s, site in enumerate(result.sites):
        layer, pos = divmod(int(change[s].abs().argmax()), change.shape[2])
        delta = clean_acts[(site, layer)][pos] - corr_acts[(site, layer)][pos]

        def nudge(x, hook, scale=0.0):
            x = x.clone()
            x[:, pos] = x[:, pos] + scale * delta.to(x.dtype)  # noqa: B023 (called within this iteration)
            return x

        name = f"blocks.{layer}.{HOOK[site]}"
        up = _logit_with(model, pair.corrupted_ids, pair.target_id, name, lambda x, hook: nudge(x, hook, eps))
        down = _logit_with(model, pair.corrupted_ids, pair.target_id, name, lambda x, hook: nudge(x, hook, -eps))
        derivative = (up - down) / (2 * eps)
        estimate = float(change[s, layer, pos])
        # `up` and `down` run the same kernels on the same shapes: each is off by the rounding of
        # its result (a few u x the logits' scale), not by another summation order; the quotient
        # amplifies that by 1 / eps. The central difference's own error is O(eps^2): rel 1e-3.
        roundoff = 8 * U * logit_scale(model, pair.corrupted_ids) / eps
        assert abs(estimate) > 100 * roundoff, (site, estimate)  # a cell with something to estimate
        assert estimate == pytest.approx(derivative, rel=1e-3, abs=roundoff), (site, layer, pos)


def test_identical_prompts_give_exactly_zero_change(tiny_model):
    pair = _early_swap(tiny_model)
    result = attribution_patch_pair(tiny_model, clean_ids=pair.clean_ids, corrupted_ids=pair.clean_ids,
                                    target_id=pair.target_id)
    assert result.clean_logit == result.corrupted_logit
    assert torch.equal(result.patched, torch.full_like(result.patched, result.corrupted_logit))


def test_exact_where_the_logit_is_linear_in_the_cell(model):
    """With the final norm's scale held at the corrupted run's value, the target logit is linear in
    the last layer's MLP output (only the norm's weight and the unembedding follow it): attribution
    and exact patching must then agree to float precision at every position of that layer."""
    pair = _early_swap(model)
    frozen: dict[str, torch.Tensor] = {}

    def keep(x, hook):
        frozen["scale"] = x.detach().clone()

    _logit_with(model, pair.corrupted_ids, pair.target_id, "ln_final.hook_scale", keep)

    def freeze(x, hook):  # only the last position is read: its scale, wherever the final norm runs
        return frozen["scale"][:, -1:].to(x.dtype).expand_as(x)

    kw = dict(clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids, target_id=pair.target_id, sites=("mlp_out",))
    with model.bridge.hooks(fwd_hooks=[("ln_final.hook_scale", freeze)]):
        approx = attribution_patch_pair(model, **kw)
        exact = patch_pair(model, **kw)
    last = model.n_layers - 1
    exact_change = exact.patched[0, last] - exact.corrupted_logit
    approx_change = approx.patched[0, last] - approx.corrupted_logit
    assert exact_change.abs().max() > 0.05  # the cell matters
    # fp32: a gradient and a patched forward, each through the model, another way: logit noise;
    # `restored` divides the change by the total effect, and the noise with it
    atol = logit_atol(model, logit_scale(model, pair.corrupted_ids))
    torch.testing.assert_close(approx_change, exact_change, atol=atol, rtol=0)
    total = abs(exact.clean_logit - exact.corrupted_logit)
    torch.testing.assert_close(approx.restored[0, last], exact.restored[0, last], atol=2 * atol / total, rtol=0)


@pytest.fixture(scope="module")
def both(tiny_model, probes):
    options = PatchingOptions(corruption=CorruptionOptions(bank=BANK), sites=("resid_pre", "mlp_out", "attn_out"))
    return patch_probes(tiny_model, probes, options), attribution_patch_probes(tiny_model, probes, options)


def test_same_tables_as_exact_patching(both, tiny_model):
    exact, approx = both
    assert approx.settings["method"] == "attribution"
    assert list(approx.rows.columns) == list(exact.rows.columns)
    assert list(approx.pairs.columns) == list(exact.pairs.columns)
    assert len(approx.pairs) > 0
    keys = ["probe_id", "variant", "site", "layer", "pos"]
    pd.testing.assert_frame_equal(approx.rows[keys + ["clean_token", "corrupted_token"]],
                                  exact.rows[keys + ["clean_token", "corrupted_token"]])
    same = ["probe_id", "variant", "kind", "group", "clean_prompt", "corrupted_prompt", "target_id", "valid",
            "n_tokens"]
    pd.testing.assert_frame_equal(approx.pairs[same], exact.pairs[same])
    for column in ("clean_logit", "corrupted_logit"):  # two forwards of the same prompts: fp32 logit noise
        atol = logit_atol(tiny_model, exact.pairs[column].to_numpy())
        assert (approx.pairs[column] - exact.pairs[column]).abs().max() < atol
    pd.testing.assert_frame_equal(approx.skipped, exact.skipped)
    heat = approx.mean_heatmap(site="mlp_out", variant="word_swap")  # the plots' input works unchanged
    assert heat.shape[0] == tiny_model.n_layers


def test_result_save_load_round_trip(both, tmp_path):
    _, approx = both
    approx.save(tmp_path)
    again = PatchingResult.load(tmp_path)
    pd.testing.assert_frame_equal(again.rows, approx.rows)
    pd.testing.assert_frame_equal(again.pairs, approx.pairs)
    assert again.settings == approx.settings


def test_agreement_with_exact_patching(both, tmp_path):
    exact, approx = both
    agreement = patching_agreement(exact, approx, top=5)
    rows, table = agreement.to_dataframe(), agreement.summary()
    n_valid = int(exact.pairs["valid"].sum())
    assert n_valid > 0 and agreement.settings["n_valid_pairs"] == n_valid
    assert len(rows) == n_valid * 4  # three sites and "all"
    assert set(table["site"]) == {"resid_pre", "mlp_out", "attn_out", "all"}
    overall = table[table["site"] == "all"].iloc[0]
    for column in ("correlation", "correlation_low", "correlation_high", "pooled_correlation"):
        assert -1.0 <= overall[column] <= 1.0
    assert overall["correlation_low"] <= overall["correlation"] <= overall["correlation_high"]
    assert ((table["overlap"] >= 0) & (table["overlap"] <= 1)).all()
    agreement.save(tmp_path)
    again = AgreementResult.load(tmp_path)
    pd.testing.assert_frame_equal(again.summary(), table)
    assert again.settings == agreement.settings


def test_agreement_of_a_result_with_itself_is_perfect(both):
    exact, _ = both
    agreement = patching_agreement(exact, exact)
    rows = agreement.to_dataframe()  # float64 correlations of a column with itself: 1 up to rounding
    # NaN only where the kept cells have no spread: a swapped last prompt word leaves resid_pre only
    # the last position, whose patching restores everything in every layer
    defined = rows["correlation"].notna()
    assert defined.mean() > 0.5
    for row in rows[~defined].itertuples():
        kept = exact.rows[(exact.rows["probe_id"] == row.probe_id) & (exact.rows["variant"] == row.variant)
                          & (exact.rows["pos"] >= row.swap_pos)
                          & ((exact.rows["site"] == row.site) | (row.site == "all"))]
        assert len(kept) == row.n_cells > 0 and np.ptp(kept["restored"]) < 1e-3  # the default atol
        assert math.isnan(row.overlap) and math.isnan(row.recall) and math.isnan(row.spearman)
    assert rows.loc[defined, "correlation"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert rows.loc[defined, "spearman"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert rows["correlation_all_cells"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert (rows.loc[defined, "overlap"] == 1.0).all() and (rows.loc[defined, "recall"] == 1.0).all()
    assert (rows["largest_rank"] == 1).all()
    table = agreement.summary()
    assert table["correlation"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert table["pooled_correlation"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert (table["overlap_low"] == 1.0).all()


def test_agreement_refuses_different_pairs_or_cells(both):
    exact, approx = both
    first = tuple(approx.pairs.iloc[0][["probe_id", "variant"]])
    fewer = PatchingResult(
        rows=approx.rows[approx.rows["probe_id"] != first[0]].reset_index(drop=True),
        pairs=approx.pairs[approx.pairs["probe_id"] != first[0]].reset_index(drop=True),
        skipped=approx.skipped, settings=approx.settings)
    with pytest.raises(InputError, match="different pairs"):
        patching_agreement(exact, fewer)
    one_site = PatchingResult(rows=approx.rows[approx.rows["site"] != "attn_out"].reset_index(drop=True),
                              pairs=approx.pairs, skipped=approx.skipped, settings=approx.settings)
    with pytest.raises(InputError, match="different cells"):
        patching_agreement(exact, one_site)
    with pytest.raises(InputError, match="top"):
        patching_agreement(exact, approx, top=0)


def test_input_checks_and_self_check(tiny_model, probes, monkeypatch):
    with pytest.raises(InputError, match="same token length"):
        attribution_patch_pair(tiny_model, clean_ids=(1, 2, 3), corrupted_ids=(1, 2), target_id=3)
    with pytest.raises(InputError, match="sites"):
        attribution_patch_pair(tiny_model, clean_ids=(1, 2), corrupted_ids=(1, 3), target_id=3, sites=("q",))
    # a run whose logits differ from a plain full forward stops before any result exists
    import idiom_lens.models.selfcheck as selfcheck

    plain = selfcheck.plain_last_logits
    monkeypatch.setattr(selfcheck, "plain_last_logits", lambda model, ids, *rest: plain(model, ids, *rest) + 1.0)
    with pytest.raises(FastPathError, match="attribution patching"):
        attribution_patch_probes(tiny_model, probes[:3], PatchingOptions(corruption=CorruptionOptions(bank=BANK)))


def test_pearson_and_overlap_edge_cases():
    from idiom_lens.analyses.interventions.attribution_patching import pearson, top_overlap

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) > 0.99
    assert pearson([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert top_overlap([5.0, -4.0, 0.1, 0.2], [-5.0, 0.0, 3.0, 0.1], 2) == 0.5  # by magnitude: {0, 1} vs {0, 2}
    assert top_overlap([1.0, 2.0], [2.0, 1.0], 5) == 1.0  # k capped at the number of cells


# --------------------------------------------------------------------------------------
# The comparison measures on a hand-built pair
# --------------------------------------------------------------------------------------

# One pair, one site, 2 layers x 4 positions; the word at position 2 is swapped (position 3 is the
# last), so positions 0 and 1 are structural zeros: 0 in both grids. The swapped word's early
# residual (layer 0, position 2) restores everything exactly and is estimated at 0.09.
TOKENS_CLEAN = ["<bos>", "kill", " two", " one"]
TOKENS_CORRUPTED = ["<bos>", "kill", " cat", " one"]
EXACT = [[0.0, 0.0, 1.0, 0.1], [0.0, 0.0, 0.6, 0.3]]  # [layer][pos]
APPROX = [[0.0, 0.0, 0.09, 0.05], [0.0, 0.0, 0.5, 0.4]]


def toy_patching(grid, method: str, *, probe_id: str = "k") -> PatchingResult:
    rows = [{"probe_id": probe_id, "variant": "word_swap", "site": "resid_pre", "layer": layer, "pos": pos,
             "pos_from_end": pos - 4, "patched_logit": 0.0, "restored": value,
             "clean_token": TOKENS_CLEAN[pos], "corrupted_token": TOKENS_CORRUPTED[pos]}
            for layer, values in enumerate(grid) for pos, value in enumerate(values)]
    pairs = pd.DataFrame({"probe_id": [probe_id], "variant": ["word_swap"], "group": ["memorized idioms"],
                          "valid": [True]})
    return PatchingResult(rows=pd.DataFrame(rows), pairs=pairs, skipped=pd.DataFrame(columns=["probe_id"]),
                          settings={"method": method})


def test_structural_zeros_are_excluded_by_default():
    agreement = patching_agreement(toy_patching(EXACT, "exact"), toy_patching(APPROX, "attribution"), top=2,
                                   shortlist=3)
    row = agreement.to_dataframe().set_index("site").loc["resid_pre"]
    assert row["swap_pos"] == 2 and row["n_cells"] == 4 and row["n_excluded"] == 4
    # kept cells (layer, pos) (0,2), (0,3), (1,2), (1,3): exact 1.0, 0.1, 0.6, 0.3; estimate 0.09, 0.05, 0.5, 0.4
    # exact deviations from 0.5: .5, -.4, .1, -.2; estimate deviations from 0.26: -.17, -.21, .24, .14
    assert row["correlation"] == pytest.approx(-0.005 / math.sqrt(0.46 * 0.1502))  # -0.019
    # every cell: sum xy 0.515, means 0.25 and 0.13, sums of squares 1.46 and 0.4206 over n = 8
    assert row["correlation_all_cells"] == pytest.approx(
        (0.515 - 8 * 0.25 * 0.13) / math.sqrt((1.46 - 8 * 0.25**2) * (0.4206 - 8 * 0.13**2)))  # +0.49: the zeros
    table = agreement.summary().set_index("site")
    assert table.loc["resid_pre", "n_cells"] == 4 and table.loc["resid_pre", "n_excluded"] == 4
    assert table.loc["resid_pre", "correlation"] == pytest.approx(row["correlation"])  # one pair: its value
    assert table.loc["resid_pre", "pooled_correlation"] == pytest.approx(row["correlation"])
    assert table.loc["resid_pre", "pooled_correlation_all_cells"] == pytest.approx(row["correlation_all_cells"])
    assert agreement.settings["n_excluded"] == 4 and agreement.settings["n_cells"] == 4  # each cell once
    kept_all = patching_agreement(toy_patching(EXACT, "exact"), toy_patching(APPROX, "attribution"), top=2,
                                  shortlist=3, exclude_structural_zeros=False)
    old = kept_all.to_dataframe().set_index("site").loc["resid_pre"]
    assert old["n_cells"] == 8 and old["n_excluded"] == 0 and old["swap_pos"] == 0
    assert old["correlation"] == pytest.approx(row["correlation_all_cells"])


def test_rank_recall_and_largest_cell_by_hand():
    agreement = patching_agreement(toy_patching(EXACT, "exact"), toy_patching(APPROX, "attribution"), top=2,
                                   shortlist=3)
    row = agreement.to_dataframe().set_index("site").loc["resid_pre"]
    # ranks: exact 4, 1, 3, 2; estimate 2, 1, 4, 3; d = 2, 0, -1, -1: 1 - 6 * 6 / (4 * 15) = 0.4
    assert row["spearman"] == pytest.approx(0.4)
    # exact top 2: (0,2), (1,2); estimate top 2: (1,2), (1,3); estimate top 3 adds (0,2)
    assert row["overlap"] == pytest.approx(0.5) and row["recall"] == pytest.approx(1.0)
    assert (row["largest_site"], row["largest_layer"], row["largest_pos"]) == ("resid_pre", 0, 2)
    assert row["largest_exact"] == 1.0 and row["largest_approx"] == pytest.approx(0.09)
    assert row["largest_rank"] == 3  # 0.5 and 0.4 are estimated larger
    table = agreement.summary().set_index("site").loc["resid_pre"]
    assert table["largest_rank"] == 3 and table["largest_rank_low"] == 3 and table["largest_rank_median"] == 3
    assert table["recall"] == 1.0 and table["spearman"] == pytest.approx(0.4)


def test_measures_average_over_pairs():
    """Two pairs: the table's means are the means of the two rows (the second pair is perfect)."""
    def both(grid_b):
        exact = toy_patching(EXACT, "exact")
        approx = toy_patching(APPROX, "attribution")
        other_e, other_a = toy_patching(EXACT, "exact", probe_id="m"), toy_patching(grid_b, "attribution",
                                                                                      probe_id="m")
        join = lambda x, y: PatchingResult(rows=pd.concat([x.rows, y.rows], ignore_index=True),  # noqa: E731
                                           pairs=pd.concat([x.pairs, y.pairs], ignore_index=True),
                                           skipped=x.skipped, settings=x.settings)
        return patching_agreement(join(exact, other_e), join(approx, other_a), top=2, shortlist=3)

    agreement = both(EXACT)
    table = agreement.summary().set_index("site").loc["resid_pre"]
    assert table["n_pairs"] == 2 and table["n_excluded"] == 8
    assert table["largest_rank"] == pytest.approx((3 + 1) / 2) and table["largest_rank_median"] == 2.0
    assert table["spearman"] == pytest.approx((0.4 + 1.0) / 2)
    assert table["largest_approx"] == pytest.approx((0.09 + 1.0) / 2)
    assert table["largest_rank_low"] <= table["largest_rank"] <= table["largest_rank_high"]


def test_compare_cells_edge_cases():
    from idiom_lens.analyses.interventions.attribution_patching import (
        compare_cells,
        first_difference,
        spearman,
        top_recall,
    )

    # ties share their average rank: x ranks 1.5, 1.5, 3 against 1, 2, 3 -> 1.5 / sqrt(1.5 * 2)
    assert spearman([1.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert spearman([1.0, 2.0, 3.0], [10.0, 100.0, 1000.0]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(spearman([1.0, 1.0], [1.0, 2.0]))
    assert top_recall([5.0, -4.0, 0.1, 0.2], [-5.0, 0.0, 3.0, 0.1], 2, 2) == 0.5  # = top_overlap
    assert top_recall([5.0, -4.0, 0.1, 0.2], [-5.0, 0.0, 3.0, 0.1], 2, 4) == 1.0
    assert first_difference(["a", "b", "c"], ["a", "x", "c"]) == 1
    assert first_difference(["a", "b"], ["a", "b"]) == 0  # nothing differs: nothing to exclude
    empty = compare_cells([], [])
    assert empty.n_cells == 0 and empty.largest == -1 and math.isnan(empty.correlation)
    negative = compare_cells([0.2, -0.9, 0.5], [0.3, -0.3, 0.3])
    assert negative.largest == 1 and negative.largest_exact == -0.9 and negative.largest_rank == 1  # ties favour it
    # a near-tie within atol does not outrank the chosen cell: an exact copy of the values ranks it first
    near = compare_cells(np.array([0.9, 0.9004, 0.1]), np.array([0.9, 0.9004, 0.1]))
    assert near.largest == 0 and near.largest_rank == 1
    with pytest.raises(InputError, match="same cells"):
        compare_cells([1.0], [1.0, 2.0])


def test_exact_values_equal_up_to_rounding_are_ties():
    """A word swapped at the last prompt position: resid_pre keeps only that position, and every
    layer restores everything (1 up to fp32 noise). No cell matters more than another, so the
    correlations, overlap and recall are NaN; the largest cell is the first, the earliest layer."""
    from idiom_lens.analyses.interventions.attribution_patching import compare_cells, top_overlap

    exact = [1.000004, 1.000001, 0.999998, 1.000002]  # layers 0..3 at the last position
    approx = [0.08, 0.9, 1.1, 0.95]
    flat = compare_cells(exact, approx, top=2, shortlist=2)
    assert not flat.spread and all(math.isnan(v) for v in (flat.correlation, flat.spearman, flat.overlap, flat.recall))
    assert flat.largest == 0 and flat.largest_exact == 1.000004 and flat.largest_approx == 0.08
    assert flat.largest_rank == 4  # the three later layers are estimated larger
    loose = compare_cells(exact, approx, top=2, shortlist=2, atol=0.0)  # noise taken at its word
    assert loose.spread and loose.largest == 0 and not math.isnan(loose.correlation)
    # near ties rank by cell order: the exact top 2 are cells 0 and 1, not the noisier 3
    assert top_overlap([1.000004, 1.0, 0.2, 1.000009], [1.0, 1.0, 0.0, 0.0], 2, atol=1e-3) == 1.0
    assert top_overlap([1.000004, 1.0, 0.2, 1.000009], [1.0, 1.0, 0.0, 0.0], 2) == 0.5  # without: cells 3 and 0
    spread = compare_cells([1.0, 0.5, 0.9996], [0.1, 0.2, 0.3], top=1, shortlist=1)
    assert spread.spread and spread.largest == 0 and spread.largest_rank == 3
