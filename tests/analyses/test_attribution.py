"""Direct logit attribution: sum invariants, batching, validation, value-vector reading, statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tolerances import logit_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.attribution import (
    FRAME_COLUMNS,
    AttributionResult,
    attribute_probe,
    attribute_probes,
    promoted_tokens_of,
)
from idiom_lens.analyses.attribution_stats import component_shares, cumulative_share, layer_stats, summary
from idiom_lens.errors import InputError
from idiom_lens.models.loading import load_model


def tol(model, result_or_probe) -> float:
    """fp32 noise of a decomposition: components (each a dot product through the model) summed
    against the forward's own logit, relative to the size of the terms summed (their |sum|)."""
    probes = result_or_probe.probes if hasattr(result_or_probe, "probes") else [result_or_probe]
    terms = max(float(p.embed.abs().sum() + p.attn.abs().sum() + p.mlp.abs().sum()) for p in probes)
    return logit_atol(model, terms)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return load_model(str(tiny_llama_dir), mode="compat", progress=False)


def _all_neurons(model) -> int:
    return model.n_layers * int(model.bridge.cfg.d_mlp)


def _check_invariants(result: AttributionResult, d_mlp: int) -> dict[str, float]:
    err = {"logit": 0.0, "diff": 0.0, "heads": 0.0, "neurons": 0.0}
    for p in result.probes:
        rec = p.reconstructed()
        err["logit"] = max(err["logit"], abs(float(rec[0]) - p.logit))
        err["diff"] = max(err["diff"], abs(float(rec[1]) - p.logit_diff))
        err["heads"] = max(err["heads"], float((p.heads.sum(1) + p.attn_bias - p.attn).abs().max()))
        per_layer = torch.zeros_like(p.mlp)
        assert len(p.top_neurons) == p.n_layers * d_mlp  # every neuron kept
        for n in p.top_neurons:
            per_layer[n.layer] += torch.tensor([n.contribution, n.contribution_diff])
        err["neurons"] = max(err["neurons"], float((per_layer + p.mlp_bias - p.mlp).abs().max()))
    return err


@pytest.mark.parametrize("which", ["gemma_post", "llama"])
def test_sum_invariants(which, request, probes):
    model = request.getfixturevalue(which)
    result = attribute_probes(model, probes, batch_size=4, top_neurons=_all_neurons(model), promoted_tokens=0)
    err = _check_invariants(result, int(model.bridge.cfg.d_mlp))
    atol = tol(model, result)
    assert all(v < atol for v in err.values()), err
    assert all(v < atol for v in result.checks.values()), result.checks
    # the logit is the model's own final (compat) logit at the last prompt position
    p = result.probes[0]
    toks = torch.tensor([model.tokenizer(probes[0].prompt).input_ids])
    with torch.no_grad():
        own = model.bridge(toks)[0, -1]
    assert p.pred_id == int(own.argmax())
    assert p.logit == pytest.approx(float(own.max()), abs=atol)
    assert p.logit_diff == pytest.approx(float(own[p.pred_id] - own[p.other_id]), abs=atol)


def test_gemma_post_norms_matter(gemma_post, probes):
    """TransformerLens's head results stop before the post-attention norm: unscaled heads would
    not sum to hook_attn_out on Gemma 3; ours do (checked above). Guard that the fixture really
    has non-trivial post norms, so the invariant test is not vacuous."""
    block = gemma_post.bridge.blocks[0]
    assert float(block.ln1_post.weight.detach().abs().max()) > 0.1
    toks = torch.tensor([gemma_post.tokenizer(probes[0].prompt).input_ids])
    _, cache = gemma_post.bridge.run_with_cache(toks)
    tl_heads = cache.stack_head_results(layer=1, pos_slice=-1)  # [head, batch, d_model], layer 0
    attn_out = cache["blocks.0.hook_attn_out"][:, -1]
    # far beyond fp32 noise
    assert not torch.allclose(tl_heads.sum(0), attn_out, atol=100 * logit_atol(gemma_post, attn_out, n_layers=1))


