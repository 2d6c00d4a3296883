"""Time per probe of direct logit attribution vs the trajectory and `score_memorization`.

    python benchmarks/attribution_bench.py [--model gemma-3-270m] [--n 64] [--batch-size 16]

Both run on the same probes (the first N bundled idioms) with the same batch size, after one
warm-up call each; prints seconds per probe and the ratio attribution / memorization, for the
default attribution (top 20 neurons, 5 promoted tokens each) and without the value-vector reading.
The issue's budget: attribution at most about twice the trajectory's time per probe.
"""

from __future__ import annotations

import argparse
import time


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", default="idioms")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from idiom_lens.analyses.attribution import attribute_probes
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.analyses.trajectory import layer_trajectory
    from idiom_lens.datasets import load_probes
    from idiom_lens.models.loading import load_model

    probes = list(load_probes(args.dataset))[: args.n]
    raw = load_model(args.model, mode="raw", progress=False)
    compat = load_model(args.model, mode="compat", progress=False)
    print(f"model {args.model}, {len(probes)} probes, batch size {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    runs = {
        "layer_trajectory (raw, resid_post)": lambda: layer_trajectory(
            raw, probes, sites=["resid_post"], batch_size=args.batch_size),
        "score_memorization (raw)": lambda: score_memorization(raw, probes, batch_size=args.batch_size),
        "score_memorization (compat)": lambda: score_memorization(compat, probes, batch_size=args.batch_size),
        "attribute_probes (top 20, 5 promoted)": lambda: attribute_probes(compat, probes, batch_size=args.batch_size),
        "attribute_probes (top 20, no promoted)": lambda: attribute_probes(
            compat, probes, batch_size=args.batch_size, promoted_tokens=0),
    }
    per_probe = {}
    for name, fn in runs.items():
        fn()  # warm-up
        per_probe[name] = _time(fn, args.repeats) / len(probes)
        print(f"{name:<42} {1000 * per_probe[name]:8.1f} ms/probe")
    base = per_probe["score_memorization (compat)"]
    trajectory = per_probe["layer_trajectory (raw, resid_post)"]
    for name in [n for n in runs if n.startswith("attribute_probes")]:
        print(f"ratio {name} / score_memorization (compat): {per_probe[name] / base:.2f}")
        print(f"ratio {name} / layer_trajectory: {per_probe[name] / trajectory:.2f} (budget: about 2)")
    print(f"ratio attribute_probes (top 20, 5 promoted) / score_memorization (raw): "
          f"{per_probe['attribute_probes (top 20, 5 promoted)'] / per_probe['score_memorization (raw)']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
