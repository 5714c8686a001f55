"""Uncertainty of test metrics: percentile bootstrap over test examples (scipy.stats.bootstrap).

Resampling whole examples and recomputing each metric on the resample works for every metric,
including ones that are not means (macro-F1)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy.stats import DegenerateDataWarning, bootstrap


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

    A metric may be undefined (NaN) on some resamples, e.g. the F1 of a class that a resample
    happens to leave out. Its interval is then the same percentiles over the resamples where
    it is defined; a metric undefined on every resample has no interval.
    """
    keys = sorted(metrics_of(np.arange(n_examples)))
    if n_examples < 2:
        return {key: (float("nan"), float("nan")) for key in keys}

    def statistic(indices: np.ndarray) -> np.ndarray:
        values = metrics_of(indices.astype(int))
        return np.array([values[key] for key in keys], dtype=float)

    with warnings.catch_warnings():
        # scipy warns when a resample's statistic is NaN; the loop below handles those.
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            (np.arange(n_examples),),
            statistic,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=False,
            rng=np.random.default_rng(seed),
        )
    low = np.atleast_1d(result.confidence_interval.low).astype(float)
    high = np.atleast_1d(result.confidence_interval.high).astype(float)
    distribution = np.atleast_2d(result.bootstrap_distribution)
    tail = 100 * (1 - confidence) / 2
    for i in range(len(keys)):
        defined = distribution[i][~np.isnan(distribution[i])]
        if len(defined) < distribution.shape[1]:
            # scipy's interval is NaN as soon as one resample is: the same percentiles
            # (np.percentile, linear, as scipy's percentile method) over the defined ones.
            if len(defined):
                low[i], high[i] = np.percentile(defined, [tail, 100 - tail])
            else:
                low[i], high[i] = np.nan, np.nan
    return {key: (float(low[i]), float(high[i])) for i, key in enumerate(keys)}
