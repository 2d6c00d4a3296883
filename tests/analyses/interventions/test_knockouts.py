"""Knockout invariants on the tiny random models (fast), and one integration test on Gemma 3 270M.

Every row of the grid is checked against a hand-written full forward in
test_against_full_forward.py; here: the grid's shape and options, the controls' definitions, the
effective contribution by hand, the value-vector statistic by hand, summaries and intervals."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tolerances import forward_rtol, logit_atol, probes_prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import (
    KnockoutGrid,
    KnockoutOptions,
    KnockoutResult,
    knockout_grid,
    rank_neurons,
    value_vector_ranks,
)
from idiom_lens.analyses.interventions.knockouts import (
    CONTROLS,
    MATCH_TOLERANCE,
    KnockoutCell,
    knockout_cells,
    knockout_hooks,
    matched_neurons,
    mean_activations,
    random_neurons,
    score_matched_neurons,
)
from idiom_lens.analyses.interventions.knockouts.controls import _ProbeNeurons
from idiom_lens.analyses.interventions.knockouts.scores import _clean_state
from idiom_lens.analyses.stats import wilson_interval
from idiom_lens.datasets import load_probes
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.selfcheck import relative_error
from idiom_lens.models.vocab import MASK_RULE, valid_mask

from .test_against_full_forward import (
    assert_row_matches,
    clean_post_norm,
    contributions_by_hand,
    full_forward,
    masked,
    prediction,
    reference_knockout_logits,
    reference_state,
    zero_neurons,
)

GRID = KnockoutGrid(ks=(0, 1, 5, 64), windows=(1, 2), modes=("zero_top", "keep_top"), keep_top_ks=None,
                    keep_top_windows=None)


def _grid(model, probes, *, batch_size=256, **kw):
    """`knockout_grid` on the small grid above, its fields and the other `KnockoutOptions` fields from `kw`."""
    grid = dataclasses.replace(GRID, **{k: kw.pop(k) for k in list(kw) if k in GRID.__dataclass_fields__})
    return knockout_grid(model, probes, KnockoutOptions(grid=grid, **kw), batch_size=batch_size)


def with_targets(result):
    return result.to_dataframe().merge(result.probes[["probe_id", "target_id"]], on="probe_id")


def test_defaults_are_the_authors_positions_the_frozen_norm_and_the_matched_controls(tiny_model, probes):
    """Defaults: every position (the authors'), our effective ranking, the post-MLP norm frozen (the
    primary result; it was live before), zero ablation, the random, norm-matched and whole-MLP controls."""
    result = knockout_grid(tiny_model, probes[:2],
                           KnockoutOptions(grid=KnockoutGrid(ks=(1,), windows=(1,), modes=("zero_top",))))
    s = result.settings
    assert s["positions"] == "all" and s["rank_by"] == "effective" and s["norm"] == "frozen"
    assert s["ablation"] == "zero" and s["mean_reference"] is None
    assert s["controls"] == ["random", "matched", "whole_mlp"]
    assert s["n_masked_tokens"] == 3 and s["masked_tokens"] == MASK_RULE  # <pad> <bos> <eos>
    assert set(result.rows["control"]) == {"targeted", "random", "matched", "whole_mlp"}
    assert {"positions", "rank_by", "norm", "ablation", "zeroed_share", "score_ratio", "n_zeroed", "removed_norm",
            "out_cosine", "out_norm_ratio", "matched_norm_ratio"} <= set(result.rows.columns)
    assert "authors'" in s["rank_by_note"] or "ours" in s["rank_by_note"]
    magnitude = knockout_grid(tiny_model, probes[:1], KnockoutOptions(
        grid=KnockoutGrid(ks=(1,), windows=(1,), modes=("zero_top",)), rank_by="magnitude", controls=()))
    assert "the authors'" in magnitude.settings["rank_by_note"] and "ours" in s["rank_by_note"]
    assert set(magnitude.rows["rank_by"]) == {"magnitude"}


def test_empty_knockout_and_keep_all_change_nothing(tiny_model, probes):
    result = _grid(tiny_model, probes, controls=())
    rows = result.rows
    noop = rows[((rows["mode"] == "zero_top") & (rows["k"] == 0)) | ((rows["mode"] == "keep_top") & (rows["k"] == 64))]
    assert len(noop) > 0
    assert not noop["changed"].any()
    assert noop["prob_drop"].abs().max() < probes_prob_atol(tiny_model, probes)  # clean and row batches: fp32 noise
    # the clean prediction is the model's own over real tokens (full forward, no cache, masked by hand)
    toks = tokenize_probes(tiny_model, probes)
    for t, pred in zip(toks, result.probes["clean_pred_id"]):
        assert prediction(tiny_model, full_forward(tiny_model, t.prompt_ids)) == pred
        assert valid_mask(tiny_model)[pred]
    full = rows[(rows["mode"] == "zero_top") & (rows["k"] == 64)]
    assert (full["prob_drop"].abs() > 0).any()


def test_keep_top_k_larger_than_layer_is_clean(tiny_model, probes):
    result = _grid(tiny_model, probes[:2], ks=(1000,), modes=("keep_top",), controls=())
    assert result.rows["prob_drop"].abs().max() < probes_prob_atol(tiny_model, probes[:2])  # fp32 noise only
    assert not result.rows["changed"].any()


@pytest.mark.parametrize("positions", ["last", "all"])
def test_noop_configurations_give_identical_logits(tiny_model, probes, positions):
    """Zero nothing / keep everything: no hook at all, rows bit-identical to the unhooked batch and
    equal to a plain full forward; the one real knockout in the batch equals its full forward."""
    configs = [KnockoutCell("zero_top", c, 0, s, s + 1) for c in ("targeted", "random", "matched") for s in (0, 1)]
    configs += [KnockoutCell("keep_top", c, 64, 0, 2) for c in ("targeted", "random")]
    configs += [KnockoutCell("keep_top", "targeted", 5000, 1, 1)]
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).expand(3, 64)
    neurons = _ProbeNeurons(order, torch.rand(3, 64, generator=torch.Generator().manual_seed(1)), "x", 0)
    for t in tokenize_probes(tiny_model, probes[:3]):
        runner = _clean_state(tiny_model, t, positions=positions).runner
        kw = dict(positions=positions, last=runner.last, n_pos=runner.n_pos)
        assert knockout_hooks(configs, neurons, **kw) == []  # nothing to touch
        mixed = configs + [KnockoutCell("zero_top", "targeted", 5, 0, 0)]
        hooks = knockout_hooks(mixed, neurons, **kw)
        hooked = runner.run(len(mixed), hooks)
        assert torch.equal(hooked[:-1], runner.run(len(mixed), [])[:-1])  # untouched rows: identical
        plain = full_forward(tiny_model, t.prompt_ids)
        rtol = forward_rtol(tiny_model)  # fp32: rows of a batch vs one plain forward
        assert max(relative_error(row, plain) for row in hooked[:-1]) < rtol
        last = len(t.prompt_ids) - 1
        by_hand = full_forward(tiny_model, t.prompt_ids,
                               [("blocks.0.mlp.hook_post", zero_neurons(order[0, :5], positions, last))])
        assert relative_error(hooked[-1], by_hand) < rtol
        assert relative_error(by_hand, plain) > 10 * rtol  # the real knockout changes its row


def test_positions_all_and_last_differ_and_concatenate(tiny_model, probes):
    kw = dict(ks=(0, 64), modes=("zero_top",), controls=())
    every = _grid(tiny_model, probes[:3], positions="all", **kw)
    last = _grid(tiny_model, probes[:3], positions="last", **kw)
    rows = every.rows
    assert rows.loc[rows["k"] == 0, "prob_drop"].abs().max() < probes_prob_atol(tiny_model, probes[:3])  # fp32 noise
    # zeroing the MLP at every position differs from the last position only (earlier positions feed attention)
    assert not np.allclose(rows.loc[rows["k"] == 64, "prob_of_clean_pred"],
                           last.rows.loc[last.rows["k"] == 64, "prob_of_clean_pred"])
    both = KnockoutResult.stack_runs([every, last])
    assert len(both.rows) == len(every.rows) + len(last.rows) and len(both.probes) == 3
    assert set(both.summary()["positions"]) == {"all", "last"}
    assert [r["positions"] for r in both.settings["runs"]] == ["all", "last"]


def test_controls_are_seeded(tiny_model, probes):
    """Same seed, same rows; another seed, other random and matched neurons; the targeted rows and
    the whole-MLP ceiling do not depend on the seed; every row is its hand-written full forward."""
    kw = dict(ks=(5,), windows=(1,), modes=("zero_top",), positions="last")
    a = _grid(tiny_model, probes[:4], seed=1, **kw)
    b = _grid(tiny_model, probes[:4], seed=1, **kw).rows
    c = _grid(tiny_model, probes[:4], seed=2, **kw).rows
    rows = a.rows
    for control in ("random", "matched"):
        sel = rows["control"] == control
        assert np.array_equal(rows.loc[sel, "prob_of_clean_pred"], b.loc[sel, "prob_of_clean_pred"])
        assert not np.array_equal(rows.loc[sel, "prob_of_clean_pred"], c.loc[sel, "prob_of_clean_pred"])
    fixed = rows["control"].isin(["targeted", "whole_mlp"])
    assert np.array_equal(rows.loc[fixed, "prob_of_clean_pred"], c.loc[fixed, "prob_of_clean_pred"])
    frame = with_targets(a)
    for probe, t in zip(probes[:4], tokenize_probes(tiny_model, probes[:4])):
        clean_pred = prediction(tiny_model, full_forward(tiny_model, t.prompt_ids))
        for row in frame[(frame["probe_id"] == probe.id) & (frame["control"] != "targeted")].itertuples():
            expected = reference_knockout_logits(tiny_model, t.prompt_ids, row, positions="last", seed=1)
            assert_row_matches(row, expected, clean_pred, tiny_model)


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_batched_equals_unbatched_equals_full_forward(tiny_model, probes, batch_size, positions):
    """Configurations as rows of batches of any size (grouped by start layer for whole prompts):
    every row is its own full forward."""
    result = _grid(tiny_model, probes[:2], ks=(1, 5), windows=(1, 3), batch_size=batch_size, positions=positions)
    frame = with_targets(result)
    for probe, t in zip(probes[:2], tokenize_probes(tiny_model, probes[:2])):
        clean_pred = prediction(tiny_model, full_forward(tiny_model, t.prompt_ids))
        ref = reference_state(tiny_model, t.prompt_ids)
        for row in frame[frame["probe_id"] == probe.id].itertuples():
            expected = reference_knockout_logits(tiny_model, t.prompt_ids, row, positions=positions, ref=ref)
            assert_row_matches(row, expected, clean_pred, tiny_model)


def test_score_matched_neurons_by_hand():
    """The score-matched set lies outside the top-k, depends only on (seed, probe, layer, k), is the
    shortest draw that reaches the top-k's summed score (or one neuron less, when closer), so it
    lands within one neuron's score of it; when everything else sums to less, it is everything else."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(200, generator=gen) ** 4  # heavy-tailed, like activations
    top = scores.argsort(descending=True)[:10]
    chosen = score_matched_neurons(scores, top, probe_id="p", layer=3, k=10, seed=0)
    assert not set(chosen.tolist()) & set(top.tolist())
    assert torch.equal(chosen, score_matched_neurons(scores, top, probe_id="p", layer=3, k=10, seed=0))
    assert not torch.equal(chosen, score_matched_neurons(scores, top, probe_id="p", layer=3, k=10, seed=1))
    assert not torch.equal(chosen, score_matched_neurons(scores, top, probe_id="q", layer=3, k=10, seed=0))
    goal, got = float(scores[top].sum()), float(scores[chosen].sum())
    outside = torch.ones(200, dtype=torch.bool)
    outside[top] = False
    assert float(scores[chosen[:-1]].sum()) < goal  # no shorter draw reached it
    assert abs(got - goal) <= float(scores[outside].max())
    assert len(chosen) > 10  # the top-10 are the largest: it takes more neurons to match them
    # unreachable: the top carries more than everything else
    big = torch.cat([torch.full((5,), 100.0), torch.ones(20)])
    everything_else = score_matched_neurons(big, torch.arange(5), probe_id="p", layer=0, k=5, seed=0)
    assert sorted(everything_else.tolist()) == list(range(5, 25))


