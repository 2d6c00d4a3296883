"""Seeded statistics: permutation tests, effect sizes, bootstrap intervals, caliper matching,
adjusted p-values, paired and per-layer tests, covariate-adjusted differences."""

from __future__ import annotations

import numpy as np
import pytest

from idiom_lens.analyses.stats import (
    adjust,
    adjusted_difference,
    band_means,
    band_values,
    benjamini_hochberg,
    bootstrap_diff_ci,
    cliffs_delta,
    compare_samples,
    depth_bands,
    holm,
    match_nearest,
    max_t_test,
    paired_comparison,
    permutation_pvalue,
    quantile_strata,
    sign_flip_pvalue,
    stratified_difference,
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


# --------------------------------------------------------------------------------------
# Adjusted p-values
# --------------------------------------------------------------------------------------


def test_holm_and_bh_against_r() -> None:
    """R: p.adjust(c(0.01, 0.02, 0.03, 0.04, 0.05), "holm") is 0.05 0.08 0.09 0.09 0.09 and "BH" is
    0.05 five times. The order of the input is kept."""
    p = [0.01, 0.02, 0.03, 0.04, 0.05]
    np.testing.assert_allclose(holm(p), [0.05, 0.08, 0.09, 0.09, 0.09])
    np.testing.assert_allclose(benjamini_hochberg(p), [0.05] * 5)
    np.testing.assert_allclose(holm(p[::-1]), [0.09, 0.09, 0.09, 0.08, 0.05])
    np.testing.assert_allclose(adjust(p, "holm"), holm(p))
    np.testing.assert_allclose(adjust(p, "bh"), benjamini_hochberg(p))
    # Holm caps at 1; a single test is unchanged by both
    np.testing.assert_allclose(holm([0.3, 0.6]), [0.6, 0.6])
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])
    assert holm([0.02]).tolist() == benjamini_hochberg([0.02]).tolist() == [0.02]


def test_benjamini_hochberg_on_the_mcdonald_example() -> None:
    """The 25 p-values of McDonald's Handbook of Biological Statistics ("Multiple comparisons": diet
    and mammographic density, Garcia-Arenzana et al. 2014). The handbook's published reading with
    Q = 0.25: the largest p below its critical value (i/m)Q is proteins, 0.042 < 0.050 (nuts: 0.060
    is not below 0.060), so the first five are significant. Adjusted p-values, from the formula
    min over j >= i of m p_(j) / j by hand: 25 x 0.001 = 0.025; 12.5 x 0.008 = 0.1; tests 3-5 take
    5 x 0.042 = 0.21; nuts 25 x 0.06 / 6 = 0.25; 25 x 0.074 / 7 = 0.264286; tests 8-14 take
    25 x 0.275 / 14 = 0.491071; 15-16: 25 x 0.341 / 16 = 0.532813; 17: 25 x 0.384 / 17 = 0.564706;
    18-19: 25 x 0.594 / 19 = 0.781579; 20: 25 x 0.696 / 20 = 0.87; 21: 25 x 0.762 / 21 = 0.907143;
    22-25: 0.986 (25 x 0.986 / 25, smaller than 25 x 0.94 / 22 = 1.068)."""
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216, 0.222, 0.251, 0.269, 0.275,
         0.34, 0.341, 0.384, 0.569, 0.594, 0.696, 0.762, 0.94, 0.942, 0.975, 0.986]
    expected = ([0.025, 0.1] + [0.21] * 3 + [0.25, 0.264286] + [0.491071] * 7 + [0.532813] * 2
                + [0.564706] + [0.781579] * 2 + [0.87, 0.907143] + [0.986] * 4)
    adjusted = benjamini_hochberg(p)
    np.testing.assert_allclose(adjusted, expected, atol=1e-6)
    assert (adjusted[:5] < 0.25).all() and (adjusted[5:] >= 0.25 - 1e-12).all()  # the handbook's five
    # shuffled input: the same adjusted value for each p
    order = np.random.default_rng(0).permutation(len(p))
    np.testing.assert_allclose(benjamini_hochberg(np.array(p)[order]), adjusted[order])


