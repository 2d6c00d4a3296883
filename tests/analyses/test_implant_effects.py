"""Side effects of an implant: KL on held-out text and the memorization of other idioms."""

from __future__ import annotations

import pytest
import torch

from idiom_lens.analyses.implant_effects import implants_side_effects, side_effects
from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.errors import InputError
from idiom_lens.models.implant_store import add_deltas, hf_parameters
from idiom_lens.models.loading import load_model


@pytest.fixture(scope="module")
def split(probes):
    return [p for p in probes if p.kind == "text"], [p for p in probes if p.kind != "text"]


def test_a_model_against_itself_has_no_side_effects(tiny_model, tiny_model_dir, split):
    texts, idioms = split
    again = load_model(str(tiny_model_dir), progress=False)
    effects = side_effects(tiny_model, again, text_probes=texts, idioms=idioms)
    assert effects.kl_per_token == pytest.approx(0.0, abs=1e-6) and effects.kl_last == pytest.approx(0.0, abs=1e-6)
    assert effects.text_changed == 0.0 and effects.n_lost == effects.n_gained == 0
    assert effects.idioms_rate_before == effects.idioms_rate_after
    assert effects.n_texts == len(texts) and effects.n_idioms == len(idioms)
    frame = effects.to_dataframe()
    assert list(frame["measure"])[:2] == ["kl_per_token", "kl_last"]
    assert frame.set_index("measure").loc["kl_per_token", "n"] == effects.n_tokens


def test_a_changed_mlp_shows_in_the_kl_and_the_rates(tiny_model, tiny_model_dir, split, probes):
    texts, idioms = split
    changed = load_model(str(tiny_model_dir), progress=False)
    name = "model.layers.1.mlp.down_proj.weight"
    add_deltas(changed.bridge, {name: torch.randn(hf_parameters(changed.bridge)[name].shape,
                                                  generator=torch.Generator().manual_seed(0))})
    effects = side_effects(tiny_model, changed, text_probes=texts, idioms=idioms)
    assert effects.kl_per_token > 1e-3 and effects.kl_last_max >= effects.kl_last > 1e-3
    # the counts agree with score_memorization on each model
    before = score_memorization(tiny_model, idioms).to_dataframe()["memorized"]
    after = score_memorization(changed, idioms).to_dataframe()["memorized"]
    assert effects.idioms_rate_before == before.mean() and effects.idioms_rate_after == after.mean()
    assert effects.n_lost == int((before & ~after).sum()) and effects.n_gained == int((~before & after).sum())
    # the per-token mean covers every real position: one KL per token of each text
    lengths = [len(tiny_model.tokenizer(p.text).input_ids) for p in texts]
    assert effects.n_tokens == sum(lengths)
    # the base model's flags, when given, are used as they are and give the same numbers
    given = side_effects(tiny_model, changed, text_probes=texts, idioms=idioms, base_memorized=before.tolist())
    assert given == effects
    with pytest.raises(InputError, match="base_memorized has 1 flags"):
        side_effects(tiny_model, changed, text_probes=texts, idioms=idioms, base_memorized=[True])


def test_several_implants_at_once_give_each_ones_side_effects(tiny_model, tiny_model_dir, split):
    """`implants_side_effects` (one base pass, each implant's deltas added to the base model in
    turn) gives exactly what `side_effects` gives against each implanted model loaded on its own,
    and leaves the base model's weights bit-identical."""
    texts, idioms = split
    params = hf_parameters(tiny_model.bridge)
    implants = {}
    for seed, name in enumerate(("model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight")):
        implants[f"implant{seed}"] = {name: 0.5 * torch.randn(params[name].shape,
                                                              generator=torch.Generator().manual_seed(seed))}
    before = {name: p.detach().clone() for name, p in params.items()}
    together = implants_side_effects(tiny_model, implants, text_probes=texts, idioms=idioms, batch_size=3)
    assert all(torch.equal(before[name], p) for name, p in hf_parameters(tiny_model.bridge).items())
    assert list(together) == ["implant0", "implant1"]
    for name, deltas in implants.items():
        alone = load_model(str(tiny_model_dir), progress=False)
        add_deltas(alone.bridge, deltas)
        one = side_effects(tiny_model, alone, text_probes=texts, idioms=idioms, batch_size=3)
        assert together[name].to_dataframe().equals(one.to_dataframe())
        assert together[name].kl_per_token > 1e-3
    assert together["implant0"].kl_per_token != together["implant1"].kl_per_token
    with pytest.raises(InputError, match="at least one implant"):
        implants_side_effects(tiny_model, {}, text_probes=texts, idioms=idioms)


def test_empty_sets_are_refused(tiny_model, split):
    texts, idioms = split
    with pytest.raises(InputError, match="no probes given"):
        side_effects(tiny_model, tiny_model, text_probes=[], idioms=idioms)
    with pytest.raises(InputError, match="no probes given"):
        side_effects(tiny_model, tiny_model, text_probes=texts, idioms=[])