def cancelling_layer(n_small: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """A toy layer's contributions [d_mlp, d_model] (what knocking each neuron out removes) and its
    top set: neurons 0 and 1 both remove e0 (together 2 e0: norm 2, summed score 2); neurons 2 and
    3 remove (1, 1.5) and (1, -1.5) (norm 1.803 each; together (2, 0): norm 2); neurons 4.. remove
    0.25 e_i, each along its own axis (any m of them: norm 0.25 sqrt(m))."""
    d_model = 2 + n_small
    contributions = torch.zeros(4 + n_small, d_model)
    contributions[0, 0] = contributions[1, 0] = 1.0
    contributions[2, :2] = torch.tensor([1.0, 1.5])
    contributions[3, :2] = torch.tensor([1.0, -1.5])
    for i in range(n_small):
        contributions[4 + i, 2 + i] = 0.25
    return contributions, torch.tensor([0, 1])


def test_matched_neurons_match_the_removed_norm_where_score_matching_cannot():
    """On the toy layer, the only pair outside the top whose removed vector is within 1% of the top's
    norm (2) is {2, 3}: their contributions cancel across e1 and add to exactly 2 e0. The
    score-matched set never holds both (the prefix that first reaches the summed score 2 ends at the
    first of them, or stops before it), and holds at most 4 small neurons beside one of them (5 x
    0.25 + 1.803 = 3.05 lies farther from 2 than 1.25), so its removed norm is at most
    sqrt(1.803^2 + 4 x 0.25^2) = 1.871 (orthogonal parts), or 0.25 sqrt(9) = 0.75 with small neurons
    only: at least 6% short, for every seed. Both are deterministic per (seed, probe, layer)."""
    contributions, top = cancelling_layer()
    scores = contributions.norm(dim=-1)  # the effective score is the contribution's norm
    target = float(contributions[top].sum(0).norm())
    assert target == 2.0
    for seed in range(5):
        for probe_id in ("p", "q"):
            matched = matched_neurons(contributions, top, probe_id=probe_id, layer=0, k=2, seed=seed)
            assert sorted(matched.tolist()) == [2, 3]
            matched_norm = float(contributions[matched].sum(0).norm())
            assert abs(matched_norm / target - 1) <= MATCH_TOLERANCE
            by_score = score_matched_neurons(scores, top, probe_id=probe_id, layer=0, k=2, seed=seed)
            score_norm = float(contributions[by_score].sum(0).norm())
            assert not {2, 3} <= set(by_score.tolist())
            assert score_norm <= math.sqrt(float(scores[2]) ** 2 + 4 * 0.25**2) + 1e-6  # 1.871
            assert abs(score_norm - target) > abs(matched_norm - target)
            assert torch.equal(matched, matched_neurons(contributions, top, probe_id=probe_id, layer=0, k=2,
                                                        seed=seed))
    # the same size as the top and outside it; what is left when fewer than k neurons are
    assert matched_neurons(contributions, torch.arange(33), probe_id="p", layer=0, k=33, seed=0).tolist() == [33]
    assert len(matched_neurons(contributions, torch.arange(0), probe_id="p", layer=0, k=0, seed=0)) == 0


def test_matched_neurons_reach_a_reachable_norm_and_say_when_they_cannot():
    """Random toy contributions in 16 dimensions, a top of 10 aligned vectors removing `scale` x
    what the first 10 outside neurons remove together: from 0.3 x (a random set is too long) to
    3 x (it takes exchanges towards aligned neurons), a set of 10 from outside the top lands within
    the tolerance. At 6 x no set of 10 gets there (the largest removed norm this search finds is
    about 3.6 x; the 10 largest contributions' norms sum to 6.8 x): the set falls short, and is
    still closer than any of the random candidates it started from."""
    gen = torch.Generator().manual_seed(0)
    outside = torch.randn(300, 16, generator=gen) * (torch.rand(300, 1, generator=gen) + 0.5)
    typical = float(outside[:10].sum(0).norm())

    def layer_for(scale: float) -> torch.Tensor:
        top_vectors = torch.zeros(10, 16)
        top_vectors[:, 0] = scale * typical / 10  # aligned: their removed norm is scale x typical
        return torch.cat([top_vectors, outside])

    for scale in (0.3, 1.0, 2.0, 3.0):
        layer = layer_for(scale)
        chosen = matched_neurons(layer, torch.arange(10), probe_id="p", layer=0, k=10, seed=0)
        assert len(chosen) == 10 and int(chosen.min()) >= 10 and len(set(chosen.tolist())) == 10
        assert abs(float(layer[chosen].sum(0).norm()) / (scale * typical) - 1) <= MATCH_TOLERANCE, scale
    layer = layer_for(6.0)
    short = float(layer[matched_neurons(layer, torch.arange(10), probe_id="p", layer=0, k=10, seed=0)].sum(0).norm())
    assert short / (6.0 * typical) < 1 - MATCH_TOLERANCE
    random_sets = [outside[torch.randperm(300, generator=gen)[:10]].sum(0).norm() for _ in range(256)]
    assert short > float(max(random_sets))


def test_matched_rows_report_how_close_the_match_is(tiny_model, probes):
    """score_ratio (summed score / the top-k's) and matched_norm_ratio (removed norm / the top-k's),
    over the window; the targeted rows are 1 by definition, the whole-MLP ceiling has no ratio."""
    result = knockout_grid(tiny_model, probes[:4],
                           KnockoutOptions(grid=KnockoutGrid(ks=(1, 5, 32), windows=(1,), modes=("zero_top",)),
                                           controls=CONTROLS))
    rows = result.rows
    targ = rows[rows["control"] == "targeted"]
    assert np.allclose(targ["score_ratio"], 1.0) and np.allclose(targ["matched_norm_ratio"], 1.0)  # float64 x / x
    matched = rows[rows["control"] == "matched_score"]
    # reachable (the top carries less than the rest): the closest prefix lands within one neuron's score
    small = matched[matched["k"] == 1]
    assert (small["score_ratio"].between(0.5, 1.5)).all()
    # the score-matched set zeroes as much of the window's score as the targeted set, where reachable
    merged = matched.merge(targ, on=["probe_id", "k", "start"], suffixes=("_m", "_t"))
    reachable = merged[merged["score_ratio_m"].between(0.9, 1.1)]
    assert len(reachable) > 0
    # float64 ratios of the same sums: equal up to float64 rounding (1e-16), 1e-9 leaves room
    assert np.allclose(reachable["zeroed_share_m"], reachable["zeroed_share_t"] * reachable["score_ratio_m"], atol=1e-9)
    # the random control carries less than the top-k (that is why it cannot show "targeted")
    rand = rows[(rows["control"] == "random") & (rows["k"] == 5)]
    assert rand["score_ratio"].mean() < 1.0
    assert (rows.loc[rows["control"] == "whole_mlp", "zeroed_share"] == 1.0).all()
    assert rows.loc[rows["control"] == "whole_mlp", "matched_norm_ratio"].isna().all()  # no counterpart
    # the norm-matched set (k neurons from outside the top-k) removes more than k random neurons, but on
    # this 64-neuron model rarely all of what the top-k remove: the rows say how much (k = 32 of 64:
    # exactly k neurons lie outside the top, so the matched set is all of them)
    below = rows[(rows["k"] < 32) & rows["control"].isin(["matched", "random"])]
    mean_ratio = below.groupby("control")["matched_norm_ratio"].mean()
    assert mean_ratio["random"] < mean_ratio["matched"] <= 1 + MATCH_TOLERANCE
    norm_matched = rows[rows["control"] == "matched"]
    assert (norm_matched["n_zeroed"] == norm_matched["k"]).all()  # same size as the top-k


def test_effective_contribution_by_hand(tiny_gemma_post, probes):
    """On Gemma (post-MLP RMSNorm with gain 1 + w): neuron i's contribution to the residual is
    a_i x W_out[i] x (1 + w) / s_clean, s_clean = sqrt(mean(m^2) + eps) of the clean MLP output m;
    the contributions sum to the post-norm's output, and the effective score is their norm."""
    model = tiny_gemma_post
    ranking = rank_neurons(model, probes[:3], rank_by="effective")
    for p, t in enumerate(tokenize_probes(model, probes[:3])):
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(torch.tensor([t.prompt_ids]))
        post = clean_post_norm(model, t.prompt_ids)
        for layer, block in enumerate(model.bridge.blocks):
            a = cache[f"blocks.{layer}.mlp.hook_post"][0, -1].float()
            w_out = block.mlp.out.original_component.weight.detach().float().T  # [d_mlp, d_model]
            gain, s = post[layer]
            contributions = a[:, None] * w_out * gain / s[-1]  # [d_mlp, d_model]
            out = cache[f"blocks.{layer}.ln2_post.hook_out"][0, -1].float()
            # one block's sums (the MLP's output GEMM and its norm) done another way, and the ranking's
            # prefix-cached forward through layer + 1 blocks: fp32 noise relative to the values' scale
            torch.testing.assert_close(contributions.sum(0), out, atol=logit_atol(model, out, n_layers=1), rtol=0)
            norms = contributions.norm(dim=-1)
            torch.testing.assert_close(ranking.scores[p, layer], norms,
                                       atol=logit_atol(model, norms, n_layers=layer + 1), rtol=0)
    magnitude = rank_neurons(model, probes[:3], rank_by="magnitude")
    assert not torch.equal(magnitude.top(5), ranking.top(5))  # the post-norm's gain reorders neurons


def test_frozen_norm_knockout_by_hand(tiny_gemma_post, probes):
    """Frozen norm: the MLP block's output is (m - removed) x (1 + w) / s_clean, i.e. the clean
    output minus exactly the zeroed neurons' contributions (window of one layer)."""
    model = tiny_gemma_post
    t = tokenize_probes(model, probes[:1])[0]
    grid = KnockoutGrid(ks=(5,), windows=(1,), modes=("zero_top",))
    result = knockout_grid(model, probes[:1], KnockoutOptions(grid=grid, controls=(), norm="frozen", positions="all"))
    ranking = rank_neurons(model, probes[:1])
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([t.prompt_ids]))
    post = clean_post_norm(model, t.prompt_ids)
    clean_pred = prediction(model, full_forward(model, t.prompt_ids))
    for row in with_targets(result).itertuples():
        layer = row.start
        top = ranking.top(5)[0, layer]
        w_out = model.bridge.blocks[layer].mlp.out.original_component.weight.detach().float().T
        gain, s = post[layer]
        acts = cache[f"blocks.{layer}.mlp.hook_post"][0].float()  # [pos, d_mlp]
        removed = (acts[:, top] @ w_out[top]) * gain / s[:, None]  # every position
        clean_out = cache[f"blocks.{layer}.ln2_post.hook_out"][0].float()

        def put(y, hook, value=clean_out - removed):
            return value[None].to(y.dtype)

        expected = full_forward(model, t.prompt_ids, [(f"blocks.{layer}.ln2_post.hook_out", put)])
        assert_row_matches(row, expected, clean_pred, model)


