"""Attribution patching on the tiny random Gemma 3 and Llama: the gradient against finite
differences of exact patching, exactness where the logit is linear in the cell, and the result
tables and agreement measures against `patch_probes`."""

from __future__ import annotations

import math

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

    def freeze(x, hook):
        return frozen["scale"].to(x.dtype).expand_as(x)

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
    assert rows["correlation"].to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert (rows["overlap"] == 1.0).all()
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
    monkeypatch.setattr(selfcheck, "plain_last_logits", lambda model, ids: plain(model, ids) + 1.0)
    with pytest.raises(FastPathError, match="attribution patching"):
        attribution_patch_probes(tiny_model, probes[:3], PatchingOptions(corruption=CorruptionOptions(bank=BANK)))


def test_pearson_and_overlap_edge_cases():
    from idiom_lens.analyses.interventions.attribution_patching import pearson, top_overlap

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.5]) > 0.99
    assert pearson([1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert top_overlap([5.0, -4.0, 0.1, 0.2], [-5.0, 0.0, 3.0, 0.1], 2) == 0.5  # by magnitude: {0, 1} vs {0, 2}
    assert top_overlap([1.0, 2.0], [2.0, 1.0], 5) == 1.0  # k capped at the number of cells
