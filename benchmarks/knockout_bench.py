"""Time the default knockout grid on the embedded model.

    python benchmarks/knockout_bench.py [N]     # N probes from the bundled idioms (default 100)

Prints the total time and the time per configuration (one configuration = one probe x one
(mode, control, k, window)); the default grid is `knockout_configs(18)` (800 per probe).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from idiom_lens.datasets import load_probes
    from idiom_lens.interventions import knockout_grid, sample_probes
    from idiom_lens.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="number of probes (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    model = load_model("gemma-3-270m")
    probes = sample_probes(load_probes("idioms"), args.n, seed=args.seed)
    started = time.perf_counter()
    result = knockout_grid(model, probes, seed=args.seed, batch_size=args.batch_size, progress=True)
    seconds = time.perf_counter() - started
    n_cfg = result.settings["n_configs"]
    print(f"default grid: {n_cfg} configurations per probe x {len(probes)} probes = {len(result.rows)} runs")
    print(f"total {seconds:.1f} s ({seconds / 60:.2f} min); {1000 * seconds / len(result.rows):.2f} ms per "
          f"configuration; {seconds / len(probes):.2f} s per probe")
    print(result.summary().query("mode == 'zero_top' and k == 100 and window == 1")
          .pivot_table(index="start", columns=["group", "control"], values="changed").round(2).to_string())


if __name__ == "__main__":
    main()