@pytest.mark.parametrize("norm", ["frozen", "live"])
def test_output_diagnostics_frozen_and_live_by_hand(tiny_gemma_post, probes, norm):
    """Gemma's post-MLP RMSNorm written out, y = m x (1 + w) / s, s = sqrt(mean(m^2) + eps), at the
    last position of a window of one layer (its input there is clean). Knocking out the set S takes
    r = sum_S a_i W_out[i] from m. Frozen: y' = (m - r) x (1 + w) / s_clean, so y - y' is exactly
    the neurons' contributions r x (1 + w) / s_clean; live: y' = (m - r) x (1 + w) / s(m - r), the
    same direction rescaled by s_clean / s(m - r). n_zeroed, removed_norm = ||y - y'||, out_cosine,
    out_norm_ratio and matched_norm_ratio (||what S removes|| / ||what the top-k remove||, through
    s_clean) by hand for the targeted, random and matched sets."""
    model = tiny_gemma_post
    grid = KnockoutGrid(ks=(5,), windows=(1,), modes=("zero_top",))
    result = knockout_grid(model, probes[:2], KnockoutOptions(grid=grid, controls=("random", "matched"), norm=norm,
                                                              seed=2))
    rows = result.rows
    assert (rows["n_zeroed"] == 5).all() and (rows["norm"] == norm).all()
    checked = 0
    for probe, t in zip(probes[:2], tokenize_probes(model, probes[:2])):
        with torch.no_grad():
            _, cache = model.bridge.run_with_cache(torch.tensor([t.prompt_ids]))
        ref = reference_state(model, t.prompt_ids)
        for layer, block in enumerate(model.bridge.blocks):
            m = cache[f"blocks.{layer}.ln2_post.hook_in"][0, -1].float()
            clean = cache[f"blocks.{layer}.ln2_post.hook_out"][0, -1].float()
            gain, s = ref["post"][layer]
            eps = block.ln2_post.original_component.eps
            w_out = block.mlp.out.original_component.weight.detach().float().T  # [d_mlp, d_model]
            a = ref["acts"][layer]
            contributions = contributions_by_hand(model, ref["acts"], ref["post"], layer)
            top = ref["scores"]["effective"][layer].argsort(descending=True, stable=True)[:5]
            sets = {"targeted": top,
                    "random": random_neurons(probe_id=probe.id, layer=layer, k=5, d_mlp=64, seed=2),
                    "matched": matched_neurons(contributions, top, probe_id=probe.id, layer=layer, k=5, seed=2)}
            for control, chosen in sets.items():
                row = rows[(rows["probe_id"] == probe.id) & (rows["start"] == layer)
                           & (rows["control"] == control)].iloc[0]
                r = a[chosen] @ w_out[chosen]
                frozen_out = (m - r) * gain / s[-1]
                rescale = s[-1] / ((m - r).pow(2).mean() + eps).sqrt()
                knocked = frozen_out if norm == "frozen" else frozen_out * rescale
                atol = logit_atol(model, clean, n_layers=layer + 1)  # another forward through layer + 1 blocks
                assert row.removed_norm == pytest.approx(float((clean - knocked).norm()), abs=atol)
                assert row.out_norm_ratio == pytest.approx(float(knocked.norm() / clean.norm()),
                                                           abs=atol / float(clean.norm()))
                cosine = float(knocked @ clean / (knocked.norm() * clean.norm()))
                assert row.out_cosine == pytest.approx(cosine, abs=atol / float(clean.norm()))
                removed = contributions[chosen].sum(0)  # (a_S W_out[S]) x (1 + w) / s_clean
                assert row.matched_norm_ratio == pytest.approx(
                    float(removed.norm() / contributions[top].sum(0).norm()), abs=atol / float(removed.norm()))
                if norm == "frozen":  # exactly the neurons' contributions
                    assert row.removed_norm == pytest.approx(float(removed.norm()), abs=atol)
                checked += 1
    assert checked == 2 * 3 * 3
    if norm == "live":  # the norm scales the remainder back up: nothing of the kind under frozen
        targeted = rows[rows["control"] == "targeted"]
        assert (targeted["out_norm_ratio"] > 0.8).mean() > 0.5