def test_adjustment_passes_nan_through_and_does_not_count_it() -> None:
    """A test that was not run (NaN) stays NaN and the family is the others: m = 2 here, not 3."""
    out = holm([0.01, np.nan, 0.04])
    assert np.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.04])
    out = benjamini_hochberg([np.nan, 0.01, 0.04])
    np.testing.assert_allclose(out[1:], [0.02, 0.04])
    assert np.isnan(out[0])
    assert holm([]).shape == (0,) and np.isnan(holm([np.nan])).all()
    with pytest.raises(ValueError, match="method"):
        adjust([0.1], "bonferroni")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


# --------------------------------------------------------------------------------------
# Matched pairs
# --------------------------------------------------------------------------------------


def test_paired_comparison_exact_sign_flips_by_hand() -> None:
    """Five pairs, every difference positive: of the 2**5 sign patterns only all-plus and all-minus
    are as extreme, p = 2 / 32 exactly. Differences 1, 2, 3, 4, 5: mean and median 3."""
    a, b = np.zeros(5), np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    c = paired_comparison(a, b, n_permutations=10_000, n_boot=500, seed=0)
    assert (c.n_pairs, c.mean_diff, c.median_diff, c.mean_a, c.mean_b) == (5, 3.0, 3.0, 0.0, 3.0)
    assert (c.p_value, c.exact, c.n_permutations) == (2 / 32, True, 32)
    assert c.mean_diff_low <= 3.0 <= c.mean_diff_high and 1.0 <= c.median_diff_low <= c.median_diff_high <= 5.0
    assert paired_comparison(b, a, n_boot=50).p_value == 2 / 32  # two-sided
    assert paired_comparison(a, b, alternative="greater", n_boot=50).p_value == 1 / 32
    assert paired_comparison(a, b, alternative="less", n_boot=50).p_value == 1.0
    assert paired_comparison(a, a, n_boot=50).p_value == 1.0  # every pattern ties with 0


def test_sign_flip_p_against_enumeration() -> None:
    """Mixed signs, by enumeration in the test; Monte Carlo (2**12 patterns > 2000 draws) near the exact p."""
    from itertools import product

    def exact(d: np.ndarray) -> float:
        observed = abs(d.mean())
        hits = [abs((np.array(s) * d).mean()) >= observed - 1e-12 for s in product([1, -1], repeat=len(d))]
        return sum(hits) / len(hits)

    d = np.array([1.0, -2.0, 3.0, 0.5, 2.5, -0.5])
    assert sign_flip_pvalue(d, n_permutations=64) == (pytest.approx(exact(d)), True)  # float64: default approx
    d12 = np.random.default_rng(2).normal(0.5, 1.0, 12)
    p, is_exact = sign_flip_pvalue(d12, n_permutations=2000, seed=1)
    assert not is_exact and abs(p - exact(d12)) < 0.02
    assert sign_flip_pvalue(d12, n_permutations=2000, seed=1)[0] == p  # seeded
    with pytest.raises(ValueError, match="same, non-zero number"):
        paired_comparison([1.0, 2.0], [1.0])


def test_paired_test_is_more_powerful_than_unpaired_on_pairs() -> None:
    """Pairs that share most of their variation: the unpaired test cannot see a small shift, the paired one can."""
    rng = np.random.default_rng(4)
    base = rng.normal(0, 5, 40)
    a, b = base + rng.normal(0, 0.3, 40), base + 0.5 + rng.normal(0, 0.3, 40)
    assert paired_comparison(a, b, n_boot=200).p_value < 0.001
    assert permutation_pvalue(a, b, n_permutations=2000) > 0.3


# --------------------------------------------------------------------------------------
# Per-layer profiles
# --------------------------------------------------------------------------------------


def test_max_t_by_hand_on_three_pairs() -> None:
    """Paired differences of 3 pairs at 2 layers: layer 0 [1, 1, 1], layer 1 [3, 0, 0]; the 8 sign
    patterns are enumerated. Unstudentized: layer 0's |mean| is 1 for all-plus and all-minus only
    (p = 2/8), layer 1's is 1 under every pattern (p = 1); the maximum over layers is always >= 1,
    so layer 0 adjusted for the family is 1. Studentized: layer 0 has no spread, t = inf only for
    all-plus and all-minus, which no pattern at layer 1 (t = 1 always) reaches: adjusted 2/8."""
    a = np.zeros((3, 2))
    b = np.array([[1.0, 3.0], [1.0, 0.0], [1.0, 0.0]])
    raw = max_t_test(a, b, paired=True, studentize=False, n_permutations=100)
    assert raw.exact and raw.n_permutations == 8
    np.testing.assert_allclose(raw.p_value, [0.25, 1.0])
    np.testing.assert_allclose(raw.p_adjusted, [1.0, 1.0])
    np.testing.assert_allclose(raw.difference, [1.0, 1.0])
    student = max_t_test(a, b, paired=True, n_permutations=100)
    np.testing.assert_allclose(student.statistic, [np.inf, 1.0])
    np.testing.assert_allclose(student.p_value, [0.25, 1.0])
    np.testing.assert_allclose(student.p_adjusted, [0.25, 1.0])
    assert (student.peak_layer, student.peak_p) == (0, 0.25)


