"""Time exact activation patching against attribution patching on memorized idioms, and measure
how well the estimate agrees with the exact numbers.

    python benchmarks/attribution_patching_bench.py [--n 20] [--seed 0] [--batch-size 64] [--out DIR]

1. Memorization of every bundled idiom by the embedded Gemma 3 270M (greedy prediction == first
   target token), untimed; a seeded sample of N memorized idioms (default 20).
2. word_swap pairs (`make_corruptions`, the same pairs for both methods).
3. Exact patching (`patch_probes`: one patched row per site, layer and position, in batches) and
   attribution patching (`attribution_patch_probes`: one clean forward, one corrupted forward and
   backward per pair), each timed on the wall clock, self-checks included.
4. `patching_agreement`: per site, the mean over pairs of the Pearson correlation of the restored
   shares over (layer, position) cells and of the top-5 overlap by |restored|, with 95%
   percentile-bootstrap intervals, and the correlation pooled over every cell.

Prints the command line, N and the machine's thread count: timings on a shared machine vary.
With `--out DIR` it also writes `DIR/agreement.parquet` (the table) and `DIR/bench.json` (the
command, n, pairs and timings), which `experiments/regenerate.py` publishes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="memorized idioms (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sample and corruption seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="exact patching's rows per forward (default 64)")
    parser.add_argument("--top", type=int, default=5, help="cells compared by the top-k overlap (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="write agreement.parquet and bench.json here")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from idiom_lens.analyses.interventions import CorruptionOptions, PatchingOptions, patch_probes
    from idiom_lens.analyses.interventions.attribution_patching import attribution_patch_probes, patching_agreement
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.selection import sample_probes
    from idiom_lens.models.loading import load_model

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{os.cpu_count()} cores on this machine, {len(os.sched_getaffinity(0))} usable by this process")
    started = time.perf_counter()
    model = load_model("gemma-3-270m", progress=False)
    idioms = list(load_probes("idioms"))
    memo = score_memorization(model, idioms, batch_size=32)
    memorized_ids = {r.probe_id for r in memo.records if r.memorized}
    memorized = [p for p in idioms if p.id in memorized_ids]
    probes = sample_probes(memorized, args.n, seed=args.seed)
    print(f"n = {len(probes)} memorized idioms sampled (seed {args.seed}) of {len(memorized)} memorized among "
          f"{len(idioms)} bundled; model load and memorization {time.perf_counter() - started:.0f} s (untimed)")

    options = PatchingOptions(corruption=CorruptionOptions(variants=("word_swap",), seed=args.seed))
    timed = {}
    for name, run in (("exact", patch_probes), ("attribution", attribution_patch_probes)):
        started = time.perf_counter()
        result = run(model, probes, options, batch_size=args.batch_size)  # type: ignore[operator]
        timed[name] = (result, time.perf_counter() - started)
    exact, exact_s = timed["exact"]
    approx, approx_s = timed["attribution"]
    n_pairs, n_cells = len(exact.pairs), len(exact.rows)
    print(f"word_swap pairs: {n_pairs} ({len(exact.skipped)} skipped), {int(exact.pairs['valid'].sum())} valid; "
          f"{n_cells} (site, layer, position) cells in all, {n_cells / max(n_pairs, 1):.0f} per pair")
    print(f"exact patching:       {exact_s:7.1f} s ({exact_s / max(n_pairs, 1):.2f} s per pair)")
    print(f"attribution patching: {approx_s:7.1f} s ({approx_s / max(n_pairs, 1):.2f} s per pair)")
    print(f"measured speed ratio (exact / attribution, wall clock): {exact_s / approx_s:.1f}x")

    agreement = patching_agreement(exact, approx, top=args.top, seed=args.seed)
    table = agreement.summary()
    with pd.option_context("display.width", 200):
        print(f"agreement over {agreement.settings['n_valid_pairs']} valid pairs (means over pairs, 95% bootstrap "
              f"intervals; 'all' = every site's cells together):")
        print(table.round(3).to_string(index=False))
    for row in table.itertuples():
        print(f"  {row.site:9s} correlation {row.correlation:.2f} [{row.correlation_low:.2f}, "
              f"{row.correlation_high:.2f}], top-{args.top} overlap {row.overlap:.2f} [{row.overlap_low:.2f}, "
              f"{row.overlap_high:.2f}], pooled correlation {row.pooled_correlation:.2f}")
    if args.out is not None:
        from idiom_lens.io import write_json, write_parquet

        write_parquet(args.out / "agreement.parquet", table)
        write_json(args.out / "bench.json", {
            "command": shlex.join(["python", "benchmarks/attribution_patching_bench.py", *sys.argv[1:]]),
            "n_idioms": len(probes), "n_memorized": len(memorized), "n_pairs": n_pairs,
            "n_valid_pairs": int(agreement.settings["n_valid_pairs"]), "top": args.top,
            "exact_seconds": round(exact_s, 1), "attribution_seconds": round(approx_s, 1),
            "threads": torch.get_num_threads(), "model": model.settings()})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