def test_live_and_frozen_differ_in_scale_only(tiny_gemma_post, probes):
    """Windows of one layer: the knocked output's direction is the same (an RMSNorm multiplies each
    position by one number), its norm is not; the clean output is the same."""
    kw = dict(grid=KnockoutGrid(ks=(5,), windows=(1,), modes=("zero_top",)), controls=("random",))
    frozen = knockout_grid(tiny_gemma_post, probes[:3], KnockoutOptions(norm="frozen", **kw)).rows
    live = knockout_grid(tiny_gemma_post, probes[:3], KnockoutOptions(norm="live", **kw)).rows
    scale = 1e-4  # fp32 cosines of two forwards of a 3-layer model, values of order 1
    assert np.allclose(frozen["out_cosine"], live["out_cosine"], atol=scale)
    assert np.abs(frozen["out_norm_ratio"] - live["out_norm_ratio"]).max() > 0.05
    assert (frozen["out_norm_ratio"] < live["out_norm_ratio"]).mean() > 0.5  # frozen removes; live scales back


def test_mean_activations_by_hand(tiny_model, probes):
    """The mean of `mlp.hook_post` over every position but BOS of each prompt, from one plain
    forward per prompt; the default reference is the bundled ordinary text, computed once."""
    means = mean_activations(tiny_model, probes[:5], batch_size=2)
    toks = tokenize_probes(tiny_model, probes[:5])
    total, count = torch.zeros(tiny_model.n_layers, 64, dtype=torch.float64), 0
    for t in toks:
        assert t.prompt_ids[0] == tiny_model.tokenizer.bos_token_id
        with torch.no_grad():
            _, cache = tiny_model.bridge.run_with_cache(torch.tensor([t.prompt_ids]))
        for layer in range(tiny_model.n_layers):
            total[layer] += cache[f"blocks.{layer}.mlp.hook_post"][0, 1:].double().sum(0)
        count += len(t.prompt_ids) - 1
    assert means.n_positions == count and means.n_prompts == 5 and means.reference == "custom"
    by_hand = (total / count).float()
    torch.testing.assert_close(means.means, by_hand, atol=logit_atol(tiny_model, by_hand), rtol=0)
    assert len(means.to_dataframe()) == tiny_model.n_layers * 64
    text = mean_activations(tiny_model)
    assert text.reference == "text" and text.n_prompts == len(load_probes("text"))
    assert mean_activations(tiny_model) is text  # once per model


