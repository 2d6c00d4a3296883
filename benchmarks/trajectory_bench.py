"""Trajectory speed and memory, side by side on the same model and the same probes.

(a) reference: the paper's way, one probe at a time on the Hugging Face model with all hidden
    states, final norm + unembedding per layer, softmax and a full argsort (`tests/reference.py`);
(b) TransformerLens `tools.analysis.logit_lens`, called per probe;
(c) idiom_lens `layer_trajectory` (batched, one pass over the vocabulary for both tokens);
(d) the floor: the blocks' batched forward, the unembedding of the rows the memorization score
    reads (last prompt token and target tokens: `iterate_forward`'s read="target"), and one
    projection of every layer's row (matmul only); no softmax, no ranks.
All read the residual after every block at the last prompt position. Prints times and ratios,
and the peak memory of (c) measured in a fresh subprocess.

    python benchmarks/trajectory_bench.py --probes 200 [--model gemma-3-270m] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def floor_pass(model, probe_tokens, *, batch_size: int) -> float:
    """(d): batched forward (read positions unembedded only) + ln_final + unembed of every layer."""
    from idiom_lens.models.forward import iterate_forward

    hooks = [f"blocks.{l}.hook_resid_post" for l in range(model.n_layers)]
    bridge = model.bridge
    started = time.perf_counter()
    for batch in iterate_forward(model, probe_tokens, hook_names=hooks, batch_size=batch_size):
        x = torch.stack([batch.captured[h] for h in hooks], dim=1).reshape(-1, model.d_model)
        with torch.no_grad():
            for chunk in x.split(128):
                _ = bridge.ln_final(chunk.unsqueeze(0)).squeeze(0) @ bridge.W_U
    _sync(model.device)
    return time.perf_counter() - started


def tl_logit_lens(model, probe_tokens, pred_ids) -> float:
    """(b): TransformerLens's logit_lens per probe, both tokens as shared targets."""
    from transformer_lens.tools.analysis import logit_lens

    started = time.perf_counter()
    for toks, pred in zip(probe_tokens, pred_ids):
        tokens = torch.tensor([toks.prompt_ids], device=model.device)
        logit_lens(model.bridge, tokens, targets=[int(pred), toks.target_id], return_type="probs")
    _sync(model.device)
    return time.perf_counter() - started


def peak_memory_child(args: argparse.Namespace) -> None:
    """Run (c) alone and print peak RSS (after load, and after the run) as JSON."""
    from idiom_lens.analyses.trajectory import layer_trajectory
    from idiom_lens.datasets import load_probes
    from idiom_lens.models.loading import load_model

    model = load_model(args.model, device=args.device, progress=False)
    probes = list(load_probes("idioms").probes[: args.probes])
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    layer_trajectory(model, probes, sites=["resid_post"], batch_size=args.batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(json.dumps({"after_load_gib": after_load, "peak_gib": peak, "gpu_peak_gib": gpu}))


def measure_peak_memory(args: argparse.Namespace) -> str:
    """(c) alone in a fresh process, started before this process loads anything: Linux carries
    a parent's peak RSS (ru_maxrss) into its children, so a child started later would report
    the parent's peak."""
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child", "--model", args.model, "--device", args.device,
         "--probes", str(args.probes), "--batch-size", str(args.batch_size)],
        capture_output=True, text=True, check=True,
    )
    mem = json.loads(child.stdout.strip().splitlines()[-1])
    added = mem["peak_gib"] - mem["after_load_gib"]
    gpu = f"; GPU peak {mem['gpu_peak_gib']:.2f} GiB" if mem["gpu_peak_gib"] is not None else ""
    return (f"peak memory of (c): process peak {mem['peak_gib']:.2f} GiB (model loaded: "
            f"{mem['after_load_gib']:.2f} GiB; (c) adds {added:.2f} GiB){gpu}  (goal < 4 GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--skip", nargs="*", default=[], choices=["a", "b"], help="skip slow baselines")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        peak_memory_child(args)
        return

    memory_line = measure_peak_memory(args)
    from idiom_lens.analyses.trajectory import layer_trajectory
    from idiom_lens.datasets import load_probes
    from idiom_lens.models.forward import tokenize_probes
    from idiom_lens.models.loading import load_model

    model = load_model(args.model, device=args.device, progress=False)
    probes = list(load_probes("idioms").probes[: args.probes])
    probe_tokens = tokenize_probes(model, probes)
    print(f"model {args.model} ({model.n_layers} layers, vocab {model.d_vocab}) on {args.device}, "
          f"{len(probes)} probes, torch threads {torch.get_num_threads()}")

    layer_trajectory(model, probes[:4], sites=["resid_post"])  # warm-up
    started = time.perf_counter()
    ours = layer_trajectory(model, probes, sites=["resid_post"], batch_size=args.batch_size)
    _sync(args.device)
    t_c = time.perf_counter() - started
    started = time.perf_counter()
    layer_trajectory(model, probes, batch_size=args.batch_size)
    _sync(args.device)
    t_c4 = time.perf_counter() - started
    t_d = floor_pass(model, probe_tokens, batch_size=args.batch_size)
    pred_ids = [r.pred_id for r in ours.memorization.records]
    t_b = tl_logit_lens(model, probe_tokens, pred_ids) if "b" not in args.skip else float("nan")
    t_a = float("nan")
    if "a" not in args.skip and model.source_path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the slow reference lives there
        from reference import load_hf_model, reference_trajectory

        hf = load_hf_model(model.source_path).to(args.device)
        started = time.perf_counter()
        reference_trajectory(hf, probe_tokens)
        t_a = time.perf_counter() - started

    n = len(probes)
    print(f"(a) reference, HF per probe + argsort : {t_a:8.1f} s  {1000 * t_a / n:7.1f} ms/probe")
    print(f"(b) TransformerLens logit_lens/probe  : {t_b:8.1f} s  {1000 * t_b / n:7.1f} ms/probe")
    print(f"(c) idiom_lens layer_trajectory       : {t_c:8.1f} s  {1000 * t_c / n:7.1f} ms/probe")
    print(f"    (all four sites, 4x the reads)    : {t_c4:8.1f} s  {1000 * t_c4 / n:7.1f} ms/probe")
    print(f"(d) floor: batched forward + matmul   : {t_d:8.1f} s  {1000 * t_d / n:7.1f} ms/probe")
    print(f"ratios: a/c = {t_a / t_c:.1f}x (goal >= 8)   b/c = {t_b / t_c:.1f}x (goal >= 3)   "
          f"c/d = {t_c / t_d:.2f} (goal <= 1.15)")
    print(memory_line)


if __name__ == "__main__":
    main()
