"""What the prefix key/value cache buys, and what the whole-prompt fallback costs.

    python benchmarks/prefix_cache_bench.py [N]     # N bundled idioms (default 20)

Runs the same last-position knockout grid (k = 10 and 100, windows of 1-3 layers, targeted and
random) on the embedded model twice: with the prefix cache (where the installed versions honour
it) and with whole prompts (the fallback used where they do not, e.g. transformers 5.24). Prints
both times, their ratio, and the largest difference between the two results.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock


def main() -> None:
    import numpy as np

    from idiom_lens.analyses.interventions import KnockoutGrid, KnockoutOptions, knockout_grid
    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.selection import sample_probes
    from idiom_lens.models import selfcheck
    from idiom_lens.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=20, help="number of idioms (default 20)")
    args = parser.parse_args()

    print(selfcheck.versions_text())
    model = load_model("gemma-3-270m")
    if not selfcheck.prefix_cache_works(model):
        raise SystemExit("the prefix cache is ignored under these versions: nothing to compare (use the lock)")
    probes = sample_probes(load_probes("idioms"), args.n, seed=0)
    grid = KnockoutGrid(ks=(10, 100), windows=(1, 2, 3), modes=("zero_top",), keep_top_ks=None)
    options = KnockoutOptions(grid=grid, positions="last")
    knockout_grid(model, probes[:1], options)  # warm-up

    times, results = {}, {}
    for name, works in (("prefix cache", True), ("whole prompts", False)):
        with mock.patch("idiom_lens.models.runners.prefix_cache_works", lambda m, works=works: works):
            started = time.perf_counter()
            results[name] = knockout_grid(model, probes, options).rows
            times[name] = time.perf_counter() - started
    n_rows = len(results["prefix cache"])
    for name, seconds in times.items():
        print(f"{name:>14}: {seconds:7.1f} s for {n_rows} configurations ({1000 * seconds / n_rows:.2f} ms each)")
    print(f"whole prompts / prefix cache: {times['whole prompts'] / times['prefix cache']:.2f}x")
    a, b = results["prefix cache"], results["whole prompts"]
    print(f"same predictions: {bool(np.array_equal(a['new_pred_id'], b['new_pred_id']))}; largest probability "
          f"difference: {np.abs(a['prob_of_clean_pred'] - b['prob_of_clean_pred']).max():.2e}")


if __name__ == "__main__":
    main()
