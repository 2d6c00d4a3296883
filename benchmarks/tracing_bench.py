"""Time causal tracing on idioms of the embedded model, against the naive loop.

    python benchmarks/tracing_bench.py [--n 100] [--naive 2] [--naive-samples 2] [--windows 10] [--samples 10]

1. The noise scale (std of the input embeddings over the bundled text set), untimed.
2. `causal_trace` on a seeded sample of N bundled idioms (default 100) with the given settings,
   timed per probe; printed: total, per probe, and the projection to 100 idioms. With
   `--before K`, the first K of them also run with every restored row over the whole prompt
   (`reuse_kv=False`, the code before the corrupted runs' keys and values were reused), and the
   ratio of the two times on those K idioms is printed, with their largest cell difference.
3. The naive loop on the first `--naive` of those probes: one full Hugging Face forward per
   (noise sample, site/window, layer, position) (`tests/reference.py`), timed, against the fast
   path on the same probes with the same settings, at `--naive-samples` noise draws (default:
   `--samples`; the naive loop's time grows linearly with them, ~10 minutes per idiom at 10);
   the cells are checked to agree.

Run it alone on the machine: two heavy jobs on 2 cores slow each other several times over.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from idiom_lens.analyses.interventions.tracing import (
        TRACE_SITES,
        TracingOptions,
        causal_trace,
        default_noised,
        noise_scale,
        trace_noise,
        trace_specs,
    )
    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.selection import sample_probes
    from idiom_lens.models.loading import load_model
    from idiom_lens.models.tokenization import split_probe
    from idiom_lens.models.vocab import masked_token_ids
    from tests.reference import load_hf_model, reference_causal_trace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="idioms traced by the fast path (default 100)")
    parser.add_argument("--naive", type=int, default=2, help="of those, probes also run by the naive loop (default 2)")
    parser.add_argument("--sites", nargs="+", default=list(TRACE_SITES), choices=TRACE_SITES)
    parser.add_argument("--windows", type=int, nargs="+", default=[10])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--naive-samples", type=int, default=None, help="noise draws for the naive comparison")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the reference machine)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--before", type=int, default=0, metavar="K",
                        help="also time the first K idioms with whole-prompt rows (no key/value reuse): the ratio")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"command: {' '.join(sys.argv)}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
          f"load average before {os.getloadavg()[0]:.2f}")

    model = load_model("gemma-3-270m", progress=False)
    scale = noise_scale(model)
    probes = sample_probes(load_probes("idioms").probes, args.n, seed=0)
    options = TracingOptions(sites=tuple(args.sites), windows=tuple(args.windows), noise_samples=args.samples)
    kw = dict(scale=scale, batch_size=args.batch_size)
    started = time.perf_counter()
    per_probe = []
    results = []
    for probe in probes:
        t = time.perf_counter()
        results.append(causal_trace(model, [probe], options, **kw))
        per_probe.append(time.perf_counter() - t)
    total = time.perf_counter() - started
    n_tokens = [len(split_probe(model.tokenizer, p.prompt, p.target).prompt_ids) for p in probes]
    print(f"fast: {len(probes)} idioms in {total:.1f} s = {total / len(probes):.2f} s per idiom "
          f"(mean {sum(n_tokens) / len(n_tokens):.1f} prompt tokens; specs {trace_specs(args.sites, args.windows)}, "
          f"{args.samples} samples) -> 100 idioms in {100 * total / len(probes) / 60:.1f} min")

    if args.before > 0:
        before = after = 0.0
        worst = 0.0
        for probe, fast in zip(probes[: args.before], results):
            t = time.perf_counter()
            whole = causal_trace(model, [probe], options, reuse_kv=False, **kw)
            before += time.perf_counter() - t
            after += per_probe[probes.index(probe)]
            worst = max(worst, float((whole.rows["prob"] - fast.rows["prob"]).abs().max()))
        print(f"before (whole-prompt rows): {before:.1f} s on {args.before} idioms; after (keys and values reused): "
              f"{after:.1f} s; speed-up {before / after:.2f}x; largest cell difference {worst:.2e}")

    if args.naive > 0:
        hf = load_hf_model(str(model.source_path))
        masked = masked_token_ids(model.tokenizer, model.d_vocab)
        specs = trace_specs(args.sites, args.windows)
        naive_time = fast_time = 0.0
        worst = 0.0
        naive_samples = args.naive_samples or args.samples
        for probe in probes[: args.naive]:
            t = time.perf_counter()
            result = causal_trace(model, [probe], dataclasses.replace(options, noise_samples=naive_samples), **kw)
            fast_time += time.perf_counter() - t
            tokens = split_probe(model.tokenizer, probe.prompt, probe.target)
            noised = default_noised(len(tokens.prompt_ids), tokens.has_bos)
            noise = trace_noise(probe.id, seed=0, samples=naive_samples, n_positions=len(noised),
                                d_model=model.d_model, sigma=scale.sigma)
            t = time.perf_counter()
            slow = reference_causal_trace(hf, tokens.prompt_ids, noised=noised, noise=noise, specs=specs,
                                          masked_ids=masked)
            naive_time += time.perf_counter() - t
            fast_prob = torch.tensor(result.rows["prob"].to_numpy()).reshape(slow["restored"].shape[:3])
            worst = max(worst, float((fast_prob - slow["restored"].mean(-1).double()).abs().max()))
        print(f"naive loop (one HF forward per sample x cell, {naive_samples} samples): {naive_time:.1f} s on "
              f"{args.naive} idioms; "
              f"fast path {fast_time:.1f} s on the same idioms; speed-up {naive_time / fast_time:.1f}x; "
              f"largest difference in a cell's mean probability {worst:.2e}")


if __name__ == "__main__":
    main()