@pytest.mark.parametrize("positions", ["all", "last"])
def test_mean_ablation_is_a_hook_setting_the_means(tiny_gemma_post, probes, positions):
    """ablation="mean": every row equals one full forward whose hook sets the knocked-out
    activations to their reference means (written out by hand), the post-MLP norm frozen by hand;
    rows differ from zero ablation; the settings name the reference."""
    model = tiny_gemma_post
    grid = KnockoutGrid(ks=(5,), windows=(1, 2), modes=("zero_top", "keep_top"), keep_top_ks=None,
                        keep_top_windows=None)
    options = KnockoutOptions(grid=grid, controls=CONTROLS, positions=positions, ablation="mean", seed=1)
    result = knockout_grid(model, probes[:2], options)
    means = mean_activations(model).means
    assert result.settings["ablation"] == "mean" and result.settings["mean_reference"]["reference"] == "text"
    assert (result.rows["ablation"] == "mean").all()
    frame = with_targets(result)
    for probe, t in zip(probes[:2], tokenize_probes(model, probes[:2])):
        clean_pred = prediction(model, full_forward(model, t.prompt_ids))
        ref = reference_state(model, t.prompt_ids)
        for row in frame[frame["probe_id"] == probe.id].itertuples():
            expected = reference_knockout_logits(model, t.prompt_ids, row, positions=positions, seed=1, ref=ref,
                                                 means=means)
            assert_row_matches(row, expected, clean_pred, model)
    zero = knockout_grid(model, probes[:2], dataclasses.replace(options, ablation="zero")).rows
    assert (zero["prob_of_clean_pred"].to_numpy() != result.rows["prob_of_clean_pred"].to_numpy()).any()


