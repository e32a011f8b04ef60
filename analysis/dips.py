"""Dips: falls of a monitored curve (kNN top-1, accuracy, negated loss) below its running best.

A dip starts at the running best (the peak), is deepest at the bottom and ends at the first
point back within `tolerance` of the peak; a dip still open at the end of the curve has
`recovered=False`. Only dips at least `min_depth` deep are kept. Thresholds default to
multiples of the curve's own point noise (see `analysis.noise`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .noise import curve_noise

DIP_COLUMNS = ["start_step", "bottom_step", "end_step", "peak", "bottom", "depth", "rel_depth",
               "area", "recovered", "noise", "depth_noise"]


def find_dips(curve, *, min_depth=None, relative=False, tolerance=None, n_queries=None,
              noise=None, k=5.0, smooth=5) -> pd.DataFrame:
    """Find the dips of `curve` (a Series indexed by step, higher is better).

    min_depth: smallest dip kept, peak - bottom. Default `k` times the point noise.
    relative: `min_depth` and `tolerance` are fractions of |peak| instead of absolute.
    tolerance: a dip ends at the first point >= peak - tolerance. Default min_depth / 3,
        so one noisy point does not end a dip.
    n_queries: queries behind each point (number or Series by step): the point noise is
        then binomial, sqrt(p(1-p)/n); else it is estimated from the curve
        (`analysis.noise.robust_noise`).
    noise: the point noise itself, overriding both estimates.
    k: default threshold in noise units. 5 keeps noise-only false dips rare on curves of up
        to a few hundred points (docs/analysis.md has the simulation).
    smooth: the running best is taken over a centered rolling median of `smooth` points
        (never above the point itself), so one lucky evaluation does not set the peak and
        the depth is measured from the level before the fall. 1 = raw running maximum.

    Returns one row per dip: start_step (peak), bottom_step, end_step, peak, bottom, depth,
    rel_depth (depth / |peak|), area (integral of peak - curve over the dip, value x steps),
    recovered, noise, depth_noise (depth / noise). NaN points are dropped and steps may be
    irregular; without min_depth, a curve too short for a noise estimate has no dips.
    """
    y = pd.Series(curve, dtype=float).dropna().sort_index()
    if noise is None:
        noise = curve_noise(y, n_queries)
    if min_depth is None:
        if relative:
            raise ValueError("relative=True needs an explicit min_depth")
        min_depth = k * noise
    if tolerance is None:
        tolerance = min_depth / 3

    steps, v = y.index.to_numpy(), y.to_numpy()
    level = y.rolling(smooth, center=True, min_periods=1).median().to_numpy()
    floor = np.minimum(level, v)
    best = np.maximum.accumulate(floor) if len(v) else v
    scale = np.abs(best) if relative else 1.0
    pos = np.flatnonzero(best - v > tolerance * scale)
    if len(pos) == 0:
        return pd.DataFrame(columns=DIP_COLUMNS)

    # Runs of consecutive points below the tolerance band are the candidate dips.
    run = np.cumsum(np.diff(pos, prepend=-2) > 1)
    g = pd.DataFrame({"run": run, "pos": pos, "v": v[pos]}).groupby("run")
    first = g["pos"].min().to_numpy()
    last = g["pos"].max().to_numpy()
    bottom_pos = pos[g["v"].idxmin().to_numpy()]
    # The peak is the last running-best point before the run.
    peak_pos = np.maximum.accumulate(np.where(floor == best, np.arange(len(v)), 0))[first]
    recovered = last + 1 < len(v)
    end_pos = np.where(recovered, last + 1, last)
    # Area under the drawdown from the running best, trapezoidal in steps.
    drawdown = np.clip(best - v, 0, None)
    seg = (drawdown[1:] + drawdown[:-1]) / 2 * np.diff(steps).astype(float)
    cum = np.concatenate([[0.0], np.cumsum(seg)])

    peak = best[first]
    depth = peak - v[bottom_pos]
    out = pd.DataFrame({
        "start_step": steps[peak_pos],
        "bottom_step": steps[bottom_pos],
        "end_step": steps[end_pos],
        "peak": peak,
        "bottom": v[bottom_pos],
        "depth": depth,
        "rel_depth": depth / np.abs(peak),
        "area": cum[end_pos] - cum[peak_pos],
        "recovered": recovered,
        "noise": noise,
        "depth_noise": depth / noise if noise else np.inf,
    })
    kept = out["rel_depth" if relative else "depth"] >= min_depth
    return out[kept].reset_index(drop=True)


def knn_curves(knn: pd.DataFrame, k=None) -> dict:
    """Split a `knn` table into one frame per source, indexed by step: top1, n_queries, epoch.

    k: which neighbour count to use when several were evaluated; default the most common.
    Rows without k (an accuracy that is not a kNN's, logged by `Monitor.log_knn`) are kept.
    """
    knn = knn.dropna(subset=["top1"]) if "top1" in knn else knn.iloc[:0]
    if knn.empty:
        return {}
    if "k" in knn and knn["k"].notna().any():
        knn = knn[knn["k"].isna() | (knn["k"] == (knn["k"].mode().iloc[0] if k is None else k))]
    cols = [c for c in ("top1", "n_queries", "epoch") if c in knn]
    return {src: g.groupby("step")[cols].last() for src, g in knn.groupby("source", sort=True)}


def find_knn_dips(knn: pd.DataFrame, *, k=None, confirm_k=2.0, **dip_kwargs) -> pd.DataFrame:
    """Dips of every kNN source in a `knn` table, each checked against the other source.

    The queue kNN compares against a FIFO queue of stale training features and can dip
    while a fresh-bank (`val`) kNN does not: such a dip is a monitor artifact. With both
    `queue` and `val` rows, a dip is `confirmed` when the other source, from its last
    evaluation at or before the dip's start_step to its lowest one in
    (start_step, end_step], falls by at least `confirm_k` times its own point noise
    (`other_drop` holds that fall). `confirmed` is NA when the other source is missing or
    has no evaluation on both sides of the start. confirm_k=2 is a one-sided ~2% test.

    k: neighbour count (default the most common); other keywords go to `find_dips`, whose
    noise is binomial from `n_queries`. Returns the `find_dips` columns plus source,
    confirmed (nullable boolean) and other_drop.
    """
    curves = knn_curves(knn, k)
    frames = []
    for src, c in curves.items():
        dips = find_dips(c["top1"], n_queries=c.get("n_queries"), **dip_kwargs)
        others = [o for o in curves if o != src]
        drop = pd.Series(np.nan, index=dips.index)
        confirmed = pd.Series(pd.NA, index=dips.index, dtype="boolean")
        if len(others) == 1 and len(dips):
            other = curves[others[0]]
            y = other["top1"]
            drop = pd.Series([_drop(y, s, e) for s, e in zip(dips["start_step"], dips["end_step"])])
            limit = confirm_k * curve_noise(y, other.get("n_queries"))
            confirmed = (drop >= limit).astype("boolean").mask(drop.isna())
        frames.append(dips.assign(source=src, confirmed=confirmed, other_drop=drop))
    if not frames:
        return pd.DataFrame(columns=["source", *DIP_COLUMNS, "confirmed", "other_drop"])
    out = pd.concat(frames, ignore_index=True)
    return out[["source", *DIP_COLUMNS, "confirmed", "other_drop"]]


def _drop(y: pd.Series, start, end) -> float:
    """Fall of `y` from its value at or before `start` to its minimum in (start, end]."""
    before, span = y[y.index <= start], y[(y.index > start) & (y.index <= end)]
    if before.empty or span.empty:
        return np.nan
    return before.iloc[-1] - span.min()
