"""Small statistics shared by the analyses, all seeded and vectorised with numpy.

- `bootstrap`: the percentile-bootstrap interval of any vectorised statistic; every interval of
  idiom_lens that resamples goes through it (`bootstrap_statistics` when a caller needs the
  resampled statistics themselves).
- `bootstrap_mean_ci`: the mean and its interval (per column, e.g. per layer).
- `compare_samples`: a two-sample comparison of `b` against `a`: permutation test on the
  difference of means, differences of medians and means, Cliff's delta, bootstrap intervals.
- `match_nearest`: greedy nearest-neighbour matching without replacement within a caliper.
- `paired_comparison`: matched pairs of `a` and `b`: mean and median paired difference with
  bootstrap intervals and a sign-flip permutation test (exact when every sign pattern fits).
- `holm`, `benjamini_hochberg`, `adjust`: p-values adjusted for a family of tests (Holm controls
  the family-wise error rate, Benjamini-Hochberg the false discovery rate).
- `max_t_test`: per-layer differences of two probe x layer arrays (or of matched pairs) with
  p-values adjusted for the family of layers (Westfall-Young single-step max-T), and the p-value
  of the peak layer that accounts for choosing it by its size.
- `depth_bands`, `band_means`: pre-specified layer bands (thirds of the depth) and their means
  with bootstrap intervals, an alternative to peaks chosen by argmax over layers.
- `quantile_strata`, `stratified_difference`, `adjusted_difference`: a difference of two sets
  adjusted for a covariate using every probe: within quantile strata of the covariate (with a
  stratified permutation test), or by least squares.

scipy is not a dependency of idiom_lens, so the permutation tests are written here in numpy
(Monte Carlo: random relabellings or sign flips, exact enumeration where it is small enough).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float, Int

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
    return float((1 + _extreme(null, observed, alternative).sum()) / (1 + n_permutations))


def _extreme(null: np.ndarray, observed: np.ndarray | float, alternative: Alternative) -> np.ndarray:
    """Which null statistics are at least as extreme as `observed` (broadcast against it).

    The same split summed in another order must count as a tie, so there is a relative tolerance.
    """
    observed = np.asarray(observed, dtype=np.float64)
    tol = np.where(np.isfinite(observed), 1e-9 * np.maximum(1.0, np.abs(observed)), 0.0)  # inf: no tolerance
    if alternative == "two-sided":
        return np.abs(null) >= np.abs(observed) - tol
    if alternative == "greater":
        return null >= observed - tol
    if alternative == "less":
        return null <= observed + tol
    raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', not {alternative!r}")


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


# --------------------------------------------------------------------------------------
# Families of tests: adjusted p-values
# --------------------------------------------------------------------------------------

Correction = Literal["holm", "bh"]


def _finite_sorted(pvalues: Float[np.ndarray, "..."]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: UP037
    """(p as float64, mask of the non-NaN entries, ascending order of those entries)."""
    p = np.asarray(pvalues, dtype=np.float64)
    ok = ~np.isnan(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    return p, ok, np.argsort(p[ok], kind="stable")


def holm(pvalues: Float[np.ndarray, "..."] | Sequence[float]) -> Float[np.ndarray, "..."]:  # noqa: UP037
    """Holm's step-down adjusted p-values (family-wise error rate), in the order given.

    With the m non-NaN p-values sorted, p_(1) <= ... <= p_(m): adjusted p_(i) = max over j <= i of
    min(1, (m - j + 1) p_(j)). Rejecting where the adjusted p < alpha keeps the chance of any false
    rejection in the family below alpha, under any dependence between the tests. NaN (a test that
    was not run) stays NaN and does not count in m. As R's `p.adjust(p, "holm")`.
    """
    p, ok, order = _finite_sorted(pvalues)
    m = len(order)
    scaled = (m - np.arange(m)) * p[ok][order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = p.copy()
    out[ok] = adjusted
    return out


def benjamini_hochberg(pvalues: Float[np.ndarray, "..."] | Sequence[float]) -> Float[np.ndarray, "..."]:  # noqa: UP037
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the order given.

    With the m non-NaN p-values sorted: adjusted p_(i) = min over j >= i of min(1, m p_(j) / j).
    Rejecting where the adjusted p < q keeps the expected share of false rejections among the
    rejections below q for independent or positively dependent tests. NaN stays NaN and does not
    count in m. As R's `p.adjust(p, "BH")`.
    """
    p, ok, order = _finite_sorted(pvalues)
    m = len(order)
    scaled = p[ok][order] * m / np.arange(1, m + 1)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    out = p.copy()
    out[ok] = adjusted
    return out