def test_value_vector_ranks_by_hand(tiny_gemma_post, probes):
    """The prediction's rank in W_out[neuron] @ W_U over real tokens (0 = top), for the top-k
    neurons of every layer; top-1, min, mean and max as the authors report them."""
    model = tiny_gemma_post
    result = value_vector_ranks(model, probes[:3], ks=(1, 3))
    ranking = rank_neurons(model, probes[:3])
    frame = result.to_dataframe()
    assert set(frame["k"]) == {1, 3} and len(frame) == 3 * model.n_layers * 2
    valid = valid_mask(model)
    w_u = model.bridge.W_U.detach().float()
    for p, pid in enumerate(result.probe_ids):
        pred = result.pred_ids[p]
        assert pred == ranking.pred_ids[p]
        for layer in range(model.n_layers):
            by_hand = []
            for n in ranking.top(3)[p, layer].tolist():
                w_out = model.bridge.blocks[layer].mlp.out.original_component.weight.detach().float().T
                proj = masked(model, w_out[n] @ w_u)
                order = [i for i in proj.argsort(descending=True).tolist() if valid[i]]
                by_hand.append(order.index(pred))
            row1 = frame[(frame["probe_id"] == pid) & (frame["layer"] == layer) & (frame["k"] == 1)].iloc[0]
            row3 = frame[(frame["probe_id"] == pid) & (frame["layer"] == layer) & (frame["k"] == 3)].iloc[0]
            assert row1.top1_rank == by_hand[0] == row3.top1_rank
            assert (row3.min_rank, row3.max_rank) == (min(by_hand), max(by_hand))
            assert row3.mean_rank == pytest.approx(np.mean(by_hand))  # a float64 mean of 3 integers
    summary = result.summary()
    assert set(summary.columns) >= {"group", "layer", "k", "n", "median_top1_rank", "share_top1_is_pred"}
    eff = value_vector_ranks(model, probes[:3], ks=(1,), weights="effective")
    assert eff.settings["weights"] == "effective" and eff.ranks.shape == (3, model.n_layers, 1)
    with pytest.raises(InputError, match="ks"):
        value_vector_ranks(model, probes[:3], ks=(0,))


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_value_vector_ranks_of_a_probe_do_not_depend_on_the_other_probes(which, request, probes, tmp_path):
    """Batched equals unbatched: each probe's ranks alone equal its ranks among other probes (the
    projections run in GEMMs of one fixed shape; CPU BLAS rounds by row count otherwise), on the
    tiny model and on Gemma 3 270M (its 262,144-token unembedding). Parts joined, saved and loaded
    are the one call's result."""
    if which == "tiny":
        model, chosen = request.getfixturevalue("tiny_gemma_post"), probes[:4]
    else:
        model, chosen = request.getfixturevalue("embedded_model"), list(load_probes("idioms"))[:3]
    together = value_vector_ranks(model, chosen, ks=(1, 3))
    alone = [value_vector_ranks(model, [p], ks=(1, 3)) for p in chosen]
    for p, single in enumerate(alone):
        assert single.pred_ids[0] == together.pred_ids[p]
        np.testing.assert_array_equal(single.neurons[0], together.neurons[p])
        np.testing.assert_array_equal(single.ranks[0], together.ranks[p])
    joined = type(together).join_parts([value_vector_ranks(model, chosen[:2], ks=(1, 3)), *alone[2:]])
    joined.save(tmp_path)
    loaded = type(together).load(tmp_path)
    for result in (joined, loaded):
        assert result.probe_ids == together.probe_ids and result.ks == together.ks
        np.testing.assert_array_equal(result.ranks, together.ranks)
        pd.testing.assert_frame_equal(result.to_dataframe(), together.to_dataframe())
    with pytest.raises(InputError, match="different ks"):
        type(together).join_parts([together, value_vector_ranks(model, chosen[:1], ks=(1,))])


