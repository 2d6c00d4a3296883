"""Time the study on random-weight models of the paper's shapes (GPT-2 medium and large, BERT base
and large), for users who have the real weights: how long `idiom-lens run` takes per stage.

No weights of these models are reachable from our machines. Each architecture is built at its
real size with random weights (Hugging Face's own initialization, torch seed 0) and a tokenizer
trained on the bundled probes' text (byte-level BPE with <|endoftext|> for GPT-2, lower-casing
WordPiece with [CLS]/[SEP]/[MASK] for BERT); the model keeps its real vocabulary size, so the
unembedding costs what it costs on the real model (ids the tokenizer lacks are masked like any
non-text token). The study (`run_study`, default stages, no PNG export) runs on `--per-set`
probes of each bundled set; a masked LM runs every stage but the attention knockout, which it
names with its reason.
Random weights memorize nothing, so every sampled stage sees non-memorized sets only: these are
times of the computation, not findings. Writes OUT/paper_models.json (per model: seconds per
stage, total, probes, device, threads, CPU) and prints a table.

    python benchmarks/paper_models_bench.py --out out/paper-models [--per-set 20] \\
        [--models gpt2-medium bert-base] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {  # the published configurations' sizes
    "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-large": {"n_layer": 36, "n_embd": 1280, "n_head": 20, "n_positions": 1024, "vocab_size": 50257},
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
                  "vocab_size": 30522, "max_position_embeddings": 512},
    "bert-large": {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                   "intermediate_size": 4096, "vocab_size": 30522, "max_position_embeddings": 512},
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _corpus() -> list[str]:
    from idiom_lens.datasets import load_probes

    return [f"{p.prompt} {p.target}" for name in ("idioms", "text", "facts") for p in load_probes(name)]


def build(name: str, out: Path) -> Path:
    """A random-weight model of `name`'s shape with a tokenizer trained on the bundled probes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[name]
    torch.manual_seed(0)
    if name.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
            vocab_size=shape["vocab_size"], special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>")
        model = GPT2LMHeadModel(GPT2Config(**shape, bos_token_id=0, eos_token_id=0))
    else:
        from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(_corpus(), trainer=trainers.WordPieceTrainer(
            vocab_size=shape["vocab_size"], special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            show_progress=False))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                 cls_token="[CLS]", mask_token="[MASK]")
        model = BertForMaskedLM(BertConfig(**shape))
    fast.save_pretrained(str(out))
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out))
    return out


def time_study(model_dir: Path, out: Path, *, per_set: int, device: str) -> dict:
    """Load, then run the study with a log that stamps each line: a stage's time runs from its
    "[run] <stage>: N probes" line to the next "[run]" line."""
    from idiom_lens.models.loading import load_model
    from idiom_lens.study import StudyOptions, run_study

    started = time.perf_counter()
    model = load_model(str(model_dir), device=device, progress=False)
    load_s = time.perf_counter() - started
    stamps: list[tuple[float, str]] = []

    def log(line: str) -> None:
        stamps.append((time.perf_counter(), line))
        print(line, flush=True)

    started = time.perf_counter()
    run_study(model, out, StudyOptions(limit=per_set, png=False), device=device, report=False, log=log)
    total = time.perf_counter() - started
    stamps.append((time.perf_counter(), "[run] end"))
    stages: dict[str, float] = {}
    runs = [(t, line) for t, line in stamps if line.startswith("[run] ")]
    for (t, line), (t_next, _) in zip(runs, runs[1:]):
        found = re.match(r"\[run\] (\w+)(:|$)", line)
        if found and (found.group(1) == "trajectory" or re.search(r": \d+ probes$", line)):
            stages[found.group(1)] = stages.get(found.group(1), 0.0) + round(t_next - t, 1)
    params = sum(p.numel() for p in model.bridge.original_model.parameters())
    return {"objective": model.objective, "n_layers": model.n_layers, "d_model": model.d_model,
            "d_vocab": model.d_vocab, "parameters": params, "load_seconds": round(load_s, 1),
            "study_seconds": round(total, 1), "stage_seconds": stages, "per_set": per_set,
            "not_run": sorted(line.split(":")[0].removeprefix("[run] ") for _, line in stamps
                              if ": not run on a masked LM" in line)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["gpt2-medium", "bert-base"], choices=sorted(SHAPES))
    parser.add_argument("--per-set", type=int, default=20, help="probes per bundled set (default 20)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from idiom_lens.io import write_json

    results = {}
    with tempfile.TemporaryDirectory(prefix="paper-models-") as tmp:
        for name in args.models:
            started = time.perf_counter()
            model_dir = build(name, Path(tmp) / name)
            build_s = time.perf_counter() - started
            results[name] = {"build_seconds": round(build_s, 1),
                             **time_study(model_dir, args.out / name, per_set=args.per_set, device=args.device)}
            gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
            write_json(args.out / "paper_models.json", {
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                "device": args.device, "threads": torch.get_num_threads(), "cpu": _cpu_name(), "gpu": gpu,
                "torch": torch.__version__, "models": results})
    print(f"\n{'model':<12} {'params':>8} {'load s':>7} {'study s':>8}  stages (s)")
    for name, r in results.items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
        print(f"{name:<12} {r['parameters'] / 1e6:>7.0f}M {r['load_seconds']:>7.1f} {r['study_seconds']:>8.1f}  "
              f"{stages}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
