"""Embedded-model loading: first build from the PyPI wheel, load from the cache, peak memory.

Each measurement runs in a fresh Python process, so imports and caches are cold as a user meets
them. The first build goes to a temporary cache (IDIOM_LENS_CACHE), so the real cache is left
alone.

    python benchmarks/load_bench.py [--repeats 3] [--skip-build]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, time
t0 = time.perf_counter()
import torch, transformers, transformer_lens.model_bridge  # noqa: F401
t1 = time.perf_counter()
from idiom_lens.models.loading import load_model
model = load_model("gemma-3-270m", mode=MODE, progress=False)
t2 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "load_s": t2 - t1,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def child(mode: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.replace("MODE", repr(mode))], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-build", action="store_true", help="only time loads from the existing cache")
    args = parser.parse_args()
    env = dict(os.environ)
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as cache:
            first = child("raw", {**env, "IDIOM_LENS_CACHE": cache})
            print(f"first build from the wheel (assemble + dequantize + save + boot): "
                  f"{first['load_s']:.1f} s, peak RSS {first['peak_rss_gib']:.2f} GiB")
    for mode in ("raw", "compat"):
        runs = [child(mode, env) for _ in range(args.repeats)]
        load = statistics.median(r["load_s"] for r in runs)
        imports = statistics.median(r["imports_s"] for r in runs)
        peak = max(r["peak_rss_gib"] for r in runs)
        print(f"load from cache, mode={mode}: {load:.2f} s (median of {args.repeats}; imports before it "
              f"{imports:.2f} s, not counted), peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
