"""Small statistics shared by the analyses: seeded bootstrap intervals of means."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float


def bootstrap_mean_ci(
    values: Float[np.ndarray, "n ..."],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Float[np.ndarray, "..."], Float[np.ndarray, "..."], Float[np.ndarray, "..."]]:
    """Mean over axis 0 and its percentile-bootstrap interval (same resamples for every column).

    Returns (mean, low, high); with fewer than two rows the interval collapses to the mean.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan, nan
    mean = values.mean(axis=0)
    if values.shape[0] < 2:
        return mean, mean.copy(), mean.copy()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    boots = values[picks].mean(axis=1)  # [n_boot, ...]
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha], axis=0)
    return mean, low, high