def adjust(pvalues: Float[np.ndarray, "..."] | Sequence[float], method: Correction = "holm") -> np.ndarray:  # noqa: UP037
    """Adjusted p-values of one family of tests: `method` "holm" (`holm`) or "bh" (`benjamini_hochberg`)."""
    if method == "holm":
        return holm(pvalues)
    if method == "bh":
        return benjamini_hochberg(pvalues)
    raise ValueError(f"method must be 'holm' or 'bh', not {method!r}")


# --------------------------------------------------------------------------------------
# Matched pairs: sign-flip permutation test
# --------------------------------------------------------------------------------------

_CHUNK_VALUES = 2_000_000  # permutations are drawn in chunks of about this many values


def _exact_flips(n: int, n_permutations: int) -> bool:
    """Whether all 2**n sign patterns fit in `n_permutations` (then the sign-flip test is exact)."""
    return n <= 30 and 2**n <= n_permutations


def _sign_chunks(n: int, n_permutations: int, rng: np.random.Generator, *, exact: bool) -> Iterator[np.ndarray]:
    """Sign patterns [rows, n] of +-1.0: all 2**n (the first all +1) when `exact`, else `n_permutations` random ones."""
    rows = max(1, _CHUNK_VALUES // max(n, 1))
    if exact:
        codes = np.arange(2**n)
        for start in range(0, len(codes), rows):
            yield 1.0 - 2.0 * ((codes[start:start + rows, None] >> np.arange(n)) & 1)
        return
    for start in range(0, n_permutations, rows):
        yield rng.choice(np.array([-1.0, 1.0]), size=(min(rows, n_permutations - start), n))


def _count_pvalue(n_extreme: np.ndarray | int, n_draws: int, *, exact: bool) -> np.ndarray:
    """Exact: the share of all patterns (the observed one among them). Monte Carlo: (1 + k) / (1 + n),
    which counts the observed pattern, so the p-value is never 0 and the test keeps its level."""
    n_extreme = np.asarray(n_extreme, dtype=np.float64)
    return n_extreme / n_draws if exact else (1 + n_extreme) / (1 + n_draws)


def sign_flip_pvalue(
    differences: Float[np.ndarray, " n"],
    *,
    n_permutations: int = 10_000,
    alternative: Alternative = "two-sided",
    seed: int = 0,
) -> tuple[float, bool]:
    """(p, exact): sign-flip permutation p-value of the mean paired difference.

    Under the null each pair's difference is as likely negative as positive, so flipping signs
    gives its null distribution. When all 2**n patterns fit in `n_permutations` they are
    enumerated and p is exact (all n differences positive: p = 2 / 2**n two-sided); otherwise
    `n_permutations` random patterns, counted as in `permutation_pvalue`.
    """
    d = np.asarray(differences, dtype=np.float64).ravel()
    if len(d) == 0:
        raise ValueError("no paired differences")
    exact = _exact_flips(len(d), n_permutations)
    observed = d.mean()
    rng = np.random.default_rng(seed)
    n_extreme = sum(int(_extreme(signs @ d / len(d), observed, alternative).sum())
                    for signs in _sign_chunks(len(d), n_permutations, rng, exact=exact))
    n_draws = 2 ** len(d) if exact else n_permutations
    return float(_count_pvalue(n_extreme, n_draws, exact=exact)), exact


@dataclass(frozen=True)
class PairedComparison:
    """Matched pairs (a_i, b_i): every difference is b - a (positive when `b` is larger)."""

    n_pairs: int
    median_a: float
    median_b: float
    median_diff: float  # the median of the paired differences (not the difference of the medians)
    median_diff_low: float
    median_diff_high: float
    mean_a: float
    mean_b: float
    mean_diff: float  # the mean paired difference, = mean_b - mean_a
    mean_diff_low: float
    mean_diff_high: float
    p_value: float
    alternative: str
    n_permutations: int  # sign patterns counted: 2**n_pairs when exact
    exact: bool

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(
    a: Float[np.ndarray, " n"],
    b: Float[np.ndarray, " n"],
    *,
    n_permutations: int = 10_000,
    alternative: Alternative = "two-sided",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """b against a on matched pairs: mean and median paired difference, their bootstrap intervals
    (pairs resampled together) and the sign-flip p-value (`sign_flip_pvalue`).

    The pairs are the unit: an unpaired test on matched samples ignores the matching and
    misstates the uncertainty.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"paired samples need the same, non-zero number of values, got {len(a)} and {len(b)}")
    d = b - a

    def centres(boot: np.ndarray) -> np.ndarray:  # [n_boot, 2]: mean, median
        return np.stack([boot.mean(axis=1), np.median(boot, axis=1)], axis=1)

    low, high = bootstrap(d, centres, n_boot=n_boot, level=level, rng=seed)
    p, exact = sign_flip_pvalue(d, n_permutations=n_permutations, alternative=alternative, seed=seed)
    return PairedComparison(
        n_pairs=len(d), median_a=float(np.median(a)), median_b=float(np.median(b)),
        median_diff=float(np.median(d)), median_diff_low=float(low[1]), median_diff_high=float(high[1]),
        mean_a=float(a.mean()), mean_b=float(b.mean()),
        mean_diff=float(d.mean()), mean_diff_low=float(low[0]), mean_diff_high=float(high[0]),
        p_value=p, alternative=alternative, n_permutations=2 ** len(d) if exact else n_permutations, exact=exact,
    )


# --------------------------------------------------------------------------------------
# Per-layer profiles: max-T over layers, pre-specified bands
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerProfileTest:
    """Per-layer differences b - a, with p-values per layer and adjusted for the family of layers."""

    difference: Float[np.ndarray, " layer"]  # mean(b) - mean(a), or the mean paired difference
    statistic: Float[np.ndarray, " layer"]  # difference / its standard error (studentized), else the difference
    p_value: Float[np.ndarray, " layer"]  # per layer on its own: P(|null statistic at the layer| >= |observed|)
    p_adjusted: Float[np.ndarray, " layer"]  # P(max over layers of |null statistic| >= |observed at the layer|)
    peak_layer: int  # the layer of the largest |statistic| (the first of ties)
    peak_p: float  # the peak against the null maximum over layers: accounts for choosing the layer by its size
    paired: bool
    studentized: bool
    n_permutations: int  # relabellings or sign patterns counted (2**n when exact)
    exact: bool

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: layer, difference, statistic, p_value, p_adjusted."""
        return pd.DataFrame({"layer": np.arange(len(self.difference)), "difference": self.difference,
                             "statistic": self.statistic, "p_value": self.p_value, "p_adjusted": self.p_adjusted})


def _ratio(diff: np.ndarray, se: np.ndarray) -> np.ndarray:
    """diff / se; 0 where both are 0 (a layer where every value is equal), +-inf where only se is."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(se > 0, diff / np.where(se > 0, se, 1.0), np.where(diff == 0, 0.0, np.sign(diff) * np.inf))


def max_t_test(
    a: Float[np.ndarray, "n_a layer"],
    b: Float[np.ndarray, "n_b layer"],
    *,
    paired: bool = False,
    studentize: bool = True,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> LayerProfileTest:
    """Per-layer b - a with p-values adjusted for the family of layers (Westfall-Young single-step max-T).

    Two sets (`paired` False): the probe rows of `a` and `b` are relabelled at random, the same
    relabelling for every layer. Matched pairs (`paired`: row i of `a` with row i of `b`): the
    signs of the paired differences are flipped, all 2**n patterns when they fit in
    `n_permutations` (exact). Each layer's statistic is the difference of means, divided by its
    standard error when `studentize` (Welch's for two sets; so layers measured on different scales,
    such as ranks in the thousands early and near 0 late, weigh alike in the maximum).

    `p_adjusted` compares each layer's |statistic| with the permutation distribution of the
    maximum |statistic| over layers: it controls the family-wise error rate over the layers
    (adjusted >= unadjusted), and keeps the correlation between layers that Bonferroni ignores.
    `peak_p` is that p-value at the layer of the largest |statistic|: a peak chosen by argmax over
    layers is compared with the largest peak that chance alone gives.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"two probe x layer arrays with the same layers needed, got {a.shape} and {b.shape}")
    if paired and a.shape != b.shape:
        raise ValueError(f"paired arrays need the same shape, got {a.shape} and {b.shape}")
    smallest = 2 if studentize else 1
    if min(len(a), len(b)) < smallest:
        raise ValueError(f"at least {smallest} probes per set needed, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    if paired:
        d = b - a
        n = len(d)
        sumsq = (d**2).sum(axis=0)

        def statistic(signs: np.ndarray) -> np.ndarray:  # [rows, n] -> [rows, layer]
            mean = signs @ d / n
            if not studentize:
                return mean
            return _ratio(mean, np.sqrt(np.maximum(sumsq - n * mean**2, 0.0) / (n - 1) / n))

        exact = _exact_flips(n, n_permutations)
        observed = statistic(np.ones((1, n)))[0]
        draws = _sign_chunks(n, n_permutations, rng, exact=exact)
        n_draws = 2**n if exact else n_permutations
    else:
        n_a, n_b = len(a), len(b)
        pooled = np.concatenate([a, b])
        pooled = pooled - pooled.mean(axis=0)  # differences and variances unchanged, less cancellation
        squares = pooled**2
        total, total_sq = pooled.sum(axis=0), squares.sum(axis=0)

        def statistic(in_a: np.ndarray) -> np.ndarray:  # [rows, n_a + n_b] bool -> [rows, layer]
            mask = in_a.astype(np.float64)
            sum_a, sq_a = mask @ pooled, mask @ squares
            mean_a, mean_b = sum_a / n_a, (total - sum_a) / n_b
            diff = mean_b - mean_a
            if not studentize:
                return diff
            var_a = np.maximum(sq_a - n_a * mean_a**2, 0.0) / (n_a - 1)
            var_b = np.maximum(total_sq - sq_a - n_b * mean_b**2, 0.0) / (n_b - 1)
            return _ratio(diff, np.sqrt(var_a / n_a + var_b / n_b))

        labels = np.arange(n_a + n_b) < n_a
        exact = False
        observed = statistic(labels[None])[0]
        rows = max(1, _CHUNK_VALUES // len(labels))
        draws = (rng.permuted(np.broadcast_to(labels, (min(rows, n_permutations - start), len(labels))), axis=1)
                 for start in range(0, n_permutations, rows))
        n_draws = n_permutations
    per_layer = np.zeros(len(observed))
    over_layers = np.zeros(len(observed))
    for draw in draws:
        null = statistic(draw)
        per_layer += _extreme(null, observed, "two-sided").sum(axis=0)
        over_layers += _extreme(np.abs(null).max(axis=1)[:, None], observed, "two-sided").sum(axis=0)
    p_adjusted = _count_pvalue(over_layers, n_draws, exact=exact)
    peak = int(np.argmax(np.abs(observed)))
    return LayerProfileTest(
        difference=b.mean(axis=0) - a.mean(axis=0), statistic=observed,
        p_value=_count_pvalue(per_layer, n_draws, exact=exact), p_adjusted=p_adjusted,
        peak_layer=peak, peak_p=float(p_adjusted[peak]), paired=paired, studentized=studentize,
        n_permutations=n_draws, exact=exact,
    )


def depth_bands(n_layers: int, names: Sequence[str] = ("early", "middle", "late")) -> dict[str, range]:
    """Layers 0..n_layers - 1 cut into len(names) contiguous bands, as equal as possible (earlier
    bands take the extra layers): thirds of the depth by default, fixed before looking at the data."""
    if n_layers < len(names):
        raise ValueError(f"{n_layers} layers cannot make {len(names)} bands")
    splits = np.array_split(np.arange(n_layers), len(names))
    return {name: range(int(part[0]), int(part[-1]) + 1) for name, part in zip(names, splits, strict=True)}


def band_values(
    values: Float[np.ndarray, "probe layer"], bands: Mapping[str, Sequence[int]]
) -> Float[np.ndarray, "probe band"]:
    """Per probe, the mean of its values over each band's layers (columns in the order of `bands`)."""
    values = np.asarray(values, dtype=np.float64)
    return np.stack([values[:, list(layers)].mean(axis=1) for layers in bands.values()], axis=1)


def band_means(
    values: Float[np.ndarray, "probe layer"],
    bands: Mapping[str, Sequence[int]],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean over probes of each band's per-probe mean (`band_values`), with a bootstrap interval.

    One row per band: band, first_layer, last_layer, n_layers, n, mean, mean_low, mean_high (the
    same resamples of probes for every band). A band fixed in advance is not chosen by the data,
    unlike the layer where a profile peaks. `values` may be paired differences, for a band effect.
    """
    per_probe = band_values(values, bands)
    mean, low, high = bootstrap_mean_ci(per_probe, n_boot=n_boot, level=level, seed=seed)
    return pd.DataFrame({
        "band": list(bands), "first_layer": [min(v) for v in bands.values()],
        "last_layer": [max(v) for v in bands.values()], "n_layers": [len(v) for v in bands.values()],
        "n": len(per_probe), "mean": mean, "mean_low": low, "mean_high": high,
    })


# --------------------------------------------------------------------------------------
# A difference adjusted for a covariate, on every probe
# --------------------------------------------------------------------------------------


def quantile_strata(covariate: Float[np.ndarray, " n"], n_strata: int) -> Int[np.ndarray, " n"]:
    """Stratum 0..n_strata - 1 of each value: cut at the covariate's quantiles (quintiles for 5).

    Equal values share a stratum, so with many ties some strata stay empty (one stratum when
    every value is equal).
    """
    covariate = np.asarray(covariate, dtype=np.float64).ravel()
    edges = np.quantile(covariate, np.linspace(0, 1, n_strata + 1)[1:-1])
    return np.searchsorted(edges, covariate, side="right")


def _group_arrays(
    values: np.ndarray, group_is_a: np.ndarray, covariate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64).ravel()
    is_a = np.asarray(group_is_a, dtype=bool).ravel()
    covariate = np.asarray(covariate, dtype=np.float64).ravel()
    if not len(values) == len(is_a) == len(covariate):
        raise ValueError(f"values, group_is_a and covariate differ in length: {len(values)}, {len(is_a)}, "
                         f"{len(covariate)}")
    if is_a.all() or not is_a.any():
        raise ValueError("both sets need at least one probe")
    return values, is_a, covariate


@dataclass(frozen=True)
class StratifiedDifference:
    """Set b minus set a within quantile strata of a covariate, weighted by stratum size."""

    difference: float  # sum over strata of (stratum size / used size) * (mean_b - mean_a in the stratum)
    difference_low: float
    difference_high: float
    raw_difference: float  # mean(b) - mean(a) over all probes, not adjusted
    p_value: float  # set labels permuted within each stratum
    n_a: int  # probes of a in strata that hold both sets (the others cannot be compared)
    n_b: int
    n_a_total: int
    n_b_total: int
    n_strata: int  # strata holding both sets (of `n_strata` asked for)
    n_permutations: int
    alternative: str

    def to_dict(self) -> dict:
        return asdict(self)


def stratified_difference(
    values: Float[np.ndarray, " n"],
    group_is_a: Bool[np.ndarray, " n"],
    covariate: Float[np.ndarray, " n"],
    *,
    n_strata: int = 5,
    n_permutations: int = 10_000,
    alternative: Alternative = "two-sided",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> StratifiedDifference:
    """b - a adjusted for `covariate` by stratification, on every probe (no probe is dropped by matching).

    The probes of both sets are cut into `n_strata` quantile strata of the covariate
    (`quantile_strata`); within each stratum holding both sets the difference of means is taken,
    and the strata are averaged weighted by their size, so a difference that comes only from the
    sets' different covariate distributions cancels (up to what varies within a stratum). The
    interval is a stratified bootstrap (each set resampled within each stratum); the p-value
    permutes the set labels within each stratum. Strata holding one set only are left out (their
    probes are counted in the totals, not in n_a / n_b); with none left, everything is NaN.
    """
    values, is_a, covariate = _group_arrays(values, group_is_a, covariate)
    strata = quantile_strata(covariate, n_strata)
    cells = [(values[(strata == s) & is_a], values[(strata == s) & ~is_a]) for s in np.unique(strata)]
    cells = [(va, vb) for va, vb in cells if len(va) and len(vb)]
    common = {"raw_difference": float(values[~is_a].mean() - values[is_a].mean()),
              "n_a": sum(len(va) for va, _ in cells), "n_b": sum(len(vb) for _, vb in cells),
              "n_a_total": int(is_a.sum()), "n_b_total": int((~is_a).sum()), "n_strata": len(cells),
              "n_permutations": n_permutations, "alternative": alternative}
    if not cells:
        return StratifiedDifference(difference=np.nan, difference_low=np.nan, difference_high=np.nan,
                                    p_value=np.nan, **common)
    sizes = np.array([len(va) + len(vb) for va, vb in cells], dtype=np.float64)
    weights = sizes / sizes.sum()
    difference = float(sum(w * (vb.mean() - va.mean()) for w, (va, vb) in zip(weights, cells, strict=True)))
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for w, (va, vb) in zip(weights, cells, strict=True):
        mean_b = vb[boot_indices(len(vb), n_boot, rng)].mean(axis=1)
        boot += w * (mean_b - va[boot_indices(len(va), n_boot, rng)].mean(axis=1))
    low, high = percentile_interval(boot, level)
    null = np.zeros(n_permutations)
    for w, (va, vb) in zip(weights, cells, strict=True):
        pooled = np.concatenate([va, vb])
        rows = max(1, _CHUNK_VALUES // len(pooled))
        for start in range(0, n_permutations, rows):
            stop = min(start + rows, n_permutations)
            sum_a = rng.permuted(np.broadcast_to(pooled, (stop - start, len(pooled))), axis=1)[:, :len(va)].sum(axis=1)
            null[start:stop] += w * ((pooled.sum() - sum_a) / len(vb) - sum_a / len(va))
    p = (1 + _extreme(null, difference, alternative).sum()) / (1 + n_permutations)
    return StratifiedDifference(difference=difference, difference_low=float(low), difference_high=float(high),
                                p_value=float(p), **common)


@dataclass(frozen=True)
class AdjustedDifference:
    """Set b minus set a adjusted for a covariate by least squares: the coefficient of "in b" in
    value ~ 1 + in_b + covariate."""

    difference: float
    difference_low: float
    difference_high: float
    raw_difference: float  # mean(b) - mean(a), not adjusted
    n_a: int
    n_b: int

    def to_dict(self) -> dict:
        return asdict(self)


def adjusted_difference(
    values: Float[np.ndarray, " n"],
    group_is_a: Bool[np.ndarray, " n"],
    covariate: Float[np.ndarray, " n"],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> AdjustedDifference:
    """b - a adjusted for `covariate` by ordinary least squares on every probe, with a bootstrap
    interval (probes resampled; a resample holding one set only is left out of the interval).

    It assumes the value is linear in the covariate with the same slope in both sets; the
    stratified difference (`stratified_difference`) assumes neither.
    """
    values, is_a, covariate = _group_arrays(values, group_is_a, covariate)
    in_b = (~is_a).astype(np.float64)
    design = np.stack([np.ones_like(values), in_b, covariate - covariate.mean()], axis=1)

    def coefficient(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # [n_boot, n, 3], [n_boot, n] -> [n_boot]
        gram = np.einsum("kni,knj->kij", x, x)
        beta = np.einsum("kij,kj->ki", np.linalg.pinv(gram), np.einsum("kni,kn->ki", x, y))
        one_set = (x[:, :, 1].sum(axis=1) == 0) | (x[:, :, 1].sum(axis=1) == x.shape[1])
        return np.where(one_set, np.nan, beta[:, 1])

    estimate = float(coefficient(design[None], values[None])[0])
    samples = bootstrap_statistics((design, values), coefficient, n_boot=n_boot, rng=seed)
    alpha = (1.0 - level) / 2.0
    low, high = np.nanquantile(samples, [alpha, 1.0 - alpha])
    return AdjustedDifference(difference=estimate, difference_low=float(low), difference_high=float(high),
                              raw_difference=float(values[~is_a].mean() - values[is_a].mean()),
                              n_a=int(is_a.sum()), n_b=int((~is_a).sum()))
