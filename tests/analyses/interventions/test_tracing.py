"""Causal tracing: the batched, resumed fast path against a naive loop of full Hugging Face
forwards, the invariants (zero noise, restoring the whole last layer), restoring the key positions
only, the noise designs, and the summaries (restored share) on a result built by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from tolerances import logit_scale, prob_atol, probes_prob_atol, sum_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import TracingOptions
from idiom_lens.analyses.interventions.tracing import (
    TracingResult,
    causal_trace,
    key_positions,
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


@pytest.fixture(scope="module", params=["gemma3", "llama", "gpt2"])
def arch(request, tiny_model_dir, tiny_llama_dir, tiny_gpt2_dir):
    path = {"gemma3": tiny_model_dir, "llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]
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
    whole = trace_prompt(model, ids, noised=noised, noise=noise, specs=SPECS, batch_size=16, reuse_kv=False)
    torch.testing.assert_close(fast.restored, whole.restored, atol=1e-6, rtol=0)  # the speed-up's "before"
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


# --------------------------------------------------------------------------------------
# Restoring the key positions only
# --------------------------------------------------------------------------------------


def test_key_positions_are_the_last_noised_and_the_last_token():
    assert key_positions((1, 2, 3), 6) == (3, 5)
    assert key_positions((1, 3), 6) == (3, 5)
    assert key_positions((2, 4), 5) == (4,)  # the last token itself noised: one position


def test_key_positions_equal_the_cells_of_a_full_run(tiny_model, probes):
    """Every cell of a positions="key" run equals the same cell of the positions="all" run (other
    batches: fp32), and the key run has the last noised and the last token only."""
    options = TracingOptions(sites=("resid", "mlp", "attn"), windows=(1, 2), noise_samples=2)
    chosen = probes[:3]
    scale = noise_scale(tiny_model, ["the cat sat on the mat"])
    full = causal_trace(tiny_model, chosen, options, scale=scale, batch_size=64)
    key = causal_trace(tiny_model, chosen, dataclasses.replace(options, positions="key"), scale=scale, batch_size=64)
    cell = ["probe_id", "site", "window", "layer", "pos"]
    both = key.rows.merge(full.rows, on=cell, suffixes=("_key", "_all"), how="left", validate="one_to_one")
    assert both["prob_all"].notna().all()
    atol = probes_prob_atol(tiny_model, chosen)
    np.testing.assert_allclose(both["prob_key"], both["prob_all"], atol=atol, rtol=0)
    np.testing.assert_allclose(both["ie_key"], both["ie_all"], atol=atol, rtol=0)
    assert (both["position_key"] == both["position_all"]).all() and (both["token_key"] == both["token_all"]).all()
    for _, probe in key.probes.iterrows():
        got = set(key.rows.loc[key.rows["probe_id"] == probe["probe_id"], "pos"])
        assert got == {probe["noised_last"], probe["n_tokens"] - 1}
    n_cells = len(full.settings["specs"]) * tiny_model.n_layers * 2
    assert len(key.rows) == n_cells * len(chosen) < len(full.rows)
    assert key.probes[["corrupted_prob", "total_effect"]].equals(full.probes[["corrupted_prob", "total_effect"]])
    # the summaries hold the two classes the recall profile reads, equal to the full run's
    key_summary, full_summary = key.summary(), full.summary()
    assert set(key_summary["position"]) == {"last noised", "last"}
    at = full_summary[full_summary["position"].isin(["last noised", "last"])].reset_index(drop=True)
    np.testing.assert_allclose(key_summary["aie"], at["aie"], atol=atol, rtol=0)
    assert set(key.restored_share()["position"]) == {"last noised", "last"}
    assert key.settings["restored_positions"] == "the last noised token and the last token"


# --------------------------------------------------------------------------------------
# Noise designs in tracing
# --------------------------------------------------------------------------------------


def test_all_but_last_two_noises_the_words_but_the_last_two(tiny_model, probes):
    chosen = [p for p in probes if len(p.prompt.split()) >= 3][:2]
    options = TracingOptions(sites=("resid",), noise_samples=2, positions="key")
    scale = noise_scale(tiny_model, ["the cat sat on the mat"])
    design = causal_trace(tiny_model, chosen, dataclasses.replace(options, noise_design="all_but_last_two"),
                          scale=scale)
    words = causal_trace(tiny_model, chosen, dataclasses.replace(options, noise_words=(0, -2)), scale=scale)
    assert design.rows.equals(words.rows)
    tok = tiny_model.tokenizer
    for probe, (_, row) in zip(chosen, design.probes.iterrows()):
        span = word_positions(tok, probe.prompt, probe.target, (0, len(probe.prompt.split()) - 2))
        assert (row["noised_first"], row["noised_last"], row["n_noised"]) == (span[0], span[-1], len(span))
    assert design.settings["noise_design"] == "all_but_last_two" and words.settings["noise_design"] == "words"
    assert "last two" in design.settings["noised"]


# --------------------------------------------------------------------------------------
# Summaries on a result built by hand
# --------------------------------------------------------------------------------------

# probe: (group, total effect, IE at the two "mid noised" positions at layer 0, IE at the last token
# at layer 0); layer 1 has half of each IE
HAND = {
    "a": ("memorized idioms", 0.5, (0.1, 0.3), 0.25),
    "b": ("memorized idioms", 0.1, (0.0, 0.1), 0.08),
    "c": ("memorized idioms", -0.02, (0.0, 0.02), 0.01),  # below any floor: nothing to restore
    "d": ("ordinary text", 0.2, (0.1, 0.1), 0.05),
    "e": ("ordinary text", 0.04, (0.02, 0.04), 0.03),
}


def _hand_result() -> TracingResult:
    rows, probe_rows = [], []
    for pid, (group, te, mid, last) in HAND.items():
        for layer, factor in ((0, 1.0), (1, 0.5)):
            for pos, position, ie in ((2, "mid noised", mid[0]), (3, "mid noised", mid[1]), (4, "last", last)):
                rows.append({"probe_id": pid, "site": "mlp", "window": 1, "layer": layer, "pos": pos,
                             "pos_from_end": pos - 5, "position": position, "ie": ie * factor})
        probe_rows.append({"probe_id": pid, "kind": "idiom" if group.startswith("memorized") else "text",
                           "group": group, "total_effect": te})
    return TracingResult(rows=pd.DataFrame(rows), probes=pd.DataFrame(probe_rows), settings={})


def _at(frame: pd.DataFrame, group: str, position: str, layer: int) -> pd.Series:
    row = frame[(frame["group"] == group) & (frame["position"] == position) & (frame["layer"] == layer)]
    assert len(row) == 1
    return row.iloc[0]


def test_restored_share_is_a_ratio_of_means_over_probes_above_the_floor():
    share = _hand_result().restored_share(min_total_effect=0.05, n_boot=1000, seed=0)
    assert share.attrs["min_total_effect"] == 0.05 and (share["min_total_effect"] == 0.05).all()
    last = _at(share, "memorized idioms", "last", 0)
    # c (TE -0.02) is dropped; (0.25 + 0.08) / 2 over (0.5 + 0.1) / 2 = 0.55, not the mean of the
    # ratios 0.5 and 0.8 (0.65)
    assert (last["n"], last["n_dropped"]) == (2, 1)
    assert last["ie_mean"] == pytest.approx(0.165) and last["te_mean"] == pytest.approx(0.3)
    assert last["share"] == pytest.approx(0.55)
    # two probes: the resamples are {a, a} (0.5), {b, b} (0.8) and {a, b} (0.55), each pair at
    # least a quarter of the time, so the 2.5% and 97.5% percentiles are 0.5 and 0.8
    assert last["share_low"] == pytest.approx(0.5) and last["share_high"] == pytest.approx(0.8)
    # positions of a class averaged within a probe first: (0.2 + 0.05) / 2 / 0.3
    assert _at(share, "memorized idioms", "mid noised", 0)["share"] == pytest.approx(0.125 / 0.3)
    assert _at(share, "memorized idioms", "last", 1)["share"] == pytest.approx(0.275)
    text = _at(share, "ordinary text", "last", 0)  # e (TE 0.04) below the floor: d alone, 0.05 / 0.2
    assert (text["n"], text["n_dropped"]) == (1, 1)
    assert text["share"] == text["share_low"] == text["share_high"] == pytest.approx(0.25)


def test_the_floor_is_a_parameter():
    result = _hand_result()
    high = result.restored_share(min_total_effect=0.2)
    assert (_at(high, "memorized idioms", "last", 0)[["n", "n_dropped"]] == [1, 2]).all()
    assert _at(high, "memorized idioms", "last", 0)["share"] == pytest.approx(0.5)
    assert _at(high, "ordinary text", "last", 0)["n"] == 1  # TE 0.2 reaches a floor of 0.2
    none = _at(result.restored_share(min_total_effect=0.6), "memorized idioms", "last", 0)
    assert (none["n"], none["n_dropped"]) == (0, 3) and math.isnan(none["share"]) and math.isnan(none["share_low"])
    with pytest.raises(InputError, match="min_total_effect"):
        result.restored_share(min_total_effect=0)


def test_per_probe_gives_every_probes_ratio():
    table = _hand_result().per_probe(min_total_effect=0.05)
    assert {"probe_id", "group", "site", "window", "layer", "position", "ie", "total_effect", "share",
            "kept"} <= set(table.columns)
    assert len(table) == len(HAND) * 2 * 2  # probes x layers x position classes
    row = table[(table["probe_id"] == "b") & (table["position"] == "mid noised") & (table["layer"] == 0)].iloc[0]
    assert row["ie"] == pytest.approx(0.05) and row["share"] == pytest.approx(0.5) and row["kept"]
    c = table[table["probe_id"] == "c"]
    assert c["share"].isna().all() and not c["kept"].any()  # TE <= 0: no share
    assert not table.loc[table["probe_id"] == "e", "kept"].any()


def test_summary_keeps_its_columns_and_adds_the_quartiles():
    summary = _hand_result().summary(n_boot=200)
    assert list(summary.columns[:9]) == ["group", "site", "window", "layer", "position", "n", "aie", "aie_low",
                                         "aie_high"]
    last = _at(summary, "memorized idioms", "last", 0)  # every probe counts here: 0.25, 0.08, 0.01
    assert last["n"] == 3 and last["aie"] == pytest.approx(0.34 / 3)
    assert last["aie_median"] == pytest.approx(0.08)
    assert last["aie_q25"] == pytest.approx(0.045) and last["aie_q75"] == pytest.approx(0.165)


def test_options_name_their_bad_values():
    with pytest.raises(InputError, match="noise design"):
        TracingOptions(noise_design="each_word")  # not one span: noise_effects only
    with pytest.raises(InputError, match="not both"):
        TracingOptions(noise_design="all_but_last_two", noise_words=(0, 2))
    with pytest.raises(InputError, match="positions"):
        TracingOptions(positions="last")


def test_wrong_reused_keys_stop_the_run(tiny_model, probes, monkeypatch):
    """The run-time check of the first probe compares a restored row that reuses the corrupted
    run's earlier keys and values with the same row run over the whole prompt: keys dropped by a
    faulty cache stop the run."""
    from idiom_lens.errors import FastPathError
    from idiom_lens.models import runners

    _, ids = _ids(tiny_model, probes)
    noised = tuple(range(1, len(ids) - 1))
    noise = trace_noise("p", seed=0, samples=2, n_positions=len(noised), d_model=tiny_model.d_model, sigma=2.0)
    monkeypatch.setattr(runners.PrefixKV, "update", lambda self, keys, values, layer_idx, *a, **k: (keys, values))
    with pytest.raises(FastPathError, match="earlier keys and values reused"):
        trace_prompt(tiny_model, ids, noised=noised, noise=noise, specs=SPECS, check="p")
