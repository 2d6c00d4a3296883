"""A BERT masked LM, read at a [MASK] in place of the last word: loading, tokenization, memorization
and the logit-lens trajectory through the MLM head, each checked against a plain Hugging Face
forward of `BertForMaskedLM` (not the bridge); the analyses built for causal LMs refuse it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.analyses.trajectory import layer_trajectory
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.vocab import valid_mask


def _hf_at_mask(hf_bert, bert, toks):
    """Every layer's hidden state at the mask through the MLM head (`cls`), plain Hugging Face:
    [n_layers, d_vocab] log-probabilities over real tokens; the last row is the model's output."""
    ids = torch.tensor([toks.input_ids])
    with torch.no_grad():
        out = hf_bert(ids, output_hidden_states=True)
        at = len(toks.prompt_ids) - 1
        rows = torch.stack([hf_bert.cls(h[0, at]) for h in out.hidden_states[1:]])
        assert torch.allclose(rows[-1], out.logits[0, at], atol=1e-5)
    return rows.masked_fill(~valid_mask(bert), torch.finfo(rows.dtype).min).log_softmax(-1)


def test_only_a_masked_lm_records_its_objective(tiny_model):
    """A causal LM's settings are those it had before masked LMs loaded: every resumable stage's key
    holds them, and a new key would redo every earlier run."""
    assert tiny_model.objective == "causal" and "objective" not in tiny_model.settings()


def test_a_bert_directory_loads_as_a_masked_lm(bert):
    assert bert.masked and bert.objective == "masked"
    assert bert.settings()["objective"] == "masked"
    assert not bert.prepend_bos
    mask = valid_mask(bert)
    for token in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"):
        assert not mask[bert.tokenizer.convert_tokens_to_ids(token)], token


def test_the_last_word_becomes_one_mask_between_the_prompt_and_sep(bert, probes):
    tok = bert.tokenizer
    for probe, toks in zip(probes, tokenize_probes(bert, probes)):
        whole = tok(f"{probe.prompt} {probe.target}").input_ids
        assert toks.prompt_ids[0] == tok.cls_token_id and toks.prompt_ids[-1] == tok.mask_token_id
        assert toks.suffix_ids == (tok.sep_token_id,)
        assert list(toks.prompt_ids[:-1]) + list(toks.target_ids) + list(toks.suffix_ids) == whole
        assert tok.decode(list(toks.target_ids)).replace(" ", "") == probe.target.lower()
        assert toks.input_ids == toks.prompt_ids + toks.suffix_ids


def test_memorization_is_the_top_token_at_the_mask(bert, hf_bert, probes):
    result = score_memorization(bert, probes, batch_size=4)
    for record, toks in zip(result.records, tokenize_probes(bert, probes)):
        plain = _hf_at_mask(hf_bert, bert, toks)[-1]
        assert record.pred_id == int(plain.argmax())
        assert record.memorized == (record.pred_id == toks.target_id)
        assert record.target_prob == pytest.approx(float(plain[toks.target_id].exp()), rel=1e-4, abs=1e-7)


def test_every_layer_is_read_through_the_mlm_head(bert, hf_bert, probes):
    result = layer_trajectory(bert, probes, sites=("resid_post",), batch_size=4)
    for i, toks in enumerate(tokenize_probes(bert, probes)):
        plain = _hf_at_mask(hf_bert, bert, toks)
        pred = result.memorization.records[i].pred_id
        np.testing.assert_allclose(result.pred_prob[i, 0], plain[:, pred].exp().numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(result.target_prob[i, 0], plain[:, toks.target_id].exp().numpy(),
                                   rtol=1e-4, atol=1e-7)
        assert result.top_id[i, 0].tolist() == plain.argmax(-1).tolist()
    assert result.pred_rank[:, 0, -1].max() == 0  # the last layer is the model's own output


def test_batched_equals_unbatched_without_padding(bert, probes):
    one = layer_trajectory(bert, probes, sites=("resid_post",), batch_size=1)
    many = layer_trajectory(bert, probes, sites=("resid_post",), batch_size=16)
    np.testing.assert_allclose(one.target_prob, many.target_prob, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(one.top_id, many.top_id)


def test_what_a_masked_lm_cannot_do_is_refused_with_the_reason(bert, probes):
    from idiom_lens.analyses.interventions import AttentionKnockoutOptions, KnockoutOptions, knockout_grid
    from idiom_lens.analyses.interventions.attention_knockouts import attention_knockout

    with pytest.raises(InputError, match="mean ablation .* is built for causal LMs.*masked LM"):
        knockout_grid(bert, probes[:2], KnockoutOptions(ablation="mean"))
    with pytest.raises(InputError, match="the attention knockout is built for causal LMs"):
        attention_knockout(bert, probes[:2], AttentionKnockoutOptions())
    with pytest.raises(InputError, match="resid_post"):
        layer_trajectory(bert, probes, sites=("resid_mid",))
