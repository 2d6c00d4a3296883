"""Neuron knockouts, layer skipping, activation patching and causal tracing on a BERT masked LM,
cell by cell against a plain Hugging Face `BertForMaskedLM` forward with the same intervention
made by PyTorch hooks on its own modules: no bridge, no runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions, SkipOptions, knockout_grid, skip_layers
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.vocab import valid_mask

K = 5


def _probs_at_mask(hf_bert, bert, toks, handles=()) -> torch.Tensor:
    try:
        with torch.no_grad():
            logits = hf_bert(torch.tensor([toks.input_ids])).logits[0, len(toks.prompt_ids) - 1]
    finally:
        for h in handles:
            h.remove()
    return logits.masked_fill(~valid_mask(bert), torch.finfo(logits.dtype).min).softmax(-1)


def _zero(hf_bert, layer: int, neurons: torch.Tensor | None, positions: slice):
    """A hook on layer `layer`'s GELU output (`intermediate`, what `mlp.hook_post` reads) zeroing
    `neurons` (None: all) at `positions`."""
    def hook(module, args, out):
        out = out.clone()
        cols = slice(None) if neurons is None else neurons
        view = out[:, positions]
        view[..., cols] = 0.0
        out[:, positions] = view
        return out
    return hf_bert.bert.encoder.layer[layer].intermediate.register_forward_hook(hook)


@pytest.mark.parametrize("positions", ["all", "last"])
def test_knockouts_equal_zeroed_neurons_in_a_plain_forward(bert, hf_bert, probes, positions):
    sample = probes[:4]
    grid = KnockoutGrid(ks=(K,), windows=(1,), modes=("zero_top",), keep_top_ks=None, keep_top_windows=None)
    result = knockout_grid(bert, sample, KnockoutOptions(grid=grid, controls=("whole_mlp",), positions=positions,
                                                        rank_by="magnitude", norm="live"))
    rows = result.rows
    w_out_norms = [hf_bert.bert.encoder.layer[l].output.dense.weight.norm(dim=0) for l in range(bert.n_layers)]
    for probe, toks in zip(sample, tokenize_probes(bert, sample)):
        mask_at = len(toks.prompt_ids) - 1
        where = slice(None) if positions == "all" else slice(mask_at, mask_at + 1)
        acts: dict[int, torch.Tensor] = {}
        handles = [hf_bert.bert.encoder.layer[l].intermediate.register_forward_hook(
            lambda m, a, out, l=l, acts=acts, at=mask_at: acts.__setitem__(l, out[0, at].detach()))
            for l in range(bert.n_layers)]
        clean = _probs_at_mask(hf_bert, bert, toks, handles)
        pred = int(clean.argmax())
        for layer in range(bert.n_layers):
            top = (acts[layer].abs() * w_out_norms[layer]).argsort(descending=True)[:K]  # the authors' ranking
            for control, neurons in (("targeted", top), ("whole_mlp", None)):
                knocked = _probs_at_mask(hf_bert, bert, toks, [_zero(hf_bert, layer, neurons, where)])
                row = rows[(rows["probe_id"] == probe.id) & (rows["start"] == layer) & (rows["control"] == control)]
                assert len(row) == 1
                assert row["prob_of_clean_pred"].iloc[0] == pytest.approx(float(knocked[pred]), rel=1e-4, abs=1e-7)
                assert bool(row["changed"].iloc[0]) == (int(knocked.argmax()) != pred)


def test_layer_skipping_equals_a_layer_passed_through(bert, hf_bert, probes):
    sample = probes[:3]
    result = skip_layers(bert, sample, SkipOptions(windows=(1,), positions="all"))
    for probe, toks in zip(sample, tokenize_probes(bert, sample)):
        pred = int(_probs_at_mask(hf_bert, bert, toks).argmax())
        for layer in range(bert.n_layers):
            module = hf_bert.bert.encoder.layer[layer]
            handle = module.register_forward_hook(lambda m, args, out: (args[0], *out[1:]) if isinstance(out, tuple)
                                                  else args[0])
            skipped = _probs_at_mask(hf_bert, bert, toks, [handle])
            row = result.rows[(result.rows["probe_id"] == probe.id) & (result.rows["start"] == layer)]
            assert row["prob_of_clean_pred"].iloc[0] == pytest.approx(float(skipped[pred]), rel=1e-4, abs=1e-7)


def _pair(bert, probes):
    """A clean prompt and the same with its second token swapped for another word's ([CLS] kept)."""
    toks = tokenize_probes(bert, probes[:1])[0]
    other = tokenize_probes(bert, probes[1:2])[0]
    corrupted = list(toks.prompt_ids)
    corrupted[1] = next(t for t in other.prompt_ids[1:-1] if t != corrupted[1])
    return toks, tuple(corrupted)


