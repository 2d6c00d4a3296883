"""The probe record and probe set: text, data frame, flag counts, concat."""

from __future__ import annotations

import pytest

from idiom_lens.datasets.probes import FLAG_NAMES, Probe, ProbeSet


def _probe(id_: str, text: str, **flags: bool | None) -> Probe:
    prompt, target = text.rsplit(" ", 1)
    return Probe(id=id_, prompt=prompt, target=target, kind="idiom", **flags)


def test_text_joins_prompt_and_target() -> None:
    assert _probe("a", "once in a blue moon").text == "once in a blue moon"


def test_probe_is_frozen() -> None:
    probe = _probe("a", "break the ice")
    with pytest.raises(AttributeError):
        probe.target = "water"  # type: ignore[misc]


def test_to_dataframe_columns_and_values() -> None:
    probes = ProbeSet("s", (_probe("a", "break the ice", hard_to_guess=True), _probe("b", "turn a blind eye")))
    frame = probes.to_dataframe()
    assert list(frame.columns) == [
        "id", "prompt", "target", "kind", "source", *FLAG_NAMES, "single_target", "text",
    ]
    assert frame["text"].tolist() == ["break the ice", "turn a blind eye"]
    assert frame["hard_to_guess"].tolist() == [True, None]


def test_flag_counts_count_only_true() -> None:
    probes = ProbeSet("s", (_probe("a", "a b c", similarity_ind=True), _probe("b", "a b d", similarity_ind=False)))
    assert probes.flag_counts() == {"similarity_ind": 1, "prompt_comp_ind": 0, "frequent_target_ind": 0,
                                    "hard_to_guess": 0, "not_single_target": 0}


def test_flag_counts_count_probes_that_are_not_single_target() -> None:
    probes = ProbeSet("s", (_probe("a", "dead as a doornail", single_target=False),
                            _probe("b", "dead as a dodo", single_target=False),
                            _probe("c", "sick as a parrot", single_target=True), _probe("d", "a b c")))
    assert probes.flag_counts()["not_single_target"] == 2


def test_concat_keeps_order_and_skipped() -> None:
    first = ProbeSet("x", (_probe("a", "a b c"),), skipped=("f.jsonl:3: bad",))
    second = ProbeSet("y", (_probe("b", "d e f"),))
    both = ProbeSet.concat("xy", [first, second])
    assert [p.id for p in both] == ["a", "b"]
    assert both.skipped == ("f.jsonl:3: bad",)
    assert len(both) == 2 and both[1].id == "b"
