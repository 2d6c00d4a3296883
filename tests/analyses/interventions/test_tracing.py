"""Causal tracing: the batched, resumed fast path against a naive loop of full Hugging Face
forwards, and the invariants (zero noise, restoring the whole last layer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tolerances import logit_scale, prob_atol, sum_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import TracingOptions
from idiom_lens.analyses.interventions.tracing import (
    TracingResult,
    causal_trace,
    layer_window,
    noise_scale,
    trace_noise,
    trace_prompt,
    trace_specs,
    word_positions,
)
from idiom_lens.errors import InputError
from idiom_lens.models.loading import load_model
from idiom_lens.models.tokenization import split_probe
from idiom_lens.models.vocab import masked_token_ids
from tests.reference import load_hf_model, reference_causal_trace

SPECS = (("resid", 1), ("mlp", 1), ("attn", 1), ("mlp", 2), ("attn", 3))


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def arch(request, tiny_model_dir, tiny_llama_dir):
    path = tiny_model_dir if request.param == "gemma3" else tiny_llama_dir
    model = load_model(str(path), mode="raw", progress=False)
    return model, load_hf_model(str(path))


def _ids(model, probes):
    probe = next(p for p in probes if len(split_probe(model.tokenizer, p.prompt, p.target).prompt_ids) >= 5)
    return probe, split_probe(model.tokenizer, probe.prompt, probe.target).prompt_ids


def test_every_cell_equals_a_naive_full_forward(arch, probes):
    """Each (site, window, layer, position, sample): the batched, resumed rows equal one full
    Hugging Face forward with the noise on inputs_embeds and the clean activation hooked in."""
    model, hf = arch
    _, ids = _ids(model, probes)
    noised = tuple(range(1, len(ids) - 1))
    noise = trace_noise("p", seed=0, samples=3, n_positions=len(noised), d_model=model.d_model, sigma=2.0)
    fast = trace_prompt(model, ids, noised=noised, noise=noise, specs=SPECS, batch_size=16, check="p")
    slow = reference_causal_trace(hf, ids, noised=noised, noise=noise, specs=SPECS,
                                  masked_ids=masked_token_ids(model.tokenizer, model.d_vocab))
    assert fast.clean_pred_id == slow["pred"]
    # fp32: batched resumed rows vs one HF forward each; the final norm bounds every row's logits
    # by about the clean run's scale
    atol = prob_atol(model, logit_scale(model, ids))
    assert fast.clean_prob == pytest.approx(slow["clean_prob"], abs=atol)
    torch.testing.assert_close(fast.corrupted, slow["corrupted"], atol=atol, rtol=0)
    torch.testing.assert_close(fast.restored, slow["restored"], atol=atol, rtol=0)
    # the noise matters here, and restoration matters: otherwise the comparison above proves little
    assert (fast.corrupted - fast.clean_prob).abs().max() > 1e-3
    for si, spec in enumerate(SPECS):  # every site's restoration acts (a hook that never fires would not)
        assert fast.indirect_effect[si].abs().max() > 1e-3, spec


def test_restoring_the_whole_last_layer_gives_the_clean_output(tiny_model, probes):
    _, ids = _ids(tiny_model, probes)
    n = len(ids)
    noised = tuple(range(1, n - 1))
    noise = trace_noise("p", seed=1, samples=2, n_positions=len(noised), d_model=tiny_model.d_model, sigma=5.0)
    trace = trace_prompt(tiny_model, ids, noised=noised, noise=noise, specs=(("resid", 1),))
    last = tiny_model.n_layers - 1
    # the last token's residual after the last layer is all the unembedding reads
    torch.testing.assert_close(trace.restored[0, last, n - 1], torch.full((2,), trace.clean_prob),
                               atol=prob_atol(tiny_model, logit_scale(tiny_model, ids)), rtol=0)  # another batch: fp32
    assert (trace.corrupted - trace.clean_prob).abs().max() > 1e-3


def test_zero_noise_gives_zero_effect(tiny_model, probes):
    _, ids = _ids(tiny_model, probes)
    noised = tuple(range(1, len(ids) - 1))
    noise = torch.zeros(2, len(noised), tiny_model.d_model)
    trace = trace_prompt(tiny_model, ids, noised=noised, noise=noise, specs=SPECS)
    atol = prob_atol(tiny_model, logit_scale(tiny_model, ids))  # the clean run in other batch shapes: fp32 noise
    assert trace.indirect_effect.abs().max() < atol
    torch.testing.assert_close(trace.corrupted, torch.full((2,), trace.clean_prob), atol=atol, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_batch_size_does_not_change_the_result(tiny_model, probes, batch_size):
    _, ids = _ids(tiny_model, probes)
    noised = tuple(range(1, len(ids) - 1))
    noise = trace_noise("q", seed=0, samples=3, n_positions=len(noised), d_model=tiny_model.d_model, sigma=3.0)
    base = trace_prompt(tiny_model, ids, noised=noised, noise=noise, specs=SPECS, batch_size=64)
    other = trace_prompt(tiny_model, ids, noised=noised, noise=noise, specs=SPECS, batch_size=batch_size)
    torch.testing.assert_close(other.restored, base.restored,
                               atol=prob_atol(tiny_model, logit_scale(tiny_model, ids)), rtol=0)  # fp32: batch shapes


def test_probe_set_result_is_seeded_saved_and_summarised(tiny_model, probes, tmp_path):
    options = TracingOptions(sites=("resid", "mlp"), windows=(1, 2), noise_samples=2)
    a = causal_trace(tiny_model, probes[:3], options, batch_size=64)
    b = causal_trace(tiny_model, probes[:3], options, batch_size=64)
    c = causal_trace(tiny_model, probes[:3], dataclasses.replace(options, seed=1), batch_size=64)
    assert a.rows.equals(b.rows)
    assert not a.rows["prob"].equals(c.rows["prob"])
    assert a.settings["noise_sigma"] == pytest.approx(3 * a.settings["noise_std_embeddings"])  # one float product
    assert a.settings["noise_std_tokens"] > 100
    assert set(a.rows["site"]) == {"resid", "mlp"} and set(a.rows["window"]) == {1, 2}
    # cells before the first noised token were not run: their effect is 0 by construction
    assert (a.rows.loc[a.rows["position"] == "before", "ie"] == 0).all()
    a.save(tmp_path)
    again = TracingResult.load(tmp_path)
    assert again.rows.equals(a.rows) and again.settings == a.settings
    summary = a.summary()
    assert {"group", "site", "window", "layer", "position", "n", "aie", "aie_low", "aie_high"} <= set(summary.columns)
    assert (summary["aie_low"] <= summary["aie"] + 1e-12).all()
    assert (summary["aie"] <= summary["aie_high"] + 1e-12).all()
    heat = a.heatmap(site="resid", window=1)
    assert heat.shape == (tiny_model.n_layers, a.rows["pos_from_end"].nunique())


def test_noise_scale_is_measured_after_the_embedding_scale(tiny_model):
    """Gemma multiplies its embeddings by sqrt(d_model): the std must be that of the scaled ones."""
    scale = noise_scale(tiny_model, ["the cat sat on the mat", "a walked book"], multiplier=3.0)
    ids = [i for t in ["the cat sat on the mat", "a walked book"]
           for i in split_probe(tiny_model.tokenizer, t, "x").prompt_ids[1:]]
    raw = tiny_model.bridge.original_model.model.embed_tokens.weight[ids].detach()
    scaled = raw * tiny_model.d_model ** 0.5
    # two fp32 variances of the same values, summed in other orders: relative error of a sum of
    # x^2 terms against its mean; the std's is half that
    squares = scaled.pow(2)
    rel = sum_atol(squares.numel(), float(squares.max() / squares.mean())) / 2
    assert scale.std == pytest.approx(float(scaled.std()), rel=max(rel, 1e-6))
    assert scale.sigma == pytest.approx(3 * scale.std)  # one float product


def test_word_span_selects_the_tokens_of_those_words(tiny_model):
    tok = tiny_model.tokenizer
    prompt, target = "the cat sat on the", "mat"
    ids = split_probe(tok, prompt, target).prompt_ids
    every = word_positions(tok, prompt, target, (0, 5))
    assert every == tuple(range(1, len(ids)))  # all but the BOS
    last_two = word_positions(tok, prompt, target, (-2, None))
    assert last_two[-1] == len(ids) - 1 and set(last_two) < set(every)


def test_windows_are_centered_and_clipped():
    assert layer_window(0, 10, 18) == tuple(range(0, 5))
    assert layer_window(9, 10, 18) == tuple(range(4, 14))
    assert layer_window(17, 10, 18) == tuple(range(12, 18))
    assert layer_window(5, 1, 18) == (5,)
    assert layer_window(5, 3, 18) == (4, 5, 6)


def test_bad_input_is_named(tiny_model, probes):
    with pytest.raises(InputError, match="sites"):
        trace_specs(("mlp", "embed"), (1,))
    with pytest.raises(InputError, match="windows"):
        trace_specs(("mlp",), (0,))
    with pytest.raises(InputError, match="samples"):
        causal_trace(tiny_model, probes[:1], TracingOptions(noise_samples=0))
    _, ids = _ids(tiny_model, probes)
    with pytest.raises(InputError, match="noise must have shape"):
        trace_prompt(tiny_model, ids, noised=(1, 2), noise=torch.zeros(2, 3, tiny_model.d_model), specs=SPECS)
    with pytest.raises(InputError, match="noised positions"):
        trace_prompt(tiny_model, ids, noised=(len(ids),), noise=torch.zeros(1, 1, tiny_model.d_model), specs=SPECS)