def test_grid_shape_summary_intervals_and_groups(tiny_model, probes, tmp_path):
    result = _grid(tiny_model, probes, ks=(1, 5), windows=(1, 2), modes=("zero_top",))
    n_windows = 3 + 2
    n_cfg = 2 * n_windows * 3 + n_windows  # targeted, random, matched per k; one whole-MLP ceiling per window
    assert result.settings["n_configs"] == n_cfg and len(result.rows) == n_cfg * len(probes)
    summary = result.summary()
    assert set(summary["group"]) <= {"memorized idioms", "non-memorized idioms", "ordinary text", "memorized facts",
                                     "non-memorized facts"}
    assert summary["changed"].between(0, 1).all()
    assert (summary["changed_low"] <= summary["changed"] + 1e-12).all()
    assert (summary["changed"] <= summary["changed_high"] + 1e-12).all()
    n_group = result.probes["group"].value_counts()
    for row in summary.itertuples():
        assert row.n == n_group[row.group]
        low, high = wilson_interval(row.n_changed, row.n)
        # the same float64 formula
        assert (row.changed_low, row.changed_high) == pytest.approx((float(low), float(high)))
    table = result.layer_table(k=5, window=1)
    assert set(table["control"]) == {"targeted", "random", "matched", "whole_mlp"}
    assert {"group", "layer", "n", "changed", "changed_low", "changed_high"} <= set(table.columns)
    # the layer table's diagnostics are the means of the rows of that set, control and layer
    frame = result.to_dataframe()
    for row in table.itertuples():
        rows = frame[(frame["group"] == row.group) & (frame["control"] == row.control) & (frame["start"] == row.layer)
                     & (frame["window"] == 1) & ((frame["k"] == 5) | (frame["control"] == "whole_mlp"))]
        assert len(rows) == row.n
        for name in ("n_zeroed", "removed_norm", "out_norm_ratio", "matched_norm_ratio"):
            assert getattr(row, name) == pytest.approx(rows[name].mean(), nan_ok=True)  # float64 means
    paths = result.save(tmp_path)
    assert all((tmp_path / p).exists() for p in paths)
    # a result saved before the ablation option and the diagnostics: zero ablation, NaN diagnostics
    old = KnockoutResult(rows=result.rows.drop(columns=["ablation", "removed_norm", "out_cosine", "out_norm_ratio",
                                                        "matched_norm_ratio"]),
                         probes=result.probes, settings=result.settings)
    old_table = old.layer_table(k=5, window=1)
    assert set(old_table["ablation"]) == {"zero"} and old_table["removed_norm"].isna().all()
    assert np.array_equal(old_table["changed"], table["changed"])


def test_wilson_interval_by_hand():
    low, high = wilson_interval(np.array([0, 5, 10]), np.array([10, 10, 10]))
    z = 1.959963984540054
    p, n = 0.5, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert low[1] == pytest.approx(centre - half) and high[1] == pytest.approx(centre + half)  # float64, by hand
    assert low[0] == 0.0 and high[2] == 1.0 and 0 < high[0] < 0.35
    nan_low, _ = wilson_interval(0, 0)
    assert np.isnan(nan_low)


def test_grid_sizes():
    assert len(knockout_cells(18, controls=())) == 4 * 80 + 51  # zero_top every k (1-5); keep_top k=100 (1-3)
    paper = knockout_cells(18, KnockoutGrid.PAPER, controls=())
    assert len(paper) == 4 * 80 + 3 * 51 == 473
    with_controls = knockout_cells(18, KnockoutGrid.PAPER, d_mlp=2048)
    assert len(with_controls) == 3 * 320 + 2 * 153 + 80
    assert len(knockout_cells(18, KnockoutGrid.STUDY, d_mlp=2048)) == 4 * 18  # the study's: targeted + 3 controls
    assert {c.k for c in with_controls if c.control == "whole_mlp"} == {2048}


def test_full_grid_is_the_papers(tiny_model, probes):
    result = knockout_grid(tiny_model, probes[:1],
                           KnockoutOptions(grid=KnockoutGrid.PAPER, controls=(), positions="last"))
    rows = result.rows
    assert result.settings["grid"] == "paper"
    zero, keep = rows[rows["mode"] == "zero_top"], rows[rows["mode"] == "keep_top"]
    assert set(zero["k"]) == {1, 10, 100, 1000} and set(zero["window"]) == {1, 2, 3}  # 3-layer model
    assert set(keep["k"]) == {10, 100, 1000} and set(keep["window"]) == {1, 2, 3}