def test_matches_transformer_lens_dla(llama, probes):
    """On a model without post norms, our per-layer and per-head numbers equal TransformerLens's."""
    from transformer_lens.tools.analysis import direct_logit_attribution

    probe = probes[1]
    ours = attribute_probe(llama, probe.prompt, probe.target, top_neurons=0, promoted_tokens=0)
    toks = torch.tensor([llama.tokenizer(probe.prompt).input_ids])
    comp = direct_logit_attribution(llama.bridge, toks, answer_tokens=torch.tensor([ours.pred_id]), unit="component")
    vals = comp.attribution[:, 0].detach()
    assert comp.labels[0] == "embed"
    atol = tol(llama, ours)  # the same components, TransformerLens's kernels: fp32 noise
    assert float(vals[0]) == pytest.approx(float(ours.embed[0]), abs=atol)
    for layer in range(llama.n_layers):
        assert float(vals[comp.labels.index(f"{layer}_attn_out")]) == pytest.approx(float(ours.attn[layer, 0]),
                                                                                     abs=atol)
        assert float(vals[comp.labels.index(f"{layer}_mlp_out")]) == pytest.approx(float(ours.mlp[layer, 0]), abs=atol)
    heads = direct_logit_attribution(llama.bridge, toks, answer_tokens=torch.tensor([ours.pred_id]),
                                     incorrect_tokens=torch.tensor([ours.other_id]), unit="head")
    n_heads = ours.heads.shape[1]
    tl = heads.attribution.detach()[: llama.n_layers * n_heads, 0].reshape(llama.n_layers, n_heads)
    assert torch.allclose(tl, ours.heads[:, :, 1], atol=atol, rtol=0)


def test_batch_size_independent(gemma_post, probes):
    one = attribute_probes(gemma_post, probes, batch_size=1, top_neurons=5, promoted_tokens=2)
    eight = attribute_probes(gemma_post, probes, batch_size=8, top_neurons=5, promoted_tokens=2)
    for a, b in zip(one.probes, eight.probes):
        assert (a.probe_id, a.pred_id, a.other_id, a.group) == (b.probe_id, b.pred_id, b.other_id, b.group)
        atol = tol(gemma_post, a)  # batch shapes: fp32 noise
        for name in ("embed", "attn", "mlp", "heads", "attn_bias", "mlp_bias"):
            assert torch.allclose(getattr(a, name), getattr(b, name), atol=atol, rtol=0), name
        assert [(n.layer, n.neuron) for n in a.top_neurons] == [(n.layer, n.neuron) for n in b.top_neurons]
        assert [n.promoted for n in a.top_neurons] == [n.promoted for n in b.top_neurons]
    for g in one.neuron_means:
        assert torch.allclose(one.neuron_means[g], eight.neuron_means[g], atol=tol(gemma_post, one), rtol=0)


def test_raw_mode_rejected(tiny_model, probes):
    with pytest.raises(InputError, match="compat"):
        attribute_probes(tiny_model, probes)
    with pytest.raises(InputError, match="compat"):
        attribute_probe(tiny_model, "once in a blue")


def test_bad_options(gemma_post, probes):
    with pytest.raises(InputError, match="empty"):
        attribute_probes(gemma_post, [])
    with pytest.raises(InputError, match="rank_neurons_by"):
        attribute_probes(gemma_post, probes, rank_neurons_by="size")  # type: ignore[arg-type]


def test_value_vector_projection_by_hand(gemma_post):
    """Promoted tokens = top of (sign x W_out[l][n] x post-norm weight) @ W_U, computed by hand."""
    bridge = gemma_post.bridge
    layer, neuron = 1, 7
    v = bridge.blocks[layer].mlp.W_out[neuron].detach() * (bridge.blocks[layer].ln2_post.weight.detach() + 1.0)
    expected = [gemma_post.tokenizer.decode([i]) for i in (v @ bridge.W_U).topk(4).indices.tolist()]
    expected_neg = [gemma_post.tokenizer.decode([i]) for i in (-v @ bridge.W_U).topk(4).indices.tolist()]
    got = promoted_tokens_of(gemma_post, [(layer, neuron), (layer, neuron)], signs=[1.0, -0.5], k=4)
    assert list(got[(layer, neuron, 1)]) == expected
    assert list(got[(layer, neuron, -1)]) == expected_neg


def test_probe_neurons_carry_promoted_tokens(gemma_post):
    p = attribute_probe(gemma_post, "once in a blue", "moon", top_neurons=3, promoted_tokens=2)
    assert len(p.top_neurons) == 3 and all(len(n.promoted) == 2 for n in p.top_neurons)
    contributions = [n.contribution for n in p.top_neurons]
    assert contributions == sorted(contributions, reverse=True)
    assert p.other_is == ("runner_up" if p.memorized else "target")


def test_prompt_only_uses_runner_up(gemma_post):
    p = attribute_probe(gemma_post, "once in a blue", top_neurons=0, promoted_tokens=0)
    assert p.target is None and p.memorized is None and p.other_is == "runner_up"
    assert p.logit_diff >= 0


def test_dataframes_and_parquet(gemma_post, probes, tmp_path):
    result = attribute_probes(gemma_post, probes, top_neurons=4, promoted_tokens=2)
    frame = result.to_dataframe()
    assert list(frame.columns) == FRAME_COLUMNS
    assert set(frame["component"]) == {"embed", "attn", "mlp", "head", "neuron", "bias"}
    per_probe = frame.groupby("probe_id").size()
    L, H = gemma_post.n_layers, int(gemma_post.bridge.cfg.n_heads)
    assert (per_probe == 1 + L * (4 + H) + 1 + 4).all()
    assert all(p.exists() for p in result.save(tmp_path))
    back = pd.read_parquet(tmp_path / "attribution.parquet")
    assert len(back) == len(frame)
    neurons = pd.read_parquet(tmp_path / "attribution_neurons.parquet")
    assert set(neurons["scope"]) == {"probe", "set"}
    assert len(result.probes_dataframe()) == len(probes)