def _hf_module(hf_bert, site: str, layer: int):
    """The Hugging Face module whose output (or input, for resid_pre) the bridge's site is."""
    block = hf_bert.bert.encoder.layer[layer]
    return {"resid_pre": block, "attn_out": block.attention, "mlp_out": block.output.dense}[site]


def _hf_run(hf_bert, ids, suffix, *, site=None, layer=None, pos=None, value=None, keep=None, grad=False):
    """Logits at the read position of one plain forward; optionally writes `value` at (site, layer,
    pos) and/or keeps that site's activation (with its gradient when `grad`)."""
    handles = []
    if site is not None:
        module = _hf_module(hf_bert, site, layer)
        if site == "resid_pre":
            def pre(m, args, kwargs):
                x = args[0].clone() if args else kwargs["hidden_states"].clone()
                if value is not None:
                    x[0, pos] = value
                if grad:
                    x.requires_grad_(True)
                    x.retain_grad()
                if keep is not None:
                    keep["x"] = x
                return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(m, args, out):
                x = (out[0] if isinstance(out, tuple) else out).clone()
                if value is not None:
                    x[0, pos] = value
                if grad:
                    x.retain_grad()
                if keep is not None:
                    keep["x"] = x
                return (x, *out[1:]) if isinstance(out, tuple) else x
            handles.append(module.register_forward_hook(post))
    try:
        with torch.set_grad_enabled(grad):
            logits = hf_bert(torch.tensor([[*ids, *suffix]])).logits[0, len(ids) - 1]
    finally:
        for h in handles:
            h.remove()
    return logits


@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "mlp_out"])
def test_exact_and_attribution_patching_equal_a_plain_forward(bert, hf_bert, probes, site):
    from idiom_lens.analyses.interventions import patch_pair
    from idiom_lens.analyses.interventions.attribution_patching import attribution_patch_pair

    toks, corrupted = _pair(bert, probes)
    suffix, target = toks.suffix_ids, toks.target_id
    exact = patch_pair(bert, clean_ids=toks.prompt_ids, corrupted_ids=corrupted, target_id=target, sites=(site,),
                       suffix_ids=suffix)
    approx = attribution_patch_pair(bert, clean_ids=toks.prompt_ids, corrupted_ids=corrupted, target_id=target,
                                    sites=(site,), suffix_ids=suffix)
    for layer in range(bert.n_layers):
        clean_act: dict = {}
        _hf_run(hf_bert, toks.prompt_ids, suffix, site=site, layer=layer, keep=clean_act)
        corr: dict = {}
        corr_logit = _hf_run(hf_bert, corrupted, suffix, site=site, layer=layer, keep=corr, grad=True)[target]
        corr_logit.backward()
        for pos in range(len(corrupted)):
            value = clean_act["x"][0, pos].detach()
            patched = _hf_run(hf_bert, corrupted, suffix, site=site, layer=layer, pos=pos, value=value)[target]
            assert float(exact.patched[0, layer, pos]) == pytest.approx(float(patched), rel=1e-4, abs=1e-5)
            estimate = corr_logit + ((value - corr["x"][0, pos].detach()) * corr["x"].grad[0, pos]).sum()
            assert float(approx.patched[0, layer, pos]) == pytest.approx(float(estimate.detach()), rel=1e-4, abs=1e-4)


