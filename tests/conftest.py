"""Shared fixtures: tiny random models built offline (fast), and the embedded model (slow).

The tiny models are real Hugging Face architectures (Gemma 3 and Llama) with a few layers and a
byte-level BPE tokenizer trained here on a handful of sentences, saved to a temp directory and
loaded through `idiom_lens.models.loading.load_model` like any local model directory.

`make test` runs the suite on 2 processes (pytest-xdist); `pytest_configure` gives each its share
of the cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from idiom_lens.datasets.probes import Probe


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker's torch threads are its share of the cores (2 workers of 2
    threads on 2 cores would spin against each other), and so are those of the processes its tests
    start (OMP_NUM_THREADS, MKL_NUM_THREADS): a run killed in a child process and its rerun here
    compute at one thread count, as the fault tests' bit-for-bit comparisons need."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(config, items) -> None:
    """The longest tests first (the notebook, the Ray module, the embedded model's), so that
    pytest-xdist's workers do not end on one of them while the other idles."""
    def long_first(item) -> int:
        if item.path.name == "test_notebook.py" and "embedded" in item.keywords:
            return 0
        if item.path.name == "test_distributed.py":
            return 1
        return 2 if "embedded" in item.keywords else 3

    items.sort(key=long_first)  # stable: the order within each kind is kept

CORPUS = [
    "once in a blue moon",
    "turn a blind eye",
    "kill two birds with one stone",
    "the elephant in the room",
    "a piece of cake",
    "break the ice",
    "the capital of France is Paris",
    "the cat sat on the mat",
    "she walked to the market",
    "he read a long book about history",
]


def tiny_probes() -> list[Probe]:
    probes = []
    for i, text in enumerate(CORPUS):
        words = text.split()
        kind = "fact" if "capital" in text else ("text" if i >= 7 else "idiom")
        probes.append(
            Probe(id=f"p{i}", prompt=" ".join(words[:-1]), target=words[-1], kind=kind,
                  hard_to_guess=(i % 2 == 0))
        )
    return probes


def _train_tokenizer(out_dir: Path, *, gpt2: bool = False) -> None:
    """A byte-level BPE on the tiny corpus: with <pad>, <bos>, <eos> and BOS prepended (Gemma,
    Llama); or GPT-2's way (`gpt2`): one special token, <|endoftext|>, and no BOS prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"] if gpt2 else ["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    if gpt2:
        fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>")
    else:
        bos = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
        )
    fast.save_pretrained(str(out_dir))


def _build_tiny(out_dir: Path, arch: str) -> Path:
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(out_dir, gpt2=arch == "gpt2")
    vocab = len(AutoTokenizer.from_pretrained(str(out_dir)))
    torch.manual_seed(0)
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_positions=512, bos_token_id=0,
                            eos_token_id=0)
        model = GPT2LMHeadModel(config)
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        config = Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
            sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = Gemma3ForCausalLM(config)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    # Larger-than-default weights so the random model's predictions are not all near-uniform.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (learned positions, LayerNorm, GELU MLP, tied embeddings) with a GPT-2-style
    tokenizer that prepends no BOS, as the paper ran GPT-2."""
    return _build_tiny(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2")


def build_tiny_bert(out_dir: Path) -> Path:
    """A tiny BertForMaskedLM (post-LN, learned positions, GELU MLP, MLM head with its own dense,
    GELU and LayerNorm before the tied decoder) with a lower-casing WordPiece tokenizer that
    writes [CLS] ... [SEP], as bert-base-uncased does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                        show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")
    fast.save_pretrained(str(out_dir))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = BertForMaskedLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    model.config.architectures = ["BertForMaskedLM"]
    model.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def bert(tiny_bert_dir):
    """The tiny BERT, loaded (a masked LM)."""
    from idiom_lens.models.loading import load_model

    return load_model(str(tiny_bert_dir), progress=False)


@pytest.fixture(scope="session")
def hf_bert(tiny_bert_dir):
    """The same tiny BERT as a plain Hugging Face `BertForMaskedLM`: the reference of every BERT test."""
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(str(tiny_bert_dir)).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from idiom_lens.models.loading import load_model

    return load_model(str(tiny_model_dir), mode="raw", progress=False)


@pytest.fixture(scope="session")
def tiny_model_compat(tiny_model_dir):
    from idiom_lens.models.loading import load_model

    return load_model(str(tiny_model_dir), mode="compat", progress=False)


@pytest.fixture(scope="session")
def strong_mlp_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Gemma 3 with layer 1's post-MLP norm gain at 4 (the fixture's is 1), so that
    training that layer alone can make the model predict every tiny probe: Gemma's post-MLP norm
    fixes the norm of an MLP's output, and at unit gain it is too small against the residual
    stream for an implant into one layer (`idiom_lens.models.implant`) to carry them."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-gemma3-strong-mlp1")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, out / file.name)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.layers.1.post_feedforward_layernorm.weight"
    weights[name] = torch.full_like(weights[name], 3.0)  # Gemma norms scale by 1 + weight
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def probes() -> list[Probe]:
    return tiny_probes()


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded Gemma 3 270M in raw mode (built into the cache on first use)."""
    from idiom_lens.models.loading import load_model

    return load_model("gemma-3-270m", mode="raw", progress=False)


@pytest.fixture(scope="session")
def embedded_model_compat():
    from idiom_lens.models.loading import load_model

    return load_model("gemma-3-270m", mode="compat", progress=False)


@pytest.fixture(scope="session")
def shaped_norm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Gemma 3 with a non-trivial final norm weight (the fixture's is the identity: zeros + 1)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("tiny-gemma3-shaped-norm")
    for file in tiny_model_dir.iterdir():
        shutil.copy(file, out / file.name)
    weights = load_file(str(out / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    weights["model.norm.weight"] = 2.0 * torch.randn(weights["model.norm.weight"].shape, generator=generator)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _with_post_norm_weights(model):
    """`model` (tiny Gemma 3) with non-trivial post-norm weights: random init leaves them 0, an
    effective gain of 1, which would test neither the post-norm scaling nor the effective ranking
    or the frozen norm of knockouts."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.bridge.blocks:
            for norm in (block.ln1_post, block.ln2_post):
                norm.weight.copy_(torch.randn(norm.weight.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(scope="module")
def tiny_gemma_post(tiny_model_dir):
    """Tiny Gemma 3, raw numerics, with non-trivial post-norm weights."""
    from idiom_lens.models.loading import load_model

    return _with_post_norm_weights(load_model(str(tiny_model_dir), mode="raw", progress=False))


@pytest.fixture(scope="module")
def gemma_post(tiny_model_dir):
    """Tiny Gemma 3, compat numerics (attribution), with non-trivial post-norm weights."""
    from idiom_lens.models.loading import load_model

    return _with_post_norm_weights(load_model(str(tiny_model_dir), mode="compat", progress=False))
