"""Small statistics shared by the analyses, all seeded and vectorised with numpy.

- `bootstrap`: the percentile-bootstrap interval of any vectorised statistic; every interval of
  idiom_lens that resamples goes through it (`bootstrap_statistics` when a caller needs the
  resampled statistics themselves).
- `bootstrap_mean_ci`: the mean and its interval (per column, e.g. per layer).
- `compare_samples`: a two-sample comparison of `b` against `a`: permutation test on the
  difference of means, differences of medians and means, Cliff's delta, bootstrap intervals.
- `match_nearest`: greedy nearest-neighbour matching without replacement within a caliper.

scipy is not a dependency of idiom_lens, so the permutation test is written here in numpy
(Monte Carlo: random relabellings of the pooled values).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from jaxtyping import Float, Int

Alternative = Literal["two-sided", "greater", "less"]


def boot_indices(n: int, n_boot: int, rng: np.random.Generator) -> Int[np.ndarray, "n_boot n"]:
    """Row indices of `n_boot` resamples with replacement of `n` items (every bootstrap here draws these)."""
    return rng.integers(0, n, size=(n_boot, n))


def percentile_interval(samples: Float[np.ndarray, "n_boot ..."], level: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper percentile bounds over axis 0 of bootstrap statistics, at confidence `level`."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
    return low, high


Samples = np.ndarray | tuple[np.ndarray, ...]
Statistic = Callable[..., np.ndarray]


def bootstrap_statistics(
    values: Samples,
    statistic: Statistic,
    *,
    n_boot: int = 1000,
    rng: np.random.Generator | int = 0,
    paired: bool = True,
) -> Float[np.ndarray, "n_boot ..."]:
    """`statistic` of `n_boot` resamples of `values` (rows, axis 0, drawn with replacement).

    `values` is one array or a tuple of arrays. Paired arrays (the default) hold rows of the same
    units (probes), so they share each resample; unpaired ones are independent samples, resampled
    one after the other. `statistic` takes the resampled arrays, each [n_boot, n, ...], and returns
    [n_boot, ...]: vectorised, so one call covers every column (the same resamples for each).
    `rng`: a seed (a fresh generator: the same seed gives the same resamples) or a generator whose
    draws continue across calls.
    """
    arrays = values if isinstance(values, tuple) else (values,)
    gen = np.random.default_rng(rng)  # a Generator is returned as it is
    if paired:
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise ValueError(f"paired samples need the same number of rows, got {[len(a) for a in arrays]}")
        idx = boot_indices(n, n_boot, gen)
        resampled = [a[idx] for a in arrays]
    else:
        resampled = [a[boot_indices(len(a), n_boot, gen)] for a in arrays]
    return statistic(*resampled)


def bootstrap(
    values: Samples,
    statistic: Statistic,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    rng: np.random.Generator | int = 0,
    paired: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high): the percentile-bootstrap interval of `statistic` at confidence `level`.

    Resampling as in `bootstrap_statistics`; the bounds are elementwise over the statistic's shape.
    """
    samples = bootstrap_statistics(values, statistic, n_boot=n_boot, rng=rng, paired=paired)
    return percentile_interval(samples, level)


def _mean_of_resamples(values: np.ndarray) -> np.ndarray:
    return values.mean(axis=1)


