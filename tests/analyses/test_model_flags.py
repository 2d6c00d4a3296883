"""The optional model-based `prompt_comp_ind` (`idiom_lens.analyses.model_flags`)."""

from __future__ import annotations

import pytest
from records import memorization_of  # tests/records.py

from idiom_lens.analyses.model_flags import prompt_tails, tail_prompt_comp, with_model_prompt_comp
from idiom_lens.datasets import Probe, ProbeSet


def test_prompt_tails() -> None:
    probe = Probe(id="x", prompt="stick out like a sore", target="thumb", kind="idiom")
    tails = prompt_tails(probe)
    assert [t.prompt for t in tails] == ["sore", "a sore", "like a sore", "out like a sore"]
    assert {t.target for t in tails} == {"thumb"} and tails[0].id == "x#tail1"


def test_tail_prompt_comp_with_a_stand_in_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flag True when some proper tail is memorized; the full prompt is never scored."""
    import idiom_lens.analyses.model_flags as model_flags

    seen: list[str] = []

    def fake_score(model, probes, *, batch_size, progress):  # noqa: ANN001 - stand-in
        seen.extend(p.prompt for p in probes)
        return memorization_of(list(probes), {p.id: p.prompt == "a sore" for p in probes})

    monkeypatch.setattr(model_flags, "score_memorization", fake_score)
    probes = [
        Probe(id="x", prompt="stick out like a sore", target="thumb", kind="idiom"),
        Probe(id="y", prompt="once in a blue", target="moon", kind="idiom"),
        Probe(id="z", prompt="hello", target="world", kind="text"),
    ]
    assert tail_prompt_comp(object(), probes) == {"x": True, "y": False, "z": False}
    assert "stick out like a sore" not in seen and "hello" not in seen


def test_with_model_prompt_comp_recomputes_hard_to_guess() -> None:
    probes = ProbeSet("s", (
        Probe("a", "stick out like a sore", "thumb", "idiom", similarity_ind=False, prompt_comp_ind=False,
              hard_to_guess=True, single_target=True),
        Probe("b", "once in a blue", "moon", "idiom", similarity_ind=False, prompt_comp_ind=True,
              hard_to_guess=False, single_target=True),
        Probe("c", "dead as a", "dodo", "idiom", similarity_ind=False, prompt_comp_ind=False,
              hard_to_guess=False, single_target=False),
    ))
    out = with_model_prompt_comp(probes, {"a": True, "b": False, "c": False})
    assert [(p.prompt_comp_ind, p.hard_to_guess) for p in out] == [(True, False), (False, True), (False, False)]
    with pytest.raises(KeyError):
        with_model_prompt_comp(probes, {"a": True})
