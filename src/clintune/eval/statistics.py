"""Uncertainty of test metrics: percentile bootstrap over test examples (scipy.stats.bootstrap).

Resampling whole examples and recomputing each metric on the resample works for every metric,
including ones that are not means (macro-F1)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import bootstrap


def bootstrap_intervals(
    n_examples: int,
    metrics_of: Callable[[np.ndarray], dict[str, float]],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap intervals for every metric ``metrics_of(indices)`` returns.

    ``metrics_of`` gets an array of example indices (a resample with replacement) and returns
    the metrics over those examples. With fewer than two examples there is no interval.
    """
    keys = sorted(metrics_of(np.arange(n_examples)))
    if n_examples < 2:
        return {key: (float("nan"), float("nan")) for key in keys}

    def statistic(indices: np.ndarray) -> np.ndarray:
        values = metrics_of(indices.astype(int))
        return np.array([values[key] for key in keys], dtype=float)

    result = bootstrap(
        (np.arange(n_examples),),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=False,
        rng=np.random.default_rng(seed),
    )
    low = np.atleast_1d(result.confidence_interval.low)
    high = np.atleast_1d(result.confidence_interval.high)
    return {key: (float(low[i]), float(high[i])) for i, key in enumerate(keys)}
