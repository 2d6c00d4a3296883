"""Time the paper's full knockout grid on memorized idioms of the embedded model.

    python benchmarks/knockout_bench.py [N] [--workers 2] [--controls random matched whole_mlp]

1. Memorization of every bundled idiom (greedy prediction == first target token), untimed.
2. A seeded sample of N memorized idioms (default 100).
3. The paper's grid (`knockout_grid` with `KnockoutGrid.PAPER`: top-k for k in 1, 10, 100, 1000 in windows
   of 1-5 layers, all-but-top-k for k in 10, 100, 1000 in windows of 1-3; 473 configurations per
   probe on 18 layers) at the authors' positions (every prompt position), targeted only unless
   --controls is given, timed. The probes are split across --workers processes of one thread
   each (default 2: the 2 cores of the reference machine; one process with two threads loses
   to thread contention on a shared machine), each loading the model itself (counted).

Prints the measured time, the time per configuration (one probe x one configuration) and a
summary of the share of predictions changed.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def _worker(args: tuple[list, list[str], int, int, str]) -> tuple:
    """One process: load the model, one thread, the full grid on its probes."""
    probes, controls, seed, batch_size, positions = args
    import torch

    torch.set_num_threads(1)
    from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions, knockout_grid
    from idiom_lens.models.loading import load_model

    model = load_model("gemma-3-270m", progress=False)
    options = KnockoutOptions(grid=KnockoutGrid.PAPER, controls=tuple(controls), positions=positions, seed=seed)
    result = knockout_grid(model, probes, options, batch_size=batch_size)
    return result.rows, result.probes, result.settings


def main() -> None:
    from idiom_lens.analyses.interventions import KnockoutResult
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.selection import sample_probes
    from idiom_lens.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="memorized idioms (default 100)")
    parser.add_argument("--workers", type=int, default=2, help="processes of one thread each (default 2)")
    parser.add_argument("--controls", nargs="*", default=[], choices=("random", "matched", "whole_mlp"),
                        help="controls beside the paper's targeted grid (default: none, as in the paper)")
    parser.add_argument("--positions", choices=("all", "last"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # the workers are processes; threads contend on a shared machine
    started = time.perf_counter()
    model = load_model("gemma-3-270m", progress=False)
    idioms = list(load_probes("idioms"))
    memo = score_memorization(model, idioms, batch_size=32)
    memorized_ids = {r.probe_id for r in memo.records if r.memorized}
    memorized = [p for p in idioms if p.id in memorized_ids]
    probes = sample_probes(memorized, args.n, seed=args.seed)
    print(f"memorization: {len(memorized)} of {len(idioms)} bundled idioms memorized by gemma-3-270m "
          f"({time.perf_counter() - started:.0f} s, untimed); {len(probes)} sampled (seed {args.seed})")

    workers = max(1, min(args.workers, len(probes)))
    shares = [probes[i::workers] for i in range(workers)]
    jobs = [(share, args.controls, args.seed, args.batch_size, args.positions) for share in shares]
    started = time.perf_counter()
    if workers == 1:
        torch.set_num_threads(1)
        parts = [_worker(jobs[0])]
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_worker, jobs))
    seconds = time.perf_counter() - started
    result = KnockoutResult.join_parts([KnockoutResult(rows=r, probes=p, settings=s) for r, p, s in parts])
    settings = parts[0][2]
    n_cfg = settings["n_configs"]
    n_runs = len(result.rows)
    print(f"paper's full grid ({'targeted only' if not args.controls else 'targeted + ' + ', '.join(args.controls)}), "
          f"positions={args.positions}, rank_by={settings['rank_by']}, norm={settings['norm']}: {n_cfg} configurations "
          f"per probe x {len(probes)} probes = {n_runs} runs")
    print(f"{workers} worker process(es) x 1 thread on {os.cpu_count()} cores; fast path: {settings['fast_path']}")
    print(f"total {seconds:.1f} s ({seconds / 60:.2f} min, model loads included); "
          f"{1000 * seconds / n_runs:.2f} ms per configuration (wall clock); {seconds / len(probes):.2f} s per probe; "
          f"budget 15 min: {'met' if seconds <= 900 else 'NOT met'}")
    inside = [part[2]["seconds"] for part in parts]
    print(f"inside knockout_grid (after each worker's model load and self-check): "
          f"{', '.join(f'{x:.1f} s' for x in inside)} for {', '.join(str(len(share)) for share in shares)} probes")
    still = (result.probes["group"] == "memorized idioms").sum()
    print(f"memorized under the knockout's own masked prediction: {still} of {len(probes)}")
    summary = result.summary()
    mem = summary[summary["group"] == "memorized idioms"]
    for mode in ("zero_top", "keep_top"):
        part = mem[(mem["mode"] == mode) & (mem["control"] == "targeted")]
        table = part.pivot_table(index="k", columns="window", values="changed", aggfunc="mean").round(3)
        print(f"{mode}: mean share changed over start layers (rows k, columns window length)")
        print(table.to_string())
    layers = mem[(mem["mode"] == "zero_top") & (mem["k"] == 100) & (mem["window"] == 1)]
    print("zero_top k=100, windows of one layer: share changed per layer, per control")
    print(layers.pivot_table(index="control", columns="start", values="changed").round(2).to_string())


if __name__ == "__main__":
    main()