def test_max_t_finds_a_real_effect_at_one_layer() -> None:
    """Two sets, 12 layers, a shift of 1.5 SD at layer 7 only: small adjusted p there, large elsewhere;
    the peak is layer 7 and its p accounts for the 12 layers it was chosen from."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(40, 12))
    b[:, 7] += 1.5
    t = max_t_test(a, b, n_permutations=2000, seed=1)
    assert t.p_adjusted[7] < 0.01 and (np.delete(t.p_adjusted, 7) > 0.2).all()
    assert (t.peak_layer, t.peak_p) == (7, t.p_adjusted[7])
    assert (t.p_adjusted >= t.p_value).all()
    frame = t.to_frame()
    assert frame["layer"].tolist() == list(range(12)) and frame.loc[7, "p_adjusted"] == t.p_adjusted[7]
    np.testing.assert_allclose(t.difference, b.mean(0) - a.mean(0))
    # the same as matched pairs (row i of a with row i of b)
    paired = max_t_test(a, b, paired=True, n_permutations=2000, seed=1)
    assert paired.p_adjusted[7] < 0.01 and paired.peak_layer == 7


def test_max_t_under_the_null() -> None:
    """No effect: every adjusted p >= its unadjusted p, and the smallest unadjusted p over 20 layers
    is not small once adjusted. A column of equal values gives statistic 0 and p = 1."""
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(25, 20)), rng.normal(size=(30, 20))
    a[:, 3] = b[:, 3] = 2.0
    t = max_t_test(a, b, n_permutations=2000, seed=0)
    assert (t.p_adjusted >= t.p_value).all()
    assert t.p_adjusted.min() > 0.05
    assert t.statistic[3] == 0.0 and t.p_value[3] == 1.0
    # unstudentized, one layer: the per-layer p is the two-sample permutation p (exact, by enumeration)
    small_a, small_b = np.array([[1.0], [2.0], [2.0], [3.0]]), np.array([[2.0], [4.0], [5.0], [5.0], [6.0]])
    one = max_t_test(small_a, small_b, studentize=False, n_permutations=5000, seed=3)
    assert abs(one.p_value[0] - _exact_p(small_a.ravel(), small_b.ravel())) < 0.02
    assert one.p_value[0] == one.p_adjusted[0]  # a family of one layer
    with pytest.raises(ValueError, match="same layers"):
        max_t_test(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 2 probes"):
        max_t_test(np.zeros((1, 2)), np.zeros((3, 2)))


def test_depth_bands_and_band_means_by_hand() -> None:
    """Thirds of 8 layers are 0-2, 3-5, 6-7. Two probes over 6 layers, thirds 0-1, 2-3, 4-5: probe
    means per band (0.5, 2.5, 4.5) and (2.5, 4.5, 6.5), so band means 1.5, 3.5, 5.5."""
    assert depth_bands(8) == {"early": range(0, 3), "middle": range(3, 6), "late": range(6, 8)}
    assert depth_bands(30)["late"] == range(20, 30)
    assert depth_bands(4, names=("low", "high")) == {"low": range(0, 2), "high": range(2, 4)}
    values = np.array([[0.0, 1, 2, 3, 4, 5], [2.0, 3, 4, 5, 6, 7]])
    bands = depth_bands(6)
    np.testing.assert_allclose(band_values(values, bands), [[0.5, 2.5, 4.5], [2.5, 4.5, 6.5]])
    table = band_means(values, bands, n_boot=200)
    assert table["band"].tolist() == ["early", "middle", "late"]
    assert table["first_layer"].tolist() == [0, 2, 4] and table["last_layer"].tolist() == [1, 3, 5]
    np.testing.assert_allclose(table["mean"], [1.5, 3.5, 5.5])
    assert (table["mean_low"] >= table["mean"] - 1.0).all() and (table["mean_high"] <= table["mean"] + 1.0).all()
    assert (table["n"] == 2).all() and (table["n_layers"] == 2).all()
    with pytest.raises(ValueError, match="cannot make"):
        depth_bands(2)


# --------------------------------------------------------------------------------------
# Covariate-adjusted differences
# --------------------------------------------------------------------------------------


def _confounded(effect: float, *, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5 covariate levels, 20 probes each pooled; set a mostly at high levels, b mostly at low ones;
    value = 2 x covariate level (+ `effect` in set b) (+ noise)."""
    levels = np.repeat(np.arange(5.0), 20)
    is_a = np.concatenate([np.arange(20) < k for k in (2, 6, 10, 14, 18)])  # a: 2, 6, 10, 14, 18 per level
    rng = np.random.default_rng(seed)
    values = 2.0 * levels + np.where(is_a, 0.0, effect) + rng.normal(0, noise, len(levels))
    return values, is_a, levels


