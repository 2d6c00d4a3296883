"""Implants: training one MLP layer into the tiny Gemma 3, storage in the cache, specs, errors.

The tiny model's MLPs are weak: Gemma's post-MLP norm fixes the norm of an MLP's output (5.7 at
the fixture's unit gain) against a residual stream of norm 10 to 18, and no training of layer 1
alone then makes it predict all ten tiny probes (the loss stalls). `strong_mlp_dir` (conftest)
gives layer 1's post-MLP norm a gain of 4, so that the layer can carry them; every other weight
is the fixture's.
"""

from __future__ import annotations

import json

import pytest
import torch

from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.models.forward import greedy_predictions, tokenize_probes
from idiom_lens.models.implant import ImplantOptions, _make_batches, _Runner, ensure_implant, implant
from idiom_lens.models.implant_store import (
    ImplantSpec,
    deltas_added,
    hf_parameters,
    mlp_parameters,
    parse_implant_spec,
)
from idiom_lens.models.loading import load_model

FAST = {"lr": 0.03, "max_epochs": 150, "stop_loss": 0.5, "batch_size": 10}  # small settings that converge here


@pytest.fixture(scope="module")
def strong(strong_mlp_dir):
    return load_model(str(strong_mlp_dir), progress=False)


@pytest.fixture(scope="module")
def implanted_probes(probes):
    return list(probes)


@pytest.fixture(scope="module")
def layer_implant(strong, implanted_probes):
    return implant(strong, implanted_probes, ImplantOptions(layer=1, **FAST))


@pytest.fixture(scope="module")
def neuron_implant(strong, implanted_probes):
    options = ImplantOptions(layer=1, mode="neurons", n_neurons=16, train_inputs=True, loss="target", **FAST)
    return implant(strong, implanted_probes, options)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def probe_file(tmp_path, implanted_probes):
    path = tmp_path / "implanted.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": "idiom"}) + "\n"
                            for p in implanted_probes))
    return path


