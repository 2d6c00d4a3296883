"""Time exact activation patching against attribution patching on memorized idioms, and measure
how well the estimate agrees with the exact numbers.

    python benchmarks/attribution_patching_bench.py [--n 20] [--seed 0] [--batch-size 64] [--out DIR]

1. Memorization of every bundled idiom by the embedded Gemma 3 270M (greedy prediction == first
   target token), untimed; a seeded sample of N memorized idioms (default 20).
2. word_swap pairs (`make_corruptions`, the same pairs for both methods).
3. Exact patching (`patch_probes`: one patched row per site, layer and position, in batches) and
   attribution patching (`attribution_patch_probes`: one clean forward, one corrupted forward and
   backward per pair), each timed on the wall clock, self-checks included.
4. `patching_agreement`, over the (layer, position) cells from the swapped word on (the cells
   before it are zero in both methods by construction, "structural zeros", and are left out
   unless `--keep-structural-zeros`; how many is printed): per site, the mean over pairs of the
   Pearson and Spearman correlations of the restored shares, the top-k overlap by |restored|
   (k = `--top`), the recall of the exact top-k cells among the attribution top `--shortlist`,
   and the largest exact cell (its exact value, its attribution estimate, the rank attribution
   gives it), each with a 95% percentile-bootstrap interval; the correlations pooled over every
   kept cell; and, for comparison, the correlations over all cells, structural zeros included.

Prints the command line, N and the machine's thread count: timings on a shared machine vary.
With `--out DIR` it also writes `DIR/agreement.parquet` (the whole table), its two views
`DIR/agreement_correlations.parquet` and `DIR/agreement_top_cells.parquet`, the per-pair rows
`DIR/agreement_pairs.parquet`, both patching results (`DIR/exact/`, `DIR/attribution/`: load
them with `PatchingResult.load` to compare them again) and `DIR/bench.json` (the command, n,
pairs, cells and timings), which `experiments/regenerate.py` publishes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any


def print_agreement(agreement: Any) -> None:
    """The agreement's counts, its two views (correlations; top cells) and one line per site."""
    import pandas as pd

    settings = agreement.settings
    top, shortlist = settings["top"], settings["shortlist"]
    n_all = settings["n_cells"] + settings["n_excluded"]
    print(f"agreement over {settings['n_valid_pairs']} valid pairs: {settings['n_cells']} of {n_all} cells compared, "
          f"{settings['n_excluded']} structural zeros ({settings['n_excluded'] / max(n_all, 1):.0%}) "
          f"{'left out' if settings['exclude_structural_zeros'] else 'kept'}; means over pairs with 95% bootstrap "
          "intervals; 'all' = every site's cells together; n_correlated: pairs whose compared exact values are "
          f"not all equal (within {settings['atol']:g}), the only ones with correlations, overlap and recall")
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print("correlations (the '_all_cells' columns include the structural zeros):")
        print(agreement.correlations().round(3).to_string(index=False))
        print(f"top cells (overlap: top-{top} against top-{top}; recall: exact top-{top} among the attribution "
              f"top-{shortlist}; largest: the largest exact cell, rank 1 = attribution's first):")
        print(agreement.top_cells().round(3).to_string(index=False))
    for row in agreement.summary().itertuples():
        print(f"  {row.site:9s} Pearson {row.correlation:.2f} [{row.correlation_low:.2f}, {row.correlation_high:.2f}] "
              f"(all cells {row.correlation_all_cells:.2f}), Spearman {row.spearman:.2f} [{row.spearman_low:.2f}, "
              f"{row.spearman_high:.2f}], top-{top} overlap {row.overlap:.2f}, recall {row.recall:.2f}; "
              f"largest exact cell {row.largest_exact:.2f} estimated {row.largest_approx:.2f}, ranked "
              f"{row.largest_rank:.1f} (median {row.largest_rank_median:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="memorized idioms (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="sample and corruption seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="exact patching's rows per forward (default 64)")
    parser.add_argument("--top", type=int, default=5, help="cells compared by the top-k overlap (default 5)")
    parser.add_argument("--shortlist", type=int, default=20,
                        help="attribution cells searched for the exact top-k cells by the recall (default 20)")
    parser.add_argument("--keep-structural-zeros", action="store_true",
                        help="compare every cell, also those before the swapped word (zero in both methods)")
    parser.add_argument("--out", type=Path, default=None, help="write agreement.parquet and bench.json here")
    args = parser.parse_args()

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

    agreement = patching_agreement(exact, approx, top=args.top, shortlist=args.shortlist, seed=args.seed,
                                   exclude_structural_zeros=not args.keep_structural_zeros)
    print_agreement(agreement)
    settings = agreement.settings
    if args.out is not None:
        from idiom_lens.io import write_json, write_parquet

        write_parquet(args.out / "agreement.parquet", agreement.summary())
        write_parquet(args.out / "agreement_correlations.parquet", agreement.correlations())
        write_parquet(args.out / "agreement_top_cells.parquet", agreement.top_cells())
        write_parquet(args.out / "agreement_pairs.parquet", agreement.to_dataframe())
        exact.save(args.out / "exact")  # both results, to compare them again without rerunning
        approx.save(args.out / "attribution")
        write_json(args.out / "bench.json", {
            "command": shlex.join(["python", "benchmarks/attribution_patching_bench.py", *sys.argv[1:]]),
            "n_idioms": len(probes), "n_memorized": len(memorized), "n_pairs": n_pairs,
            "n_valid_pairs": int(settings["n_valid_pairs"]), "top": args.top, "shortlist": args.shortlist,
            "exclude_structural_zeros": settings["exclude_structural_zeros"], "n_cells": settings["n_cells"],
            "n_excluded": settings["n_excluded"], "atol": settings["atol"],
            "exact_seconds": round(exact_s, 1), "attribution_seconds": round(approx_s, 1),
            "threads": torch.get_num_threads(), "model": model.settings()})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