def test_causal_tracing_equals_noise_and_restoration_in_a_plain_forward(bert, hf_bert, probes):
    """Every restored cell (resid, mlp, attn; windows of one layer; every position, none skipped:
    attention goes both ways) against a plain forward with the noise added to the embeddings'
    output and the clean activation written back, per noise sample."""
    from idiom_lens.analyses.interventions import TracingOptions, causal_trace
    from idiom_lens.analyses.interventions.noise_designs import noise_scale, trace_noise

    probe = next(p for p in probes if len(p.prompt.split()) >= 3)
    options = TracingOptions(windows=(1,), noise_samples=2)
    result = causal_trace(bert, [probe], options)
    toks = tokenize_probes(bert, [probe])[0]
    sigma = noise_scale(bert, multiplier=options.multiplier).sigma
    noised = [p for p in range(1, len(toks.prompt_ids) - 2)]  # every word token but the last: not [CLS], not the mask
    rows = result.rows
    assert sorted(set(rows.loc[rows["noised"], "pos"])) == noised
    assert sorted(set(rows["pos"])) == list(range(len(toks.prompt_ids)))  # every position, [CLS] included
    noise = trace_noise(probe.id, seed=0, samples=2, n_positions=len(noised), d_model=bert.d_model, sigma=sigma)
    ids = torch.tensor([toks.input_ids])
    at = len(toks.prompt_ids) - 1
    layers = hf_bert.bert.encoder.layer
    modules = {"resid": lambda l: layers[l], "mlp": lambda l: layers[l].output.dense,
               "attn": lambda l: layers[l].attention}

    def run(sample=None, site=None, layer=None, pos=None, value=None, keep=None):
        handles = []
        if sample is not None:
            def add(m, a, out):
                out = out.clone()
                out[0, noised] += noise[sample]
                return out
            handles.append(hf_bert.bert.embeddings.register_forward_hook(add))
        if site is not None:
            def put(m, a, out):
                x = (out[0] if isinstance(out, tuple) else out).clone()
                if keep is not None:
                    keep[(site, layer)] = x[0].detach().clone()
                if value is not None:
                    x[0, pos] = value
                return (x, *out[1:]) if isinstance(out, tuple) else x
            handles.append(modules[site](layer).register_forward_hook(put))
        try:
            with torch.no_grad():
                logits = hf_bert(ids).logits[0, at]
        finally:
            for h in handles:
                h.remove()
        return logits.masked_fill(~valid_mask(bert), torch.finfo(logits.dtype).min).softmax(-1)

    clean = run()
    pred = int(clean.argmax())
    assert result.probes["clean_prob"].iloc[0] == pytest.approx(float(clean[pred]), rel=1e-4)
    corrupted = np.mean([float(run(sample=s)[pred]) for s in range(2)])
    assert result.probes["corrupted_prob"].iloc[0] == pytest.approx(corrupted, rel=1e-4, abs=1e-6)
    for site in ("resid", "mlp", "attn"):
        for layer in range(bert.n_layers):
            kept: dict = {}
            run(site=site, layer=layer, keep=kept)
            for pos in range(len(toks.prompt_ids)):
                value = kept[(site, layer)][pos]
                expected = np.mean([float(run(sample=s, site=site, layer=layer, pos=pos, value=value)[pred])
                                    for s in range(2)])
                row = rows[(rows["site"] == site) & (rows["layer"] == layer) & (rows["pos"] == pos)]
                assert len(row) == 1
                assert row["prob"].iloc[0] == pytest.approx(expected, rel=1e-4, abs=1e-6), (site, layer, pos)