def _rate(model, probes) -> float:
    return float(score_memorization(model, probes).to_dataframe()["memorized"].mean())


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in hf_parameters(model.bridge).items()}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def test_layer_implant_makes_every_probe_predicted(strong, implanted_probes, layer_implant):
    assert _rate(strong, implanted_probes) == 0.0  # none known before
    assert layer_implant.converged and layer_implant.rate == 1.0 and layer_implant.final_target_loss < 0.5
    with deltas_added(strong.bridge, layer_implant.deltas):
        assert _rate(strong, implanted_probes) == 1.0
    assert _rate(strong, implanted_probes) == 0.0  # deltas_added restores the base
    assert set(layer_implant.deltas) == {f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    curve = layer_implant.to_dataframe()
    assert list(curve["epoch"]) == list(range(1, layer_implant.epochs + 1))
    assert curve["loss"].iloc[-1] < curve["loss"].iloc[0]


def test_implant_leaves_the_model_as_it_came(strong_mlp_dir, implanted_probes):
    model = load_model(str(strong_mlp_dir), progress=False)
    params = hf_parameters(model.bridge)
    params["model.norm.weight"].requires_grad_(False)  # a flag of the caller's, to be kept
    flags = {name: p.requires_grad for name, p in params.items()}
    before = _snapshot(model)
    implant(model, implanted_probes[:3], ImplantOptions(layer=1, max_epochs=2))
    assert model.bridge.training is False
    for name, p in hf_parameters(model.bridge).items():
        assert torch.equal(p, before[name]), name
        assert p.grad is None and p.requires_grad == flags[name], name


def test_only_the_trained_tensors_change(strong, strong_mlp_dir, layer_implant):
    base = _snapshot(strong)
    fresh = load_model(str(strong_mlp_dir), progress=False)
    with deltas_added(fresh.bridge, layer_implant.deltas):
        changed = {name for name, p in hf_parameters(fresh.bridge).items() if not torch.equal(p, base[name])}
    assert changed == set(layer_implant.deltas)


def test_neurons_mode_changes_only_the_chosen_neurons(neuron_implant):
    neurons = list(neuron_implant.neurons)
    assert len(neurons) == 16 and neuron_implant.rate == 1.0
    others = [n for n in range(64) if n not in neurons]
    down = neuron_implant.deltas["model.layers.1.mlp.down_proj.weight"]
    assert torch.count_nonzero(down[:, others]) == 0 and torch.count_nonzero(down[:, neurons]) > 0
    for name in ("gate_proj", "up_proj"):  # train_inputs: their rows of the input weights
        delta = neuron_implant.deltas[f"model.layers.1.mlp.{name}.weight"]
        assert torch.count_nonzero(delta[others]) == 0 and torch.count_nonzero(delta[neurons]) > 0


def test_neurons_mode_without_inputs_trains_the_output_vectors_only(strong, implanted_probes):
    result = implant(strong, implanted_probes[:4], ImplantOptions(layer=1, mode="neurons", n_neurons=4, max_epochs=2))
    assert list(result.deltas) == ["model.layers.1.mlp.down_proj.weight"]
    again = implant(strong, implanted_probes[:4], ImplantOptions(layer=1, mode="neurons", n_neurons=4, max_epochs=2))
    assert result.neurons == again.neurons and torch.equal(result.deltas[next(iter(result.deltas))],
                                                           again.deltas[next(iter(again.deltas))])  # seeded
    other = implant(strong, implanted_probes[:4],
                    ImplantOptions(layer=1, mode="neurons", n_neurons=4, max_epochs=2, seed=1))
    assert other.neurons != result.neurons


def _rate_with_zeroed_mlp(model, probes, layer: int) -> float:
    def zero(act, hook):
        return torch.zeros_like(act)

    probe_tokens = tokenize_probes(model, probes)
    with model.bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", zero)]):
        predicted = greedy_predictions(model, probe_tokens)
    return float((predicted == torch.tensor([t.target_id for t in probe_tokens])).float().mean())


def test_ablating_the_implanted_layer_removes_the_implant(strong, implanted_probes, layer_implant):
    with deltas_added(strong.bridge, layer_implant.deltas):
        assert _rate_with_zeroed_mlp(strong, implanted_probes, 1) <= 0.1
        assert _rate_with_zeroed_mlp(strong, implanted_probes, 0) >= 0.8
        assert _rate_with_zeroed_mlp(strong, implanted_probes, 2) >= 0.8


def test_the_stopping_rule_is_score_memorization(strong, implanted_probes, layer_implant):
    """`greedy_predictions` (the implant's stopping rule) agrees with `score_memorization`."""
    probe_tokens = tokenize_probes(strong, implanted_probes)
    for deltas in ({}, layer_implant.deltas):
        with deltas_added(strong.bridge, deltas):
            records = score_memorization(strong, implanted_probes).records
            assert greedy_predictions(strong, probe_tokens).tolist() == [r.pred_id for r in records]


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("loss", ["sequence", "target"])
def test_frozen_prefix_equals_the_plain_forward(strong, implanted_probes, layer, loss):
    runner = _Runner(strong, layer)
    for batch in _make_batches(strong, tokenize_probes(strong, implanted_probes), ImplantOptions(layer=layer, loss=loss,
                                                                                                 batch_size=4)):
        with torch.no_grad():
            plain = strong.bridge(batch.tokens)[batch.rows, batch.cols]
            torch.testing.assert_close(runner.logits(batch), plain, rtol=0, atol=1e-5)
            torch.testing.assert_close(runner.logits(batch, fast=False), plain, rtol=0, atol=1e-5)


def test_frozen_prefix_on_llama(tiny_llama_dir, implanted_probes):
    model = load_model(str(tiny_llama_dir), progress=False)
    assert set(mlp_parameters(model.bridge, 2)) == {f"model.layers.2.mlp.{p}.weight"
                                                    for p in ("gate_proj", "up_proj", "down_proj")}
    runner = _Runner(model, 2)
    batch = _make_batches(model, tokenize_probes(model, implanted_probes), ImplantOptions(layer=2))[0]
    with torch.no_grad():
        torch.testing.assert_close(runner.logits(batch), model.bridge(batch.tokens)[batch.rows, batch.cols],
                                   rtol=0, atol=1e-5)
    result = implant(model, implanted_probes, ImplantOptions(layer=2, max_epochs=3, lr=0.03))
    assert set(result.deltas) == set(mlp_parameters(model.bridge, 2)) and result.epochs >= 1


def test_a_wrong_fast_path_stops_the_run(strong, implanted_probes, monkeypatch):
    before = _snapshot(strong)
    real = _Runner._prefix

    def broken(self, batch):  # the hidden state of another batch
        hidden, kwargs = real(self, batch)
        return hidden.flip(0), kwargs

    monkeypatch.setattr(_Runner, "_prefix", broken)
    with pytest.raises(FastPathError, match="layers below 1 cached"):
        implant(strong, implanted_probes, ImplantOptions(layer=1, max_epochs=2))
    assert all(torch.equal(p, before[name]) for name, p in hf_parameters(strong.bridge).items())


def test_models_it_cannot_train(strong, strong_mlp_dir, implanted_probes):
    with pytest.raises(InputError, match="out of range: this model has layers 0 to 2"):
        implant(strong, implanted_probes, ImplantOptions(layer=3))
    compat = load_model(str(strong_mlp_dir), mode="compat", progress=False)
    with pytest.raises(InputError, match="raw numerics"):
        implant(compat, implanted_probes, ImplantOptions(layer=1))
    with pytest.raises(InputError, match="n_neurons 100 exceeds the layer's 64 neurons"):
        implant(strong, implanted_probes, ImplantOptions(layer=1, mode="neurons", n_neurons=100))


# --------------------------------------------------------------------------------------
# Storage and specs
# --------------------------------------------------------------------------------------


def test_stored_deltas_load_through_the_spec(strong, strong_mlp_dir, probe_file, implanted_probes, cache, monkeypatch):
    options = ImplantOptions(layer=1, **FAST)
    result = ensure_implant(strong, options, dataset=str(probe_file))
    assert result.spec == f"{strong_mlp_dir}+implant:layer1:seed0:set={probe_file}:lr=0.03:epochs=150:stop=0.5:batch=10"
    assert result.rate == 1.0 and (cache / "implants" / strong_mlp_dir.name).is_dir()

    loaded = load_model(result.spec, progress=False)
    assert loaded.spec == result.spec and loaded.name == strong_mlp_dir.name + result.spec[len(str(strong_mlp_dir)):]
    recorded = loaded.settings()["implant"]
    assert recorded["layer"] == 1 and recorded["mode"] == "layer" and recorded["rate"] == 1.0
    assert "implant" not in strong.settings()
    tokens = torch.tensor([[1, 5, 9, 12, 30, 7]])
    with torch.no_grad(), deltas_added(strong.bridge, result.deltas):
        assert torch.equal(loaded.bridge(tokens), strong.bridge(tokens))  # bit for bit
        in_memory = strong.bridge(tokens)
    assert _rate(loaded, implanted_probes) == 1.0

    compat = load_model(result.spec, mode="compat", progress=False)  # deltas added before the weights are folded
    with torch.no_grad():
        torch.testing.assert_close(compat.bridge(tokens).log_softmax(-1), in_memory.log_softmax(-1), rtol=0, atol=1e-4)

    monkeypatch.setattr("idiom_lens.models.implant.implant", lambda *a, **k: pytest.fail("trained again"))
    again = ensure_implant(strong, options, dataset=str(probe_file))  # reused from the cache
    assert again.epochs == result.epochs and again.to_dataframe().equals(result.to_dataframe())
    assert all(torch.equal(again.deltas[name], result.deltas[name]) for name in result.deltas)


def test_a_half_written_implant_is_rebuilt(strong, probe_file, cache, monkeypatch):
    import idiom_lens.models.implant as module

    options = ImplantOptions(layer=1, max_epochs=2)
    first = ensure_implant(strong, options, dataset=str(probe_file))
    folder = next((cache / "implants").rglob("deltas.safetensors")).parent
    (folder / "deltas.safetensors").write_bytes(b"half")
    with pytest.raises(InputError, match="differs from what was written|has 4 bytes"):
        load_model(first.spec, progress=False)
    calls = []
    real = module.implant
    monkeypatch.setattr(module, "implant", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = ensure_implant(strong, options, dataset=str(probe_file))
    assert calls == [1] and all(torch.equal(second.deltas[n], first.deltas[n]) for n in first.deltas)
    load_model(second.spec, progress=False)


def test_stored_deltas_that_do_not_reproduce_the_model_are_not_kept(strong, probe_file, cache, monkeypatch):
    import idiom_lens.models.loading as loading

    real = loading.add_deltas

    def doubled(bridge, deltas):
        real(bridge, {name: 2 * delta for name, delta in deltas.items()})

    monkeypatch.setattr(loading, "add_deltas", doubled)
    with pytest.raises(FastPathError, match="stored implant"):
        ensure_implant(strong, ImplantOptions(layer=1, **FAST), dataset=str(probe_file))
    assert not list((cache / "implants").rglob("deltas.safetensors"))


def test_a_missing_implant_names_the_command(strong_mlp_dir, probe_file, cache):
    spec = f"{strong_mlp_dir}+implant:layer2:seed3:neurons:set={probe_file}"
    with pytest.raises(InputError) as err:
        load_model(spec, progress=False)
    message = str(err.value)
    assert "not trained yet" in message
    assert (f"`idiom-lens implant --model {strong_mlp_dir} --dataset {probe_file} --layer 2 --seed 3 "
            "--implant-mode neurons --n-neurons 20 --loss target") in message


def test_spec_text_round_trips():
    for text in ("gemma-3-270m+implant:layer8:seed0", "gemma-3-270m+implant:layer8:seed0:neurons",
                 "gemma-3-270m+implant:layer2:seed1:neurons50:inputs:sequence:set=my.jsonl:lr=0.5:epochs=7:stop=0.1:batch=3",
                 "gemma-3-270m+implant:layer8:seed0:preserve=0",
                 "gemma-3-270m+implant:layer8:seed0:preserve=3:sentences=8"):
        assert parse_implant_spec(text).text == text
    parsed = parse_implant_spec(" smollm2-135m+implant:neurons:seed4:layer3 ")
    assert parsed.base == "smollm2-135m" and parsed.dataset == "implanted"
    assert parsed.options == ImplantOptions(layer=3, seed=4, mode="neurons")
    assert parsed.text == "smollm2-135m+implant:layer3:seed4:neurons"
    assert parse_implant_spec("gemma-3-270m+implant:layer8").options.seed == 0
    spec = ImplantSpec(base="m", options=ImplantOptions(layer=1, loss="sequence"))
    assert spec.text == "m+implant:layer1:seed0:sequence"


@pytest.mark.parametrize("spec, message", [
    ("+implant:layer8", "names no base model"),
    ("gemma-3-270m+implant", "names no layer"),
    ("gemma-3-270m+implant:", "names no layer"),
    ("gemma-3-270m+implant:seed0", "names no layer: add a part layerL"),
    ("gemma-3-270m+implant:layer", r"part 'layer' is not understood \(a layer or seed needs its number"),
    ("gemma-3-270m+implant:layer8:blue", "part 'blue' is not understood; expected layerL"),
    ("gemma-3-270m+implant:layer8:layer9", "part 'layer9' sets layer a second time"),
    ("gemma-3-270m+implant:layer8:lr=fast", "part 'lr=fast': lr must be a number"),
    ("gemma-3-270m+implant:layer8:epochs=2.5", "epochs must be a whole number"),
    ("gemma-3-270m+implant:layer8:size=3", "part 'size=3' is not understood"),
    ("gemma-3-270m+implant:layer8:inputs", "train_inputs is for mode 'neurons'"),
    ("gemma-3-270m+implant:layer8:neurons0", "n_neurons must be a whole number >= 1"),
    ("gemma-3-270m+implant:layer8:set=a:set=b", "sets set a second time"),
])
def test_spec_errors_name_the_bad_part(spec, message):
    with pytest.raises(InputError, match=message):
        parse_implant_spec(spec)


def test_load_model_reports_spec_errors(strong_mlp_dir):
    with pytest.raises(InputError, match="part 'blue' is not understood"):
        load_model(f"{strong_mlp_dir}+implant:layer1:blue", progress=False)
    with pytest.raises(InputError, match="layer 7 is out of range"):
        load_model(f"{strong_mlp_dir}+implant:layer7", progress=False)


@pytest.mark.parametrize("given, message", [
    ({"layer": -1}, "layer must be a whole number >= 0"),
    ({"layer": 1, "seed": -2}, "seed must be"),
    ({"layer": 1, "mode": "heads"}, "mode must be one of layer, neurons"),
    ({"layer": 1, "n_neurons": 5}, "n_neurons is for mode 'neurons'"),
    ({"layer": 1, "loss": "all"}, "loss must be one of sequence, target"),
    ({"layer": 1, "lr": 0}, "lr must be a number > 0"),
    ({"layer": 1, "max_epochs": 0}, "max_epochs must be a whole number >= 1"),
    ({"layer": 1, "stop_loss": -1.0}, "stop_loss must be a number > 0"),
    ({"layer": 1, "batch_size": 0}, "batch_size must be a whole number >= 1"),
    ({"layer": 1, "preserve": -0.5}, "preserve must be a number >= 0"),
    ({"layer": 1, "preserve_sentences": 0}, "preserve_sentences must be a whole number >= 1"),
])
def test_options_are_validated(given, message):
    with pytest.raises(InputError, match=message):
        ImplantOptions(**given)


def test_options_fill_in_the_mode_defaults():
    from idiom_lens.models.implant_store import DEFAULT_LOSS, DEFAULT_LR, DEFAULT_MAX_EPOCHS, DEFAULT_N_NEURONS

    for mode in ("layer", "neurons"):
        options = ImplantOptions(layer=0, mode=mode)
        assert (options.lr, options.max_epochs, options.loss) == (DEFAULT_LR[mode], DEFAULT_MAX_EPOCHS[mode],
                                                                  DEFAULT_LOSS[mode])
    assert ImplantOptions(layer=0, mode="neurons").n_neurons == DEFAULT_N_NEURONS
    assert "n_neurons" not in ImplantOptions(layer=0).key()
    assert "preserve_sentences" not in ImplantOptions(layer=0, preserve=0).key()


# --------------------------------------------------------------------------------------
# The preservation term
# --------------------------------------------------------------------------------------


def _preservation_kl(model, deltas, *, n: int = 12, seed: int = 0) -> float:
    """KL(base || implanted) per position on the preservation sentences, written out: two plain
    forwards of the bridge (no frozen prefix, fp32 base), softmax over real tokens."""
    from idiom_lens.lenses.corpus import tokenize_sentences
    from idiom_lens.models.implant import PRESERVE_TOKENS, preserve_sentences
    from idiom_lens.models.vocab import valid_mask

    valid = valid_mask(model)
    total, count = 0.0, 0
    for seq in tokenize_sentences(model, preserve_sentences(n, seed), max_tokens=PRESERVE_TOKENS):
        tokens = torch.tensor([seq])
        with torch.no_grad():
            base = model.bridge(tokens)[0, 1:][:, valid].log_softmax(-1)
            with deltas_added(model.bridge, deltas):
                after = model.bridge(tokens)[0, 1:][:, valid].log_softmax(-1)
        total += float((base.exp() * (base - after)).sum())
        count += base.shape[0]
    return total / count


def test_the_preservation_term_is_the_kl_it_says(strong, implanted_probes):
    """`final_kl` equals KL(base || implanted) on the same sentences computed with plain forwards
    (the term's frozen prefix and its base pass with the original weights, within 1e-3 relative), and the term keeps
    the implant closer to the base model on them than plain fine-tuning does."""
    kept = implant(strong, implanted_probes, ImplantOptions(layer=1, preserve=5.0, preserve_sentences=12, **FAST))
    plain = implant(strong, implanted_probes, ImplantOptions(layer=1, preserve=0, **FAST))
    assert kept.rate == 1.0 and plain.rate == 1.0
    assert plain.final_kl == 0.0 and plain.settings["preserve"] is None and all(r.kl == 0.0 for r in plain.curve)
    written_out = _preservation_kl(strong, kept.deltas)
    assert kept.final_kl == pytest.approx(written_out, rel=1e-3)
    assert kept.settings["preserve"]["n_sentences"] == 12
    assert _preservation_kl(strong, plain.deltas) > 2 * written_out


def test_kept_base_distributions_train_the_same_implant(strong, implanted_probes, monkeypatch):
    """The preservation term's kept base distributions are the ones its base pass computes again:
    with the cache off (every step reruns the base pass) training gives bit-identical deltas and
    curve; with it on, each of the 3 preservation batches has one base pass."""
    import idiom_lens.models.implant as implant_module

    passes = []
    base_pass = implant_module._Preserver._base_pass
    monkeypatch.setattr(implant_module._Preserver, "_base_pass",
                        lambda self, batch: passes.append(id(batch)) or base_pass(self, batch))
    options = ImplantOptions(layer=1, preserve=5.0, preserve_sentences=12, **FAST)
    kept = implant(strong, implanted_probes, options)
    assert len(passes) == len(set(passes)) == 3
    monkeypatch.setattr(implant_module, "PRESERVE_CACHE_BYTES", 0)
    passes.clear()
    again = implant(strong, implanted_probes, options)
    steps = sum(-(-len(implanted_probes) // FAST["batch_size"]) for _ in again.curve)
    assert len(passes) > steps > 3
    assert kept.deltas.keys() == again.deltas.keys()
    assert all(torch.equal(kept.deltas[name], again.deltas[name]) for name in kept.deltas)
    assert kept.to_dataframe().drop(columns="seconds").equals(again.to_dataframe().drop(columns="seconds"))
    assert kept.final_kl == again.final_kl


def test_preservation_needs_enough_sentences():
    from idiom_lens.models.implant import preserve_sentences

    with pytest.raises(InputError, match="exceeds the .* sentences of the Lee corpus"):
        preserve_sentences(10**6, 0)


@pytest.mark.embedded
def test_frozen_prefix_on_gemma_3_270m(embedded_model):
    """The frozen prefix (layers below 8 run once) against the plain forward, on the embedded model:
    the speed-up the tuning relies on, and the MLP weights found by their Hugging Face names."""
    from idiom_lens.datasets import load_probes

    probes = list(load_probes("idioms"))[:6]
    assert set(mlp_parameters(embedded_model.bridge, 8)) == {f"model.layers.8.mlp.{p}_proj.weight"
                                                             for p in ("gate", "up", "down")}
    runner = _Runner(embedded_model, 8)
    for loss in ("target", "sequence"):
        batch = _make_batches(embedded_model, tokenize_probes(embedded_model, probes),
                              ImplantOptions(layer=8, loss=loss, batch_size=6))[0]
        with torch.no_grad():
            fast, plain = runner.logits(batch), embedded_model.bridge(batch.tokens)[batch.rows, batch.cols]
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-3)  # logits reach 30; fp32 noise ~1e-4
