"""benchmarks/ray_bench.py's speed-up: a ratio of medians with a bootstrap interval over repeats and
the range over every pair of runs, by hand (the benchmark itself needs Ray and minutes)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "ray_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ray_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ray_bench"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)  # imports neither Ray nor the model: main() does
        yield module
    finally:
        sys.modules.pop("ray_bench", None)


def test_equal_runs_give_one_ratio(bench):
    got = bench.speedup([2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    assert (got.ratio, got.ratio_low, got.ratio_high, got.pair_min, got.pair_max) == (2.0, 2.0, 2.0, 2.0, 2.0)
    assert (got.n_slow, got.n_fast) == (3, 3)


def test_speedup_by_hand(bench):
    slow, fast = [10.0, 12.0, 14.0, 11.0, 13.0], [5.0, 6.0, 7.0, 6.5, 5.5]
    got = bench.speedup(slow, fast, n_boot=4000, seed=1)
    assert got.ratio == 12.0 / 6.0  # medians 12 and 6
    assert (got.pair_min, got.pair_max) == (10.0 / 7.0, 14.0 / 5.0)
    # a resampled median is one of the runs, so every bootstrap ratio lies in the pairs' range
    assert got.pair_min <= got.ratio_low < got.ratio < got.ratio_high <= got.pair_max
    assert got == bench.speedup(slow, fast, n_boot=4000, seed=1)  # seeded
    assert "2.00x (95% bootstrap [" in got.text() and "over 5 and 5 runs" in got.text()


def test_one_run_each_has_no_spread(bench):
    got = bench.speedup([3.0], [2.0])
    assert got.ratio == got.ratio_low == got.ratio_high == got.pair_min == got.pair_max == 1.5
    with pytest.raises(ValueError, match="positive times"):
        bench.speedup([], [1.0])
    assert np.isfinite(bench.speedup([1.0, 2.0], [0.5]).ratio_high)
