"""Seeded statistics: permutation test, effect sizes, bootstrap intervals, caliper matching."""

from __future__ import annotations

import numpy as np
import pytest

from idiom_lens.analyses.stats import (
    bootstrap_diff_ci,
    cliffs_delta,
    compare_samples,
    match_nearest,
    permutation_pvalue,
)


def test_permutation_p_is_small_for_a_large_shift() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 30), rng.normal(3, 1, 30)
    p = permutation_pvalue(a, b, n_permutations=5000, seed=0)
    assert p == 1 / 5001  # no relabelling is as extreme; the observed one counts, so never 0
    assert permutation_pvalue(b, a, n_permutations=5000, seed=0) == p  # two-sided: order does not matter
    assert permutation_pvalue(a, b, n_permutations=5000, alternative="greater", seed=0) == p
    assert permutation_pvalue(a, b, n_permutations=5000, alternative="less", seed=0) == 1.0


def test_permutation_p_is_large_and_uniform_under_the_null() -> None:
    """Same distribution: a seeded case has a large p, and over many draws p is roughly uniform
    (about 5% of p-values at or below 0.05, mean about 0.5)."""
    rng = np.random.default_rng(1)
    assert permutation_pvalue(rng.normal(size=25), rng.normal(size=25), seed=2) > 0.2
    ps = np.array([
        permutation_pvalue(rng.integers(0, 8, 12), rng.integers(0, 8, 15), n_permutations=400, seed=i)
        for i in range(400)
    ])
    assert 0.015 <= (ps <= 0.05).mean() <= 0.09
    assert 0.42 <= ps.mean() <= 0.58
    assert permutation_pvalue([3, 3, 3], [3, 3], n_permutations=100) == 1.0  # all relabellings tie


def test_permutation_p_is_seeded() -> None:
    a, b = np.array([1, 2, 2, 3, 4, 5]), np.array([2, 3, 4, 4, 5, 6, 7])
    p = permutation_pvalue(a, b, n_permutations=3000, seed=5)
    assert permutation_pvalue(a, b, n_permutations=3000, seed=5) == p
    assert permutation_pvalue(a, b, n_permutations=3000, seed=6) != p
    # Monte Carlo estimate of the exact p (all C(13, 6) = 1716 splits)
    assert abs(p - _exact_p(a, b)) < 0.02
    assert (p * 3001) == pytest.approx(round(p * 3001))  # a count over n_permutations + 1


def test_permutation_counts_float_ties_as_extreme() -> None:
    """Relabellings giving the observed difference count as extreme even when summed in another
    order (here mean(b) - mean(a) is -0.27499999999999986, the same split summed as in the test
    -0.2749999999999998 in the permutation loop): without a tolerance the p-value falls short of the exact one."""
    a, b = np.array([0.7, 0.7, 0.7]), np.array([0.4, 0.1, 0.7, 0.5])
    assert abs(permutation_pvalue(a, b, n_permutations=20_000, seed=0) - _exact_p(a, b)) < 0.01


def _exact_p(a: np.ndarray, b: np.ndarray) -> float:
    from itertools import combinations

    pooled, n_a = np.concatenate([a, b]).astype(float), len(a)
    observed = abs(b.mean() - a.mean())
    count = total = 0
    for idx in combinations(range(len(pooled)), n_a):
        mask = np.zeros(len(pooled), dtype=bool)
        mask[list(idx)] = True
        count += abs(pooled[~mask].mean() - pooled[mask].mean()) >= observed - 1e-12
        total += 1
    return count / total


def test_permutation_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="two non-empty samples"):
        permutation_pvalue([], [1, 2])
    with pytest.raises(ValueError, match="alternative"):
        permutation_pvalue([1], [2], alternative="bigger")  # type: ignore[arg-type]


def test_effect_sizes_by_hand() -> None:
    """a = [1, 2, 3], b = [2, 4, 6, 20]: medians 2 and 5, means 2 and 8. Pairs (b, a): b=2 beats 1 and
    loses to 3 (net 0); 4, 6 and 20 beat all three (net 9): Cliff's delta 9 / 12 = 0.75."""
    a, b = np.array([1, 2, 3]), np.array([2, 4, 6, 20])
    assert cliffs_delta(a, b) == 0.75
    assert cliffs_delta(b, a) == -0.75
    assert cliffs_delta(a, a) == 0.0
    c = compare_samples(a, b, n_permutations=500, n_boot=500, seed=0)
    assert (c.n_a, c.n_b, c.median_a, c.median_b, c.mean_a, c.mean_b) == (3, 4, 2.0, 5.0, 2.0, 8.0)
    assert (c.median_diff, c.mean_diff, c.cliffs_delta) == (3.0, 6.0, 0.75)
    assert c.mean_diff_low <= 6.0 <= c.mean_diff_high and c.median_diff_low <= 3.0 <= c.median_diff_high
    assert c.p_value == permutation_pvalue(a, b, n_permutations=500, seed=0)
    assert c.to_dict()["alternative"] == "two-sided"


def test_bootstrap_difference_interval() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 200), rng.normal(1, 1, 200)
    (mean_low, mean_high), (med_low, med_high) = bootstrap_diff_ci(a, b, n_boot=2000, seed=4)
    assert mean_low < b.mean() - a.mean() < mean_high
    assert 0.1 < mean_high - mean_low < 0.5  # about 2 * 1.96 * sqrt(2 / 200) = 0.39
    assert med_low < np.median(b) - np.median(a) < med_high
    assert bootstrap_diff_ci(a, b, n_boot=2000, seed=4) == ((mean_low, mean_high), (med_low, med_high))
    assert bootstrap_diff_ci([1, 1], [4, 4, 4], seed=0) == ((3.0, 3.0), (3.0, 3.0))


def test_match_nearest_within_the_caliper_without_replacement() -> None:
    match = match_nearest(np.array([0.5, 0.9, 0.1]), np.array([0.52, 0.1, 0.88, 0.86]), caliper=0.05)
    assert match.tolist() == [0, 2, 1]  # each to its nearest
    assert match_nearest(np.array([0.5]), np.array([0.56, 0.2]), caliper=0.05).tolist() == [-1]
    assert match_nearest(np.array([0.5]), np.array([0.55]), caliper=0.05 + 1e-12).tolist() == [0]
    # one candidate for two treated: exactly one pair, the other treated unit stays unmatched
    two = match_nearest(np.array([0.5, 0.51]), np.array([0.505]), caliper=0.05)
    assert sorted(two.tolist()) == [-1, 0]
    # the visiting order is seeded: same seed, same pairs; across seeds either unit may win
    winners = {int(np.argmax(match_nearest(np.array([0.5, 0.5]), np.array([0.5]), caliper=0.05, seed=s) == 0))
               for s in range(20)}
    assert winners == {0, 1}
    assert match_nearest(np.array([0.5]), np.array([]), caliper=0.05).tolist() == [-1]
