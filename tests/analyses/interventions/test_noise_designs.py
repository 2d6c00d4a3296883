"""Noise designs and noise effects: the batched rows against a naive loop of one Hugging Face
forward per noise sample, agreement with tracing's corrupted run, the spans each design noises,
and the summary on a result built by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tolerances import logit_atol, prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions.noise_designs import (
    NoiseEffectsResult,
    design_spans,
    noise_effects,
    noise_scale,
    trace_noise,
    word_positions,
)
from idiom_lens.analyses.interventions.tracing import TracingOptions, causal_trace
from idiom_lens.errors import InputError
from idiom_lens.models.loading import load_model
from idiom_lens.models.tokenization import split_probe
from idiom_lens.models.vocab import masked_token_ids
from tests.reference import load_hf_model

SAMPLES = 3


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def arch(request, tiny_model_dir, tiny_llama_dir):
    path = tiny_model_dir if request.param == "gemma3" else tiny_llama_dir
    model = load_model(str(path), mode="raw", progress=False)
    return model, load_hf_model(str(path))


@pytest.fixture(scope="module")
def scale(tiny_model):
    return noise_scale(tiny_model, ["the cat sat on the mat", "she walked to the market"])


def naive_noise_effects(hf, model, probe, *, design, sigma, seed=0):
    """One Hugging Face forward per (noised span, sample), the noise added to `inputs_embeds`
    (Gemma's embedding module applies its scale): per span, the list of (log p of the clean
    prediction, greedy prediction, top-2 logit gap) per sample, and the clean (log p, pred)."""
    tok = model.tokenizer
    ids = torch.tensor([list(split_probe(tok, probe.prompt, probe.target).prompt_ids)])
    masked = torch.tensor(masked_token_ids(tok, model.d_vocab), dtype=torch.long)

    def read(embeds):
        logits = hf(inputs_embeds=embeds).logits[0, -1].float().index_fill(0, masked, -torch.inf)
        top2 = logits.topk(2).values
        return logits.log_softmax(-1), int(logits.argmax()), float(top2[0] - top2[1]), float(logits[
            logits.isfinite()].abs().max())

    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        clean_logp, pred, _, largest = read(embeds)
        spans = {}
        for word, noised in design_spans(tok, probe.prompt, probe.target, design):
            noise = trace_noise(probe.id, seed=seed, samples=SAMPLES, n_positions=len(noised), d_model=model.d_model,
                                sigma=sigma)
            out = []
            for s in range(SAMPLES):
                x = embeds.clone()
                x[0, list(noised)] += noise[s]
                logp, top, gap, big = read(x)
                largest = max(largest, big)
                out.append((float(logp[pred]), top, gap))
            spans[word] = (noised, out)
    return {"clean_logp": float(clean_logp[pred]), "pred": pred, "spans": spans, "logit_scale": largest}


@pytest.mark.parametrize("design", ["all_but_last", "all_but_last_two", "each_word"])
def test_every_row_equals_a_naive_loop(arch, probes, design):
    model, hf = arch
    probe = next(p for p in probes if len(p.prompt.split()) >= 4)
    scale = noise_scale(model, ["the cat sat on the mat"], multiplier=2.0)
    result = noise_effects(model, [probe], designs=(design,), noise_samples=SAMPLES, scale=scale, batch_size=2)
    slow = naive_noise_effects(hf, model, probe, design=design, sigma=scale.sigma)
    atol = prob_atol(model, slow["logit_scale"])  # fp32: batched bridge rows vs one HF forward each
    rows = result.rows.set_index("word")
    assert list(rows.index) == list(slow["spans"])  # -1, or every word 0..n-1
    clean_prob = float(np.exp(slow["clean_logp"]))
    for word, (noised, samples) in slow["spans"].items():
        row = rows.loc[word]
        logp = np.array([s[0] for s in samples])
        assert row["noised"] == " ".join(map(str, noised)) and row["n_noised"] == len(noised)
        assert row["clean_prob"] == pytest.approx(clean_prob, abs=atol)
        assert row["corrupted_prob"] == pytest.approx(np.exp(logp).mean(), abs=atol)
        assert row["total_effect"] == pytest.approx(clean_prob - np.exp(logp).mean(), abs=2 * atol)
        assert row["logprob_change"] == pytest.approx((logp - slow["clean_logp"]).mean(), abs=2 * atol)
        # greedy predictions: equal, except where two logits are within fp32 noise of each other
        changed = [top != slow["pred"] for _, top, _ in samples]
        ties = sum(gap <= 2 * logit_atol(model, slow["logit_scale"]) for _, _, gap in samples)
        assert abs(row["pred_changed"] - np.mean(changed)) <= ties / SAMPLES
    # the noise matters here: otherwise the comparison above proves little
    assert (rows["total_effect"].abs() > 1e-3).any()
    assert result.probes.iloc[0]["clean_pred_token"] == model.tokenizer.decode([slow["pred"]])


def test_each_design_noises_its_span(tiny_model):
    tok = tiny_model.tokenizer
    prompt, target = "kill two birds with one", "stone"
    ids = split_probe(tok, prompt, target).prompt_ids
    (word, every), = design_spans(tok, prompt, target, "all_but_last")
    assert word == -1 and every == tuple(range(1, len(ids) - 1))  # tokens, not words: BOS and last kept
    (word, first_three), = design_spans(tok, prompt, target, "all_but_last_two")
    assert word == -1 and first_three == word_positions(tok, prompt, target, (0, 3))
    assert first_three[-1] < word_positions(tok, prompt, target, (3, 4))[0]  # "with" and "one" stay clean
    each = design_spans(tok, prompt, target, "each_word")
    assert [w for w, _ in each] == [0, 1, 2, 3, 4]
    covered = [p for _, span in each for p in span]
    assert covered == list(range(1, len(ids)))  # the words partition the tokens after the BOS


def test_the_all_but_last_row_is_tracings_corrupted_run(tiny_model, probes, scale):
    chosen = probes[:3]
    effects = noise_effects(tiny_model, chosen, designs=("all_but_last", "all_but_last_two"), noise_samples=2,
                            scale=scale)
    for design in ("all_but_last", "all_but_last_two"):
        trace = causal_trace(tiny_model, chosen, TracingOptions(sites=("resid",), noise_samples=2, positions="key",
                                                                noise_design=design), scale=scale)
        rows = effects.rows[effects.rows["design"] == design].set_index("probe_id")
        traced = trace.probes.set_index("probe_id")
        atol = prob_atol(tiny_model, 50.0)  # fp32: other batches and runners; tiny logits stay far below 50
        np.testing.assert_allclose(rows["corrupted_prob"], traced["corrupted_prob"], atol=atol, rtol=0)
        np.testing.assert_allclose(rows["total_effect"], traced["total_effect"], atol=2 * atol, rtol=0)
        assert (rows["n_noised"] == traced["n_noised"]).all()
    assert (effects.probes["group"] == trace.probes["group"]).all()


def test_result_is_seeded_saved_and_loaded(tiny_model, probes, scale, tmp_path):
    a = noise_effects(tiny_model, probes[:2], noise_samples=2, scale=scale)
    b = noise_effects(tiny_model, probes[:2], noise_samples=2, scale=scale, batch_size=1)
    c = noise_effects(tiny_model, probes[:2], noise_samples=2, scale=scale, seed=1)
    np.testing.assert_allclose(a.rows["corrupted_prob"], b.rows["corrupted_prob"], atol=prob_atol(tiny_model, 50.0),
                               rtol=0)  # batch size: speed only (fp32)
    assert not np.allclose(a.rows["corrupted_prob"], c.rows["corrupted_prob"])
    assert set(a.rows["design"]) == {"all_but_last", "all_but_last_two", "each_word"}
    words = a.rows[a.rows["design"] == "each_word"]
    assert (words["word_from_end"] == words["word"] - len(probes[0].prompt.split())).loc[
        words["probe_id"] == probes[0].id].all()
    assert a.rows.loc[a.rows["design"] != "each_word", "word_from_end"].isna().all()
    a.save(tmp_path)
    again = NoiseEffectsResult.load(tmp_path)
    assert again.rows.equals(a.rows) and again.probes.equals(a.probes) and again.settings == a.settings
    assert (tmp_path / "noise_effects_summary.parquet").is_file()


def test_bad_input_is_named(tiny_model, probes, scale):
    with pytest.raises(InputError, match="noise design"):
        noise_effects(tiny_model, probes[:1], designs=("every_other",), scale=scale)
    with pytest.raises(InputError, match="noise_samples"):
        noise_effects(tiny_model, probes[:1], noise_samples=0, scale=scale)
    short = [p for p in probes if len(p.prompt.split()) == 2][:1]  # "break the" -> "ice"
    with pytest.raises(InputError, match=f"probe '{short[0].id}', design all_but_last_two"):
        noise_effects(tiny_model, short, designs=("all_but_last_two",), scale=scale)


# --------------------------------------------------------------------------------------
# The summary on a result built by hand
# --------------------------------------------------------------------------------------

# probe: (group, n words, total effect of noising each word, of noising all but the last)
HAND = {
    "a": ("memorized idioms", 3, (0.1, 0.4, 0.2), 0.6),
    "b": ("memorized idioms", 3, (0.3, 0.0, 0.1), 0.5),
    "c": ("memorized idioms", 2, (0.05, 0.25), 0.2),
    "d": ("ordinary text", 2, (0.0, 0.1), 0.1),
}


def _hand_result() -> NoiseEffectsResult:
    rows, probe_rows = [], []
    for pid, (group, n, each, span) in HAND.items():
        rows.append({"probe_id": pid, "design": "all_but_last", "word": -1, "word_from_end": pd.NA,
                     "total_effect": span, "logprob_change": -10 * span, "pred_changed": 1.0})
        for w, te in enumerate(each):
            rows.append({"probe_id": pid, "design": "each_word", "word": w, "word_from_end": w - n,
                         "total_effect": te, "logprob_change": -10 * te, "pred_changed": float(te > 0.27)})
        probe_rows.append({"probe_id": pid, "kind": "idiom" if group.startswith("memorized") else "text",
                           "group": group})
    frame = pd.DataFrame(rows).astype({"word_from_end": "Int64"})
    return NoiseEffectsResult(rows=frame, probes=pd.DataFrame(probe_rows), settings={})


def _at(summary, group, design, unit, from_end=None):
    part = summary[(summary["group"] == group) & (summary["design"] == design) & (summary["unit"] == unit)]
    part = part[part["word_from_end"].isna()] if from_end is None else part[part["word_from_end"] == from_end]
    assert len(part) == 1
    return part.iloc[0]


def test_most_necessary_word_is_the_largest_total_effect():
    best = _hand_result().most_necessary().set_index("probe_id")
    assert best["word"].to_dict() == {"a": 1, "b": 0, "c": 1, "d": 1}
    assert best["total_effect"].to_dict() == pytest.approx({"a": 0.4, "b": 0.3, "c": 0.25, "d": 0.1})


def test_summary_per_design_word_and_most_necessary_word():
    summary = _hand_result().summary(n_boot=500)
    span = _at(summary, "memorized idioms", "all_but_last", "span")
    assert span["n"] == 3 and span["total_effect"] == pytest.approx(1.3 / 3)
    assert span["total_effect_median"] == pytest.approx(0.5)
    assert span["total_effect_low"] <= span["total_effect"] <= span["total_effect_high"]
    assert span["logprob_change"] == pytest.approx(-13 / 3) and span["pred_changed"] == 1.0
    last = _at(summary, "memorized idioms", "each_word", "word", -1)  # the last word: 0.2, 0.1, 0.25
    assert last["n"] == 3 and last["total_effect"] == pytest.approx(0.55 / 3)
    assert last["total_effect_median"] == pytest.approx(0.2)
    third = _at(summary, "memorized idioms", "each_word", "word", -3)  # only the 3-word prompts: 0.1, 0.3
    assert third["n"] == 2 and third["total_effect"] == pytest.approx(0.2)
    best = _at(summary, "memorized idioms", "each_word", "most necessary word")  # 0.4, 0.3, 0.25
    assert best["n"] == 3 and best["total_effect"] == pytest.approx(0.95 / 3)
    assert best["total_effect_median"] == pytest.approx(0.3)
    assert best["pred_changed"] == pytest.approx(2 / 3)  # 0.4 and 0.3 changed the prediction, 0.25 did not
    text = _at(summary, "ordinary text", "each_word", "most necessary word")
    assert text["n"] == 1 and text["total_effect"] == text["total_effect_low"] == pytest.approx(0.1)
    assert list(summary.columns[:5]) == ["group", "design", "unit", "word_from_end", "n"]
