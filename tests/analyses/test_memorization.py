"""Memorization: greedy next token vs target token, batched."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from records import memorization_of  # tests/records.py
from tolerances import logit_atol, prob_atol, probes_prob_atol, rank_slack  # tests/tolerances.py

from idiom_lens.analyses.memorization import (
    MemorizationRecord,
    MemorizationResult,
    is_function_token,
    probe_group,
    score_memorization,
)
from idiom_lens.datasets import load_probes
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.tokenization import split_probe
from idiom_lens.models.vocab import valid_mask

# The authors' published IdioMem format (compact JSON, JSON booleans); the file repeats the id of
# "dead as a doornail" for "dead as a dodo", which shares its prompt.
PUBLISHED_IDIOMEM = """\
{"idiom":"turn a blind eye","id":"b05e010ca3576fbf6e81","source":"LIdiom","prompt_comp_ind":false,"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}
{"idiom":"dead as a doornail","id":"b9bf3faa366ea862e771","source":"MAGPIE","prompt_comp_ind":false,"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}
{"idiom":"sick as a parrot","id":"b0117bc748d35fe2dc73","source":"MAGPIE","prompt_comp_ind":false,"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}
{"idiom":"dead as a dodo","id":"b9bf3faa366ea862e771","source":"MAGPIE","prompt_comp_ind":false,"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}
"""  # noqa: E501 (JSON Lines data, one record a line)


def test_records_match_a_direct_forward_pass(tiny_model, probes):
    result = score_memorization(tiny_model, probes, batch_size=4)
    assert [r.probe_id for r in result.records] == [p.id for p in probes]
    for probe, record in zip(probes, result.records):
        toks = split_probe(tiny_model.tokenizer, probe.prompt, probe.target)
        with torch.no_grad():
            logits = tiny_model.bridge(torch.tensor([toks.prompt_ids]))[0, -1]
        logits = torch.where(valid_mask(tiny_model), logits, -torch.inf)  # real vocabulary tokens only
        probs = logits.softmax(-1)
        # a batched forward vs this one: fp32 noise; an argmax or rank may move only across a near tie
        tie = logit_atol(tiny_model, logits[logits.isfinite()])
        assert record.pred_id == int(logits.argmax()) or float(logits.max() - logits[record.pred_id]) <= tie
        assert record.target_id == toks.target_id
        assert record.memorized == (record.pred_id == record.target_id)
        assert (abs(record.target_rank - int((logits > logits[toks.target_id]).sum()))
                <= rank_slack(logits, toks.target_id, 2 * tie))
        assert record.target_prob == pytest.approx(float(probs[toks.target_id]),
                                                   abs=prob_atol(tiny_model, logits[logits.isfinite()]))
        assert record.group == probe_group(probe.kind, record.memorized)


def test_batch_size_does_not_change_results(tiny_model, probes):
    one = score_memorization(tiny_model, probes, batch_size=1).to_dataframe()
    many = score_memorization(tiny_model, probes, batch_size=32).to_dataframe()
    assert (one["pred_id"] == many["pred_id"]).all()
    assert (one["target_rank"] == many["target_rank"]).all()
    assert (one["target_prob"] - many["target_prob"]).abs().max() < probes_prob_atol(tiny_model, probes)  # fp32 noise


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


def test_summary_counts_probes_that_are_not_single_target(tiny_model, tmp_path: Path):
    path = tmp_path / "idiomem.jsonl"
    path.write_text(PUBLISHED_IDIOMEM, encoding="utf-8")
    with pytest.warns(UserWarning, match="renamed 1 repeated id"):
        probes = load_probes(path)
    result = score_memorization(tiny_model, probes)
    assert [r.single_target for r in result.records] == [True, False, True, False]
    summary = result.summary()
    assert list(summary.columns) == [  # existing columns first and unchanged; the new one last
        "kind", "subset", "n", "memorized", "fraction", "full_target_match", "n_not_single_target"]
    everything = summary[summary.subset == "all"].iloc[0]
    hard = summary[summary.subset == "hard_to_guess"].iloc[0]
    assert (everything.kind, everything.n, everything.n_not_single_target) == ("idiom", 4, 2)
    assert (hard.n, hard.n_not_single_target) == (2, 0)  # the pair is never hard_to_guess


def test_records_saved_before_single_target_still_load():
    """`load_trajectory` rebuilds records from saved columns: an older file has no single_target."""
    fields = [f for f in MemorizationRecord.__dataclass_fields__ if f != "single_target"]
    record = MemorizationRecord(**{f: 0 for f in fields})
    assert record.single_target is None


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
        for i, (p, t) in enumerate([("once in a blue", "moon"), ("turn a blind", "eye"),
                                    ("kill two birds with one", "stone")])
    ]
    result = score_memorization(embedded_model, probes)
    assert all(r.memorized for r in result.records)


def _fact(id_: str, source: str = "", hard: bool | None = True) -> Probe:
    return Probe(id=id_, prompt="p q", target="t", kind="fact", source=source, hard_to_guess=hard)


def test_by_relation_counts() -> None:
    probes = [
        _fact("fact-capital-a"), _fact("fact-capital-b", hard=False), _fact("fact-element-c"),
        _fact("mine", "notes"), Probe(id="i", prompt="once in a blue", target="moon", kind="idiom"),
    ]
    result = memorization_of(probes, {"fact-capital-a": True, "fact-capital-b": True, "fact-element-c": False,
                                      "mine": True, "i": True})
    table = result.by_relation(probes).set_index("relation")
    assert list(table.index) == ["capital", "element", "unknown", "all"]  # idioms are ignored
    columns = ["n", "memorized", "n_hard_to_guess", "memorized_hard_to_guess"]
    assert table.loc["capital", columns].tolist() == [2, 2, 1, 1]
    assert table.loc["capital", "fraction"] == 1.0 and table.loc["element", "fraction"] == 0.0
    assert table.loc["all", ["n", "memorized"]].tolist() == [4, 3]


def test_by_relation_takes_the_facts_alone_when_the_result_holds_other_kinds() -> None:
    facts = [_fact("fact-capital-a"), _fact("fact-element-c")]
    idiom = Probe(id="i", prompt="once in a blue", target="moon", kind="idiom")
    result = memorization_of([*facts, idiom], {"fact-capital-a": True, "fact-element-c": False, "i": True})
    assert result.by_relation(facts).equals(result.by_relation([*facts, idiom]))
    assert result.relation_baselines(facts).set_index("relation").loc["all", "n"] == 2


def test_by_relation_rejects_foreign_records() -> None:
    probes = [_fact("fact-capital-a")]
    result = memorization_of([*probes, _fact("fact-capital-z")], {"fact-capital-a": True, "fact-capital-z": False})
    with pytest.raises(InputError, match="fact.* not in the probe list"):
        result.by_relation(probes)


def test_by_relation_gives_wilson_intervals() -> None:
    probes = [_fact("fact-capital-a"), _fact("fact-capital-b", hard=False), _fact("fact-element-c")]
    result = memorization_of(probes, {"fact-capital-a": True, "fact-capital-b": False, "fact-element-c": False})
    table = result.by_relation(probes).set_index("relation")
    # Wilson 95% for 1 of 2, by hand: z = 1.959964, centre (0.5 + z^2/4) / (1 + z^2/2) = 0.5,
    # half z sqrt(0.125 + z^2/16) / (1 + z^2/2) = 0.4056
    assert table.loc["capital", "fraction_low"] == pytest.approx(0.0945, abs=1e-4)
    assert table.loc["capital", "fraction_high"] == pytest.approx(0.9055, abs=1e-4)
    assert table.loc["element", ["fraction_low", "fraction_hard_to_guess_low"]].tolist() == [0.0, 0.0]
    assert table.loc["capital", "fraction_hard_to_guess_high"] == 1.0  # 1 of 1 hard: exact upper bound


@pytest.mark.parametrize(
    "token, expected",
    [(" the", True), (" The", True), (" a", True), (" of", True), (" it's", True), ("'s", True), (",", True),
     (" 1990", True), ("\n", True), (" ", True), ("<eos>", True), (" Paris", False), (" Kab", False),
     ("English", False), (" Guinea-Bissau", False), (" théâtre", False)],
)
def test_function_tokens(token: str, expected: bool) -> None:
    assert is_function_token(token) is expected


def _scored(probe: Probe, pred_token: str) -> MemorizationRecord:
    """A record of `probe` whose prediction is `pred_token`: memorized when it is " " + target."""
    memorized = pred_token == f" {probe.target}"
    return MemorizationRecord(
        probe_id=probe.id, kind=probe.kind, group=probe_group(probe.kind, memorized), hard_to_guess=True,
        prompt=probe.prompt, target=probe.target, target_id=1, target_token=f" {probe.target}", n_target_tokens=1,
        pred_id=1 if memorized else 2, pred_token=pred_token, memorized=memorized, pred_prob=0.5,
        target_rank=0 if memorized else 1, target_prob=0.5, full_target_match=memorized)


def _language_facts() -> tuple[list[Probe], MemorizationResult]:
    """5 language facts ("English" x3, "French", "Thai"), 2 element facts, 1 idiom; predictions:
    language: English memorized twice, " the" once (English), " French" memorized, " Lao" (Thai);
    element: " iron" memorized, " a" (gold); idiom: " moon" memorized."""
    answers = [("lang-1", "English", " English"), ("lang-2", "English", " English"), ("lang-3", "English", " the"),
               ("lang-4", "French", " French"), ("lang-5", "Thai", " Lao")]
    probes = [Probe(id=f"fact-language-{i}", prompt="The official language of X is", target=t, kind="fact")
              for i, t, _ in answers]
    preds = [p for _, _, p in answers]
    probes += [Probe(id="fact-element-fe", prompt="The chemical element Fe is", target="iron", kind="fact"),
               Probe(id="fact-element-au", prompt="The chemical element Au is", target="gold", kind="fact"),
               Probe(id="idiom-1", prompt="once in a blue", target="moon", kind="idiom")]
    preds += [" iron", " a", " moon"]
    return probes, MemorizationResult(records=tuple(_scored(p, t) for p, t in zip(probes, preds)), settings={})


def test_pred_is_function_word_column_and_content_predictions() -> None:
    probes, result = _language_facts()
    frame = result.to_dataframe()
    assert list(frame.columns) == [*MemorizationRecord.__dataclass_fields__, "pred_is_function_word"]
    assert frame["pred_is_function_word"].tolist() == [False, False, True, False, False, False, True, False]
    content = result.content_predictions()
    assert content["probe_id"].tolist() == [p.id for p in probes if p.id not in ("fact-language-lang-3",
                                                                                  "fact-element-au")]
    # the derived column does not stop a saved table from loading
    again = MemorizationResult.from_dataframe(frame, {})
    assert again.records == result.records


def test_function_word_shares_per_group() -> None:
    _, result = _language_facts()
    table = result.function_word_shares().set_index("group")
    # non-memorized facts: lang-3 (" the"), lang-5 (" Lao"), element gold (" a"): 2 of 3
    assert table.loc["non-memorized facts", ["n", "n_function_word"]].tolist() == [3, 2]
    assert table.loc["non-memorized facts", "share"] == pytest.approx(2 / 3)
    assert table.loc["memorized facts", ["n", "n_function_word", "share"]].tolist() == [4, 0, 0.0]
    assert table.loc["memorized facts", "share_low"] == 0.0 and table.loc["memorized idioms", "share"] == 0.0
    assert 0 < table.loc["non-memorized facts", "share_low"] < 2 / 3 < table.loc["non-memorized facts", "share_high"]


def test_relation_baselines_by_hand() -> None:
    probes, result = _language_facts()
    table = result.relation_baselines(probes).set_index("relation")
    assert list(table.index) == ["language", "element", "all"]
    lang = table.loc["language"]
    assert (lang.n, lang.majority_target, lang.majority_count) == (5, "English", 3)
    assert lang.majority_share == pytest.approx(0.6)  # always answering "English": 3 of 5
    assert (lang.memorized, lang.fraction) == (3, pytest.approx(0.6))  # English x2, French
    # within content-word predictions: lang-3 (" the") left out: 3 of 4
    assert (lang.n_function_word, lang.n_content, lang.memorized_content) == (1, 4, 3)
    assert lang.fraction_content == pytest.approx(0.75)
    # Wilson 95% of 3 of 5 by hand: centre (0.6 + z^2/10) / (1 + z^2/5) = 0.5657,
    # half z sqrt(0.048 + z^2/100) / (1 + z^2/5) = 0.3188
    assert (lang.majority_share_low, lang.majority_share_high) == (pytest.approx(0.2307, abs=1e-4),
                                                                  pytest.approx(0.8824, abs=1e-4))
    assert (lang.fraction_low, lang.fraction_high) == (lang.majority_share_low, lang.majority_share_high)
    element = table.loc["element"]
    # a tie (iron, gold once each): the first in sorted order, a share of 1 in 2
    assert (element.majority_target, element.majority_count, element.majority_share) == ("gold", 1, 0.5)
    assert (element.n_content, element.memorized_content, element.fraction_content) == (1, 1, 1.0)
    everything = table.loc["all"]
    assert pd.isna(everything.majority_target)
    assert (everything.n, everything.majority_count, everything.memorized) == (7, 4, 4)
    assert everything.majority_share == pytest.approx(4 / 7)
    assert (everything.n_content, everything.memorized_content) == (5, 4)
    with pytest.raises(InputError, match="fact.* not in the probe list"):
        result.relation_baselines(probes[:3])
