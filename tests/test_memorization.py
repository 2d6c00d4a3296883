"""Memorization: greedy next token vs target token, batched."""

from __future__ import annotations

import pytest
import torch

from idiom_lens.datasets.probes import Probe
from idiom_lens.memorization import probe_group, score_memorization
from idiom_lens.tokenization import split_probe


def test_records_match_a_direct_forward_pass(tiny_model, probes):
    result = score_memorization(tiny_model, probes, batch_size=4)
    assert [r.probe_id for r in result.records] == [p.id for p in probes]
    for probe, record in zip(probes, result.records):
        toks = split_probe(tiny_model.tokenizer, probe.prompt, probe.target)
        with torch.no_grad():
            logits = tiny_model.bridge(torch.tensor([toks.prompt_ids]))[0, -1]
        probs = logits.softmax(-1)
        assert record.pred_id == int(logits.argmax())
        assert record.target_id == toks.target_id
        assert record.memorized == (record.pred_id == record.target_id)
        assert record.target_rank == int((logits > logits[toks.target_id]).sum())
        assert record.target_prob == pytest.approx(float(probs[toks.target_id]), abs=1e-6)
        assert record.group == probe_group(probe.kind, record.memorized)


def test_batch_size_does_not_change_results(tiny_model, probes):
    one = score_memorization(tiny_model, probes, batch_size=1).to_dataframe()
    many = score_memorization(tiny_model, probes, batch_size=32).to_dataframe()
    assert (one["pred_id"] == many["pred_id"]).all()
    assert (one["target_rank"] == many["target_rank"]).all()
    assert (one["target_prob"] - many["target_prob"]).abs().max() < 1e-5


def test_summary_counts_all_and_hard_to_guess(tiny_model, probes):
    result = score_memorization(tiny_model, probes)
    summary = result.summary()
    frame = result.to_dataframe()
    for kind in {p.kind for p in probes}:
        row = summary[(summary.kind == kind) & (summary.subset == "all")].iloc[0]
        sub = frame[frame.kind == kind]
        assert row.n == len(sub) and row.memorized == sub.memorized.sum()
        hard = summary[(summary.kind == kind) & (summary.subset == "hard_to_guess")].iloc[0]
        assert hard.n == (sub.hard_to_guess == True).sum()  # noqa: E712


def test_full_target_match_uses_every_sub_word(tiny_model):
    """A target the model continues token by token greedily is a full match; check by hand."""
    probe = Probe(id="x", prompt="the cat sat on the", target="xylophonequ", kind="text")
    record = score_memorization(tiny_model, [probe]).records[0]
    toks = split_probe(tiny_model.tokenizer, probe.prompt, probe.target)
    seq = torch.tensor([toks.prompt_ids + toks.target_ids])
    with torch.no_grad():
        greedy = tiny_model.bridge(seq)[0].argmax(-1).tolist()
    n = len(toks.prompt_ids)
    expected = greedy[n - 1 : n - 1 + len(toks.target_ids)] == list(toks.target_ids)
    assert record.full_target_match == expected
    assert record.n_target_tokens == len(toks.target_ids) > 1


def test_probe_groups():
    assert probe_group("idiom", True) == "memorized idioms"
    assert probe_group("fact", False) == "non-memorized facts"
    assert probe_group("text", True) == "ordinary text"


@pytest.mark.embedded
def test_embedded_memorizes_classic_idioms(embedded_model):
    probes = [
        Probe(id=str(i), prompt=p, target=t, kind="idiom")
        for i, (p, t) in enumerate([("once in a blue", "moon"), ("turn a blind", "eye"), ("kill two birds with one", "stone")])
    ]
    result = score_memorization(embedded_model, probes)
    assert all(r.memorized for r in result.records)
