"""Noise scales of a monitored curve: what a dip or a confirmation is measured against."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def binomial_noise(p, n):
    """Standard error sqrt(p(1-p)/n) of an accuracy p measured on n queries.

    This is the evaluation noise of a kNN top-1: re-running the same model on a new
    sample of n queries moves the accuracy by about this much. Works elementwise on
    scalars, arrays and Series.
    """
    return np.sqrt(p * (1 - p) / n)


def robust_noise(curve) -> float:
    """Point-to-point noise of a curve, robust to trends, dips and outliers.

    MAD of the first differences (scaled to a Gaussian sigma) divided by sqrt(2): the
    difference of two independent points has sqrt(2) times the noise of one. Subtracting
    the median difference removes a smooth trend. NaN with fewer than 3 finite points.
    """
    y = pd.Series(curve, dtype=float).dropna().to_numpy()
    if len(y) < 3:
        return float("nan")
    return float(stats.median_abs_deviation(np.diff(y), scale="normal") / np.sqrt(2))


def curve_noise(curve, n_queries=None) -> float:
    """Noise of one point of `curve`: binomial when the query counts are known, else robust.

    With `n_queries` (a number, or a Series aligned on the curve's index) the noise is the
    median over the curve of `binomial_noise(value, n_queries)`; without it, or when that
    is not finite, `robust_noise(curve)`.
    """
    y = pd.Series(curve, dtype=float).dropna()
    if n_queries is not None:
        n = n_queries.reindex(y.index) if isinstance(n_queries, pd.Series) else n_queries
        se = np.asarray(binomial_noise(y, n), dtype=float)
        if np.isfinite(se).any():
            return float(np.nanmedian(se))
    return robust_noise(y)