def test_the_stock_grids_are_clipped_and_others_must_fit(tiny_model, probes):
    """DEFAULT's windows (1-5, keep_top 1-3) are cut to a 3-layer model's; an explicit window of 4 is refused."""
    result = knockout_grid(tiny_model, probes[:1], KnockoutOptions(grid=KnockoutGrid(ks=(1,)), controls=()))
    assert result.settings["windows"] == [1, 2, 3] and result.settings["keep_top_windows"] == [1, 2, 3]
    with pytest.raises(InputError, match="window lengths must be in 1..3"):
        knockout_grid(tiny_model, probes[:1], KnockoutOptions(grid=KnockoutGrid(ks=(1,), windows=(1, 4))))
    assert KnockoutGrid.DEFAULT.clipped(2).windows == (1, 2)


def test_options_are_validated_on_creation():
    for bad in (dict(ks=()), dict(ks=(-1,)), dict(windows=(0,)), dict(modes=("zap",)), dict(keep_top_ks=(-2,))):
        with pytest.raises(InputError):
            KnockoutGrid(**bad)
    assert KnockoutGrid(ks=[1, 2], windows=[1]).ks == (1, 2)  # lists become tuples: hashable, keyable
    assert KnockoutOptions(controls=["random"]).controls == ("random",)
    assert KnockoutOptions(controls=["matched_score"]).controls == ("matched_score",)
    with pytest.raises(InputError, match="ablation must be 'zero' or 'mean', got 'median'"):
        KnockoutOptions(ablation="median")
    with pytest.raises(InputError, match="norm must be 'frozen' or 'live'"):
        KnockoutOptions(norm="fixed")
    assert KnockoutGrid.PAPER.modes == ("zero_top", "keep_top") and KnockoutGrid.STUDY.keep_top_ks is None


def test_validation(tiny_model, probes):
    with pytest.raises(InputError, match="modes"):
        knockout_grid(tiny_model, probes, KnockoutOptions(grid=KnockoutGrid(modes=("zap",))))
    with pytest.raises(InputError, match="window"):
        knockout_grid(tiny_model, probes, KnockoutOptions(grid=KnockoutGrid(windows=(9,))))
    with pytest.raises(InputError, match="no probes"):
        knockout_grid(tiny_model, [])
    with pytest.raises(InputError, match="positions"):
        knockout_grid(tiny_model, probes, KnockoutOptions(positions="first"))
    with pytest.raises(InputError, match="controls"):
        knockout_grid(tiny_model, probes, KnockoutOptions(controls=("shuffled",)))
    with pytest.raises(InputError, match="norm"):
        knockout_grid(tiny_model, probes, KnockoutOptions(norm="fixed"))
    with pytest.raises(InputError, match="rank_by"):
        knockout_grid(tiny_model, probes, KnockoutOptions(rank_by="size"))


def test_one_control_or_none(tiny_model, probes):
    grid = KnockoutGrid(ks=(1,), windows=(1,), modes=("zero_top",))
    result = knockout_grid(tiny_model, probes[:1], KnockoutOptions(grid=grid, controls=("random",)))
    assert set(result.rows["control"]) == {"targeted", "random"}
    result = knockout_grid(tiny_model, probes[:1], KnockoutOptions(grid=grid, controls=()))
    assert set(result.rows["control"]) == {"targeted"}


MEMORIZED = [
    "once in a blue moon", "turn a blind eye", "kill two birds with one stone", "the elephant in the room",
    "a piece of cake", "break the ice", "let the cat out of the bag", "hit the nail on the head",
    "the tip of the iceberg", "actions speak louder than words", "barking up the wrong tree",
    "every cloud has a silver lining", "the early bird catches the worm", "speak of the devil",
]


@pytest.mark.embedded
def test_early_top_neurons_matter_more_than_random(embedded_model):
    """Authors' positions (every position), the post-MLP norm frozen: zeroing the top-100 neurons of
    3 early layers changes memorized predictions much more than 100 random neurons; the norm-matched
    control zeroes more of the score than the random one and removes a vector much closer in norm
    to the top-100's than the score-matched control (whose contributions cancel), as the rows say."""
    probes = [Probe(id=f"m{i}", prompt=t.rsplit(" ", 1)[0], target=t.rsplit(" ", 1)[1], kind="idiom")
              for i, t in enumerate(MEMORIZED)]
    grid = KnockoutGrid(ks=(100,), windows=(3,), modes=("zero_top",))
    result = knockout_grid(embedded_model, probes, KnockoutOptions(
        grid=grid, controls=("random", "matched", "matched_score"), seed=0))
    frame = result.to_dataframe()
    frame = frame[(frame["group"] == "memorized idioms") & (frame["start"] <= 2)]  # layers 0..4
    assert frame["probe_id"].nunique() >= 10
    share = frame.groupby("control")["changed"].mean()
    drop = frame.groupby("control")["prob_drop"].mean()
    zeroed = frame.groupby("control")["zeroed_share"].mean()
    assert share["targeted"] > share["random"] + 0.2, share
    assert drop["targeted"] > drop["random"] + 0.2, drop
    assert zeroed["random"] < zeroed["matched"] <= zeroed["targeted"] + 1e-9, zeroed
    ratio = frame.groupby("control")["matched_norm_ratio"].median()
    assert ratio["random"] < ratio["matched_score"] < ratio["matched"] <= 1 + MATCH_TOLERANCE, ratio
