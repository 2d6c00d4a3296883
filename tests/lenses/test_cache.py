"""The lens cache: a trained lens records what its held-out KL was measured on and its training
curve; the held-out selection is the one it always was."""

from __future__ import annotations

import random

import pytest

from idiom_lens.errors import InputError
from idiom_lens.lenses.cache import _take, _take_indices, heldout_table, obtain_lens
from idiom_lens.lenses.corpus import SAMPLES_HELDOUT
from idiom_lens.lenses.settings import LensSettings
from idiom_lens.lenses.train import training_curve


def test_take_indices_select_what_take_selects():
    rng = random.Random(1)
    sequences = [[0] * rng.randint(3, 12) for _ in range(40)]
    chosen = _take_indices([len(s) for s in sequences], 60, seed=4)
    assert [sequences[i] for i in chosen] == _take(sequences, 60, seed=4)
    # by hand: the seeded order, taken while fewer than 60 non-BOS positions are held
    order = list(range(40))
    random.Random(4).shuffle(order)
    total, expected = 0, []
    for i in order:
        if total >= 60:
            break
        expected.append(i)
        total += len(sequences[i]) - 1
    assert chosen == expected


def test_a_trained_lens_records_its_held_out_text_and_curve(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    settings = LensSettings(corpus="samples", n_samples=16, train_tokens=64, heldout_tokens=40, steps=3,
                            batch_tokens=8)
    lens = obtain_lens(tiny_model, "tuned", settings=settings, prompts=[], progress=False, log=lambda s: None)
    used = lens.settings["heldout_used"]
    table = heldout_table(tiny_model, "tuned", settings=settings, prompts=[])
    assert used["n_tokens"] == table["n_tokens"].iloc[0] >= 40
    assert used["from"] == {SAMPLES_HELDOUT: used["n_sentences"]}
    assert used["n_sentences"] == table["n_sentences"].iloc[0]
    assert lens.settings["heldout_pool"] == {SAMPLES_HELDOUT: lens.settings["n_heldout_sentences"]}
    assert len(training_curve(lens)) == 4
    again = obtain_lens(tiny_model, "tuned", settings=settings, prompts=[], train=False)  # loaded from the cache
    assert again.settings == lens.settings
    assert training_curve(again).equals(training_curve(lens))
    with pytest.raises(InputError, match="no tuned lens"):
        heldout_table(tiny_model, "tuned", settings=LensSettings(steps=4), prompts=[])