def test_stratified_difference_removes_a_covariate_only_difference() -> None:
    """Raw: set b sits at lower levels, so mean(b) - mean(a) = 2 x (mean level b - mean level a)
    = 2 x (60 / 50 - 140 / 50) = -3.2; within each level (one stratum each) the difference is 0."""
    values, is_a, levels = _confounded(0.0)
    assert quantile_strata(levels, 5).tolist() == levels.astype(int).tolist()
    r = stratified_difference(values, is_a, levels, n_permutations=500, n_boot=200)
    assert r.raw_difference == pytest.approx(-3.2)  # float64: default approx
    assert (r.difference, r.difference_low, r.difference_high, r.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert (r.n_a, r.n_b, r.n_a_total, r.n_b_total, r.n_strata) == (50, 50, 50, 50, 5)
    ols = adjusted_difference(values, is_a, levels, n_boot=200)
    assert ols.raw_difference == pytest.approx(-3.2)  # float64: default approx
    assert abs(ols.difference) < 1e-9 and abs(ols.difference_low) < 1e-9 and abs(ols.difference_high) < 1e-9


def test_stratified_difference_keeps_a_true_effect() -> None:
    """Set b 1.5 above set a at every level, with noise: the stratified and the least-squares
    estimates recover 1.5 (the raw difference, about -3.2 + 1.5 = -1.7, has the wrong sign)."""
    values, is_a, levels = _confounded(1.5, noise=0.5, seed=1)
    r = stratified_difference(values, is_a, levels, n_permutations=2000, n_boot=1000, seed=2)
    assert r.raw_difference < 0
    assert r.difference_low < 1.5 < r.difference_high and abs(r.difference - 1.5) < 0.3
    assert r.p_value == 1 / 2001
    ols = adjusted_difference(values, is_a, levels, n_boot=1000, seed=2)
    assert ols.difference_low < 1.5 < ols.difference_high and ols.difference_low > 1.0
    # without noise the least-squares estimate is exact
    exact = adjusted_difference(*_confounded(1.5), n_boot=100)
    assert exact.difference == pytest.approx(1.5)  # float64: default approx
    assert exact.difference_low == pytest.approx(1.5)


def test_stratified_difference_by_hand_weights() -> None:
    """Two strata: low (covariate 0) a = [1, 3], b = [4]: difference 2, size 3; high (covariate 1)
    a = [10], b = [13, 14, 15, 16, 17]: difference 5, size 6. Weighted by size: (3 x 2 + 6 x 5) / 9 = 4
    (unweighted it would be 3.5, the raw difference 14.5 - 14 / 3)."""
    values = np.array([1.0, 3.0, 4.0, 10.0, 13.0, 14.0, 15.0, 16.0, 17.0])
    is_a = np.array([True, True, False, True, False, False, False, False, False])
    covariate = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    r = stratified_difference(values, is_a, covariate, n_strata=2, n_permutations=100, n_boot=100)
    assert r.difference == pytest.approx(4.0) and r.n_strata == 2  # float64: default approx
    # a stratum with one set only is left out; none left: NaN
    lone = stratified_difference(values, covariate == 0.0, covariate, n_strata=2, n_permutations=100, n_boot=100)
    assert np.isnan(lone.difference) and np.isnan(lone.p_value) and (lone.n_a, lone.n_a_total) == (0, 3)
    with pytest.raises(ValueError, match="both sets"):
        stratified_difference(values, np.ones(9, dtype=bool), covariate)
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_difference(values, is_a, covariate[:3])
