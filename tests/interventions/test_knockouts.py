"""Knockout invariants on the tiny random Gemma 3 (fast), and one integration test on Gemma 3 270M."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.forward import tokenize_probes
from idiom_lens.interventions import (
    KnockoutConfig,
    knockout_configs,
    knockout_grid,
    rank_neurons,
    sample_probes,
    value_vector_norms,
)
from idiom_lens.interventions.knockouts import _clean_state, knockout_hooks, knockout_rows
from idiom_lens.selfcheck import relative_error

from .test_against_full_forward import (
    assert_row_matches,
    full_forward,
    plain_activations,
    reference_knockout_logits,
    zero_neurons,
)


def _grid(model, probes, **kw):
    opts = dict(ks=(0, 1, 5, 64), windows=(1, 2), modes=("zero_top", "keep_top"), keep_top_ks=None)
    opts.update(kw)
    return knockout_grid(model, probes, **opts)


def test_empty_knockout_and_keep_all_change_nothing(tiny_model, probes):
    result = _grid(tiny_model, probes)
    rows = result.rows
    noop = rows[((rows["mode"] == "zero_top") & (rows["k"] == 0)) | ((rows["mode"] == "keep_top") & (rows["k"] == 64))]
    assert len(noop) > 0
    assert not noop["changed"].any()
    # (the clean reference ran as a batch of 1: BLAS may differ in the last bit across batch sizes)
    assert noop["prob_drop"].abs().max() < 1e-5
    # and the clean prediction is the model's own (full forward, no cache)
    toks = tokenize_probes(tiny_model, probes)
    for probe, t, pred in zip(probes, toks, result.probes["clean_pred_id"]):
        with torch.no_grad():
            logits = tiny_model.bridge(torch.tensor([t.prompt_ids]))[0, -1]
        assert int(logits.argmax()) == pred
    # zeroing every neuron does change things
    full = rows[(rows["mode"] == "zero_top") & (rows["k"] == 64)]
    assert (full["prob_drop"].abs() > 0).any()


def test_keep_top_k_larger_than_layer_is_clean(tiny_model, probes):
    result = _grid(tiny_model, probes[:2], ks=(1000,), modes=("keep_top",), control=None)
    assert result.rows["prob_drop"].abs().max() < 1e-5 and not result.rows["changed"].any()


@pytest.mark.parametrize("positions", ["last", "all"])
def test_noop_configurations_give_identical_logits(tiny_model, probes, positions):
    """Zero nothing / keep everything: no hook at all, rows bit-identical to the unhooked batch and
    equal to a plain full forward; the one real knockout in the batch equals its full forward."""
    configs = [KnockoutConfig("zero_top", c, 0, s, s + 1) for c in ("targeted", "random") for s in (0, 1)]
    configs += [KnockoutConfig("keep_top", c, 64, 0, 2) for c in ("targeted", "random")]
    configs += [KnockoutConfig("keep_top", "targeted", 5000, 1, 1)]
    for t in tokenize_probes(tiny_model, probes[:3]):
        state = _clean_state(tiny_model, t.prompt_ids, use_kv=positions == "last")
        order = torch.randperm(64, generator=torch.Generator().manual_seed(0)).expand(3, 64)
        runner = state.runner
        hooks = knockout_hooks(configs, order=order, probe_id="x", seed=0, last=runner.last, n_pos=runner.n_pos,
                               positions=positions)
        assert hooks == []  # nothing to touch
        mixed = configs + [KnockoutConfig("zero_top", "targeted", 5, 0, 0)]
        hooks = knockout_hooks(mixed, order=order, probe_id="x", seed=0, last=runner.last, n_pos=runner.n_pos,
                               positions=positions)
        hooked = runner.run(len(mixed), hooks)
        assert torch.equal(hooked[:-1], runner.run(len(mixed), [])[:-1])  # untouched rows: identical
        plain = full_forward(tiny_model, t.prompt_ids)
        assert max(relative_error(row, plain) for row in hooked[:-1]) < 1e-5
        last = len(t.prompt_ids) - 1
        by_hand = full_forward(tiny_model, t.prompt_ids, [("blocks.0.mlp.hook_post", zero_neurons(order[0, :5], positions, last))])
        assert relative_error(hooked[-1], by_hand) < 1e-5
        assert relative_error(by_hand, plain) > 1e-4  # the real knockout changes its row


def test_last_position_knockout_matches_a_plain_hook(tiny_model, probes):
    """The cached-prefix path equals a full forward with mlp.hook_post zeroed at the last position."""
    toks = tokenize_probes(tiny_model, probes[:3])
    for t in toks:
        state = _clean_state(tiny_model, t.prompt_ids, use_kv=True)
        order = torch.arange(64).expand(3, 64)
        cfg = KnockoutConfig("zero_top", "targeted", 64, 1, 1)  # whole MLP of layer 1
        got = knockout_rows(tiny_model, state, [cfg], order=order, probe_id="x", target_id=t.target_id)
        last = len(t.prompt_ids) - 1

        def zero(x, hook):
            x = x.clone()
            x[:, last] = 0
            return x

        with torch.no_grad():
            logits = tiny_model.bridge.run_with_hooks(
                torch.tensor([t.prompt_ids]), fwd_hooks=[("blocks.1.mlp.hook_post", zero)]
            )[0, -1]
        probs = logits.softmax(-1)
        assert got["new_pred_id"][0] == int(logits.argmax())
        assert got["prob_of_clean_pred"][0] == pytest.approx(float(probs[state.pred_id]), abs=1e-5)


def test_all_positions_mode(tiny_model, probes):
    result = _grid(tiny_model, probes[:3], ks=(0, 64), modes=("zero_top",), positions="all", control=None)
    rows = result.rows
    assert rows.loc[rows["k"] == 0, "prob_drop"].abs().max() < 1e-5
    last = _grid(tiny_model, probes[:3], ks=(64,), modes=("zero_top",), control=None).rows
    # zeroing the MLP at every position differs from the last position only (earlier positions feed attention)
    assert not np.allclose(rows.loc[rows["k"] == 64, "prob_of_clean_pred"], last["prob_of_clean_pred"])


def test_random_control_is_seeded(tiny_model, probes):
    """Same seed, same rows; another seed, other random neurons; and every random row is the full
    forward with the neurons its seed draws zeroed by hand."""
    kw = dict(ks=(5,), windows=(1,), modes=("zero_top",))
    a = _grid(tiny_model, probes[:4], seed=1, **kw)
    b = _grid(tiny_model, probes[:4], seed=1, **kw).rows
    c = _grid(tiny_model, probes[:4], seed=2, **kw).rows
    rows = a.rows
    rand = rows["control"] == "random"
    assert np.array_equal(rows.loc[rand, "prob_of_clean_pred"], b.loc[rand, "prob_of_clean_pred"])
    assert not np.array_equal(rows.loc[rand, "prob_of_clean_pred"], c.loc[rand, "prob_of_clean_pred"])
    targ = rows["control"] == "targeted"  # the targeted rows do not depend on the seed
    assert np.array_equal(rows.loc[targ, "prob_of_clean_pred"], c.loc[targ, "prob_of_clean_pred"])
    frame = a.to_dataframe().merge(a.probes[["probe_id", "target_id"]], on="probe_id")
    for probe, t in zip(probes[:4], tokenize_probes(tiny_model, probes[:4])):
        clean_pred = int(full_forward(tiny_model, t.prompt_ids).argmax())
        for row in frame[(frame["probe_id"] == probe.id) & (frame["control"] == "random")].itertuples():
            assert_row_matches(row, reference_knockout_logits(tiny_model, t.prompt_ids, row, positions="last", seed=1),
                               clean_pred)


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_batched_equals_unbatched_equals_full_forward(tiny_model, probes, batch_size):
    """Configurations as rows of batches of any size: every row is its own full forward."""
    result = _grid(tiny_model, probes[:3], ks=(1, 5), windows=(1, 3), batch_size=batch_size)
    frame = result.to_dataframe().merge(result.probes[["probe_id", "target_id"]], on="probe_id")
    for probe, t in zip(probes[:3], tokenize_probes(tiny_model, probes[:3])):
        clean_pred = int(full_forward(tiny_model, t.prompt_ids).argmax())
        acts = plain_activations(tiny_model, t.prompt_ids)
        for row in frame[frame["probe_id"] == probe.id].itertuples():
            assert_row_matches(row, reference_knockout_logits(tiny_model, t.prompt_ids, row, positions="last", acts=acts),
                               clean_pred)


def test_ranking_is_activation_times_value_norm(tiny_model, probes):
    ranking = rank_neurons(tiny_model, probes[:2])
    norms = value_vector_norms(tiny_model)
    toks = tokenize_probes(tiny_model, probes[:2])
    for p, t in enumerate(toks):
        with torch.no_grad():
            _, cache = tiny_model.bridge.run_with_cache(torch.tensor([t.prompt_ids]))
        for layer in range(tiny_model.n_layers):
            act = cache[f"blocks.{layer}.mlp.hook_post"][0, -1]
            torch.testing.assert_close(ranking.activations[p, layer], act, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ranking.scores[p, layer], act.abs() * norms[layer], atol=1e-5, rtol=1e-5)
    assert ranking.top(3).shape == (2, tiny_model.n_layers, 3)
    assert len(ranking.to_dataframe(k=2)) == 2 * tiny_model.n_layers * 2
    dla = rank_neurons(tiny_model, probes[:2], rank_by="dla")
    assert not torch.equal(dla.scores, ranking.scores)


def test_grid_shape_summary_and_groups(tiny_model, probes, tmp_path):
    result = _grid(tiny_model, probes, ks=(1, 5), windows=(1, 2), modes=("zero_top",))
    n_cfg = 2 * (3 + 2) * 2
    assert result.settings["n_configs"] == n_cfg and len(result.rows) == n_cfg * len(probes)
    summary = result.summary()
    assert set(summary["group"]) <= {"memorized idioms", "non-memorized idioms", "ordinary text", "memorized facts",
                                     "non-memorized facts"}
    assert summary["changed"].between(0, 1).all()
    paths = result.write(tmp_path)
    assert all((tmp_path / p).exists() for p in paths)


def test_default_grid_size():
    configs = knockout_configs(18)
    assert len(configs) == 4 * 80 * 2 + 80 * 2  # zero_top for every k, keep_top for k=100; x targeted/random
    assert len(knockout_configs(18, keep_top_ks=None)) == 4 * 80 * 2 * 2


def test_validation(tiny_model, probes):
    with pytest.raises(InputError, match="modes"):
        knockout_grid(tiny_model, probes, modes=("zap",))
    with pytest.raises(InputError, match="window"):
        knockout_grid(tiny_model, probes, windows=(9,))
    with pytest.raises(InputError, match="no probes"):
        knockout_grid(tiny_model, [])
    with pytest.raises(InputError, match="positions"):
        knockout_grid(tiny_model, probes, positions="first")


def test_sample_probes_is_seeded(probes):
    assert sample_probes(probes, 4, seed=3) == sample_probes(probes, 4, seed=3)
    assert sample_probes(probes, 4, seed=3) != sample_probes(probes, 4, seed=4)
    assert sample_probes(probes, None) == list(probes)


MEMORIZED = [
    "once in a blue moon", "turn a blind eye", "kill two birds with one stone", "the elephant in the room",
    "a piece of cake", "break the ice", "let the cat out of the bag", "hit the nail on the head",
    "the tip of the iceberg", "actions speak louder than words", "barking up the wrong tree",
    "every cloud has a silver lining", "the early bird catches the worm", "speak of the devil",
]


@pytest.mark.embedded
def test_early_top_neurons_matter_more_than_random(embedded_model):
    probes = [Probe(id=f"m{i}", prompt=t.rsplit(" ", 1)[0], target=t.rsplit(" ", 1)[1], kind="idiom")
              for i, t in enumerate(MEMORIZED)]
    result = knockout_grid(embedded_model, probes, ks=(100,), windows=(3,), modes=("zero_top",), seed=0)
    frame = result.to_dataframe()
    frame = frame[(frame["group"] == "memorized idioms") & (frame["start"] <= 2)]  # layers 0..4
    assert frame["probe_id"].nunique() >= 10
    share = frame.groupby("control")["changed"].mean()
    drop = frame.groupby("control")["prob_drop"].mean()
    assert share["targeted"] > share["random"] + 0.2, share
    assert drop["targeted"] > drop["random"] + 0.2, drop