def test_statistics(gemma_post, probes):
    result = attribute_probes(gemma_post, probes, top_neurons=2, promoted_tokens=0)
    L = gemma_post.n_layers
    stats = layer_stats(result, n_boot=200)
    assert set(stats["component"]) == {"embed", "attn", "mlp"}
    assert (stats["mean_low"] <= stats["mean"] + 1e-9).all() and (stats["mean"] <= stats["mean_high"] + 1e-9).all()
    assert stats.equals(layer_stats(result, n_boot=200))  # seeded
    for measure in ("logit", "logit_diff"):
        cum = cumulative_share(result, measure=measure, n_boot=200)
        last = cum[cum["step"] == 2 * L]
        assert np.allclose(last["share"], 1.0)  # float64: every component's share summed
    shares = component_shares(result, n_boot=200)
    # shares of fp32 components over their total: 1 up to the decomposition's noise over the total
    noise = tol(gemma_post, result) / float(np.abs([(p.logit, p.logit_diff) for p in result.probes]).min())
    assert np.allclose(shares["embed_share"] + shares["attn_share"] + shares["mlp_share"], 1.0, atol=noise, rtol=0)
    for name in ("embed_share", "attn_share", "mlp_share", "early_mlp_share"):
        assert (shares[f"{name}_low"] <= shares[name] + 1e-9).all()
        assert (shares[name] <= shares[f"{name}_high"] + 1e-9).all()
    assert shares.equals(component_shares(result, n_boot=200))  # seeded
    digest = summary(result)
    assert digest["n_probes"] == len(probes) and set(digest["component_shares"]) == {"logit", "logit_diff"}


@pytest.mark.embedded
@pytest.mark.xdist_group("compat")  # one compat model load under pytest-xdist (tests/conftest.py)
def test_embedded_once_in_a_blue_moon(embedded_model_compat):
    result = attribute_probes(embedded_model_compat, [_probe("once in a blue", "moon")], top_neurons=5)
    p = result.probes[0]
    assert p.pred_token == " moon" and p.memorized
    rec = p.reconstructed()
    atol = tol(embedded_model_compat, p)  # sums of fp32 components against the forward's logit
    assert abs(float(rec[0]) - p.logit) < atol and abs(float(rec[1]) - p.logit_diff) < atol
    assert float((p.heads.sum(1) + p.attn_bias - p.attn).abs().max()) < atol
    assert result.checks["neurons_vs_mlp"] < atol and result.checks["heads_vs_attn"] < atol
    assert all(len(n.promoted) == 5 for n in p.top_neurons)


def _probe(prompt: str, target: str):
    from idiom_lens.datasets.probes import Probe

    return Probe(id="blue", prompt=prompt, target=target, kind="idiom")


# final_norm=False on a model whose final norm is not the identity (the tiny model's is)

def test_value_vector_projection_with_and_without_final_norm_by_hand(shaped_norm_model_dir):
    """final_norm=True ranks tokens by v * (1 + w_final) @ E^T, final_norm=False by v @ E^T (E: the
    tied unembedding, from the HF weights). Fails if final_norm is ignored or the weight is mis-divided."""
    from transformers import AutoModelForCausalLM

    model = load_model(str(shaped_norm_model_dir), mode="compat", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(shaped_norm_model_dir)).eval()
    scale = 1.0 + hf.model.norm.weight.detach()  # Gemma RMSNorm multiplies by (1 + w)
    unembed = hf.lm_head.weight.detach()  # [vocab, d_model]
    decode = model.tokenizer.decode
    differ = 0
    for layer, neuron in [(0, 3), (1, 7), (2, 11)]:
        v = hf.model.layers[layer].mlp.down_proj.weight.detach()[:, neuron]
        v = v * (1.0 + hf.model.layers[layer].post_feedforward_layernorm.weight.detach())
        with_norm = [decode([i]) for i in ((v * scale) @ unembed.T).topk(4).indices.tolist()]
        bare = [decode([i]) for i in (v @ unembed.T).topk(4).indices.tolist()]
        assert list(promoted_tokens_of(model, [(layer, neuron)], k=4)[(layer, neuron, 1)]) == with_norm
        assert list(promoted_tokens_of(model, [(layer, neuron)], k=4, final_norm=False)[(layer, neuron, 1)]) == bare
        differ += with_norm != bare
    assert differ > 0  # the shaped norm changes the reading, so the two paths are told apart