# Not TL's `bootstrap_ci` (torch, bounds only, fails on n < 1): `bootstrap` also serves two-sample and ratio bootstraps.
def bootstrap_mean_ci(
    values: Float[np.ndarray, "n ..."],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: np.random.Generator | int = 0,
) -> tuple[Float[np.ndarray, "..."], Float[np.ndarray, "..."], Float[np.ndarray, "..."]]:  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    """Mean over axis 0 and its percentile-bootstrap interval (same resamples for every column).

    Returns (mean, low, high); with fewer than two rows the interval collapses to the mean (and
    nothing is drawn: a generator passed as `seed` keeps its state).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan, nan
    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    low, high = bootstrap(values, _mean_of_resamples, n_boot=n_boot, level=level, rng=seed)
    return mean, low, high


def _two_samples(a: Float[np.ndarray, " n_a"], b: Float[np.ndarray, " n_b"]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"two non-empty samples needed (got {len(a)} and {len(b)} values)")
    return a, b


def permutation_pvalue(
    a: Float[np.ndarray, " n_a"],
    b: Float[np.ndarray, " n_b"],
    *,
    n_permutations: int = 10_000,
    alternative: Alternative = "two-sided",
    seed: int = 0,
) -> float:
    """Monte Carlo permutation p-value of mean(b) - mean(a) under exchangeable labels.

    `alternative`: "two-sided" (|difference| at least as large), "greater" (b larger) or "less".
    The p-value counts the observed labelling, (1 + #extreme) / (1 + n_permutations), so it is
    never 0 and the test keeps its level. Relabellings are drawn in chunks of about 2M values.
    """
    a, b = _two_samples(a, b)
    pooled = np.concatenate([a, b])
    n_a, n_b, total = len(a), len(b), pooled.sum()
    observed = b.mean() - a.mean()
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(pooled))
    diffs = []
    for start in range(0, n_permutations, chunk):
        rows = min(chunk, n_permutations - start)
        shuffled = rng.permuted(np.broadcast_to(pooled, (rows, len(pooled))), axis=1)
        sum_a = shuffled[:, :n_a].sum(axis=1)
        diffs.append((total - sum_a) / n_b - sum_a / n_a)
    null = np.concatenate(diffs) if diffs else np.zeros(0)
    tol = 1e-9 * max(1.0, abs(observed))  # the same split summed in another order must count as a tie
    if alternative == "two-sided":
        extreme = np.abs(null) >= abs(observed) - tol
    elif alternative == "greater":
        extreme = null >= observed - tol
    elif alternative == "less":
        extreme = null <= observed + tol
    else:
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', not {alternative!r}")
    return float((1 + extreme.sum()) / (1 + n_permutations))


def cliffs_delta(a: Float[np.ndarray, " n_a"], b: Float[np.ndarray, " n_b"]) -> float:
    """P(b > a) - P(b < a) over all pairs, in [-1, 1]; equal to the rank-biserial correlation."""
    a, b = _two_samples(a, b)
    a_sorted = np.sort(a)
    below = np.searchsorted(a_sorted, b, side="left")  # a values < each b
    above = len(a) - np.searchsorted(a_sorted, b, side="right")  # a values > each b
    return float((below.sum() - above.sum()) / (len(a) * len(b)))


def bootstrap_diff_ci(
    a: Float[np.ndarray, " n_a"],
    b: Float[np.ndarray, " n_b"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile-bootstrap intervals of mean(b) - mean(a) and of median(b) - median(a).

    Each sample is resampled on its own (the samples are independent). Returns
    ((mean_low, mean_high), (median_low, median_high)).
    """
    a, b = _two_samples(a, b)

    def differences(boot_a: np.ndarray, boot_b: np.ndarray) -> np.ndarray:  # [n_boot, 2]: mean, median
        return np.stack([boot_b.mean(axis=1) - boot_a.mean(axis=1),
                         np.median(boot_b, axis=1) - np.median(boot_a, axis=1)], axis=1)

    low, high = bootstrap((a, b), differences, n_boot=n_boot, level=level, rng=seed, paired=False)
    return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


@dataclass(frozen=True)
class SampleComparison:
    """`b` against `a`: every difference is b - a (positive when `b` is larger)."""

    n_a: int
    n_b: int
    median_a: float
    median_b: float
    median_diff: float
    median_diff_low: float
    median_diff_high: float
    mean_a: float
    mean_b: float
    mean_diff: float
    mean_diff_low: float
    mean_diff_high: float
    cliffs_delta: float
    p_value: float
    alternative: str
    n_permutations: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare_samples(
    a: Float[np.ndarray, " n_a"],
    b: Float[np.ndarray, " n_b"],
    *,
    n_permutations: int = 10_000,
    alternative: Alternative = "two-sided",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> SampleComparison:
    """Effect sizes, bootstrap intervals and the permutation p-value of b against a (seeded)."""
    a, b = _two_samples(a, b)
    (mean_low, mean_high), (med_low, med_high) = bootstrap_diff_ci(a, b, n_boot=n_boot, level=level, seed=seed)
    return SampleComparison(
        n_a=len(a), n_b=len(b),
        median_a=float(np.median(a)), median_b=float(np.median(b)),
        median_diff=float(np.median(b) - np.median(a)), median_diff_low=med_low, median_diff_high=med_high,
        mean_a=float(a.mean()), mean_b=float(b.mean()),
        mean_diff=float(b.mean() - a.mean()), mean_diff_low=mean_low, mean_diff_high=mean_high,
        cliffs_delta=cliffs_delta(a, b),
        p_value=permutation_pvalue(a, b, n_permutations=n_permutations, alternative=alternative, seed=seed),
        alternative=alternative, n_permutations=n_permutations,
    )


def match_nearest(
    treated: Float[np.ndarray, " n_treated"],
    candidates: Float[np.ndarray, " n_candidates"],
    *,
    caliper: float,
    seed: int = 0,
) -> Int[np.ndarray, " n_treated"]:
    """Greedy 1:1 nearest-neighbour matching without replacement within `caliper`.

    The treated units are visited in a seeded random order (so no unit is favoured by its
    position); each takes the closest unused candidate if it lies within `caliper` (ties: the
    lowest candidate index). Returns, per treated unit, its candidate's index or -1 if unmatched.
    """
    treated = np.asarray(treated, dtype=np.float64).ravel()
    candidates = np.asarray(candidates, dtype=np.float64).ravel()
    match = np.full(len(treated), -1, dtype=np.int64)
    free = np.ones(len(candidates), dtype=bool)
    for i in np.random.default_rng(seed).permutation(len(treated)):
        if not free.any():
            break
        dist = np.where(free, np.abs(candidates - treated[i]), np.inf)
        j = int(dist.argmin())
        if dist[j] <= caliper:
            match[i] = j
            free[j] = False
    return match


# Not TL's `success_rate_ci`: that is Clopper-Pearson, one share at a time by Python bisection; this is vectorised.
def wilson_interval(
    successes: Int[np.ndarray, "..."] | int,  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    n: Int[np.ndarray, "..."] | int,  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    *,
    level: float = 0.95,
) -> tuple[Float[np.ndarray, "..."], Float[np.ndarray, "..."]]:  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    """Wilson score interval of a share successes / n (elementwise); NaN where n is 0.

    Used for shares of probes (e.g. the share of predictions a knockout changes): unlike the
    normal approximation it stays inside [0, 1] and is sensible at 0 or n successes and small n.
    """
    from statistics import NormalDist

    k = np.asarray(successes, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n_arr
        denom = 1 + z**2 / n_arr
        centre = (p + z**2 / (2 * n_arr)) / denom
        half = z * np.sqrt(p * (1 - p) / n_arr + z**2 / (4 * n_arr**2)) / denom
        low, high = centre - half, centre + half
    low = np.where(k <= 0, 0.0, np.clip(low, 0.0, 1.0))  # exact bounds at 0 and n successes
    high = np.where(k >= n_arr, 1.0, np.clip(high, 0.0, 1.0))
    return np.where(n_arr > 0, low, np.nan), np.where(n_arr > 0, high, np.nan)
