"""Spikes: sudden jumps of a norm series (per-layer gradient norm, loss) above its recent past.

Every score compares a point with a causal baseline over the `window` values before it (the
point itself excluded), so a spike cannot hide itself and nothing after it matters.
Consecutive flagged values form one event. Windows and warmup count logged values (rows),
not optimizer steps; with `log.every=1` the two coincide.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

# method: (window, threshold). mad: robust z of the log-norm; sigma: OLMo 2's rule on the
# raw values (7 sigma over the last 1000); ratio: value over the rolling median.
DEFAULTS = {"mad": (100, 6.0), "sigma": (1000, 7.0), "ratio": (100, 10.0)}
WARMUP = 50
MAD_TO_SIGMA = 1.4826
SPIKE_COLUMNS = ["layer", "step", "peak_step", "end_step", "n_steps", "value", "baseline", "score"]


def causal_median(y, window: int) -> np.ndarray:
    """Median of the `window` values before each point (fewer at the start, NaN at 0).

    scipy.ndimage.median_filter on a trailing window, shifted by one: about 6x faster than
    pandas' rolling median. Like the filter, an even count gives the upper median. The
    first `window` points use an expanding median instead of the filter's edge padding.
    """
    y = np.asarray(y, dtype=float)
    out = np.full(len(y), np.nan)
    if len(y) < 2:
        return out
    trailing = ndimage.median_filter(y, size=window, origin=(window - 1) // 2, mode="nearest")
    trailing[:window] = (
        pd.Series(y[:window]).expanding().quantile(0.5, interpolation="higher").to_numpy())
    out[1:] = trailing[:-1]
    return out


def log_deviation(x: pd.Series, window: int) -> pd.Series:
    """log(x) minus the causal rolling median of log(x): the mad method's residual.

    Non-finite and non-positive values are dropped first, the rest keep their index.
    """
    x = x.astype(float)
    y = np.log(x[np.isfinite(x) & (x > 0)])
    return y - causal_median(y, window)


def _score(x: np.ndarray, method: str, window: int):
    """Baseline (in value units) and score of each point of a finite series."""
    if method == "mad":
        resid = log_deviation(pd.Series(x), window).to_numpy()
        scale = np.full(len(x), np.nan)
        scale[1:] = MAD_TO_SIGMA * causal_median(np.abs(resid[1:]), window)
        return np.exp(np.log(x) - resid), resid / scale
    if method == "sigma":
        past = pd.Series(x).rolling(window, min_periods=2)
        mean, std = past.mean().shift(1).to_numpy(), past.std().shift(1).to_numpy()
        return mean, (x - mean) / std
    base = causal_median(x, window)  # ratio
    return base, x / base


def find_spikes(values, *, method="mad", window=None, threshold=None, warmup=WARMUP) -> pd.DataFrame:
    """Find spike events in a norm series or in every column of a wide frame.

    values: Series indexed by step, or DataFrame (index step, one column per layer, as
        `Run.grad_norms()` returns).
    method:
        "mad"   (default) robust z of the log-norm, (log x - m) / (1.4826 * s), m = median
                of the previous `window` log values, s = median |log x - m| of the previous
                `window` points (the MAD of these one-step-ahead residuals: equal to the
                plain MAD on a flat series, a little larger, so more conservative, under a
                trend). Scale-free and robust to earlier spikes. Default 100 values, z >= 6.
        "sigma" OLMo 2's rule: (x - mean) / std over the previous 1000 raw values, >= 7.
        "ratio" x / median of the previous `window` values, >= 10 (an order of magnitude).
    window, threshold: default per method as above.
    warmup: the first `warmup` values of each series are never flagged (50: the baseline
        needs some history).

    Only jumps upward count. Non-finite values, and non-positive ones for mad/ratio, are
    ignored. Returns one row per event: layer, step (first flagged), peak_step (highest
    score), end_step (last flagged), n_steps (flagged values), and value, baseline, score
    at the peak. Rows are in column order, then step.
    """
    if method not in DEFAULTS:
        raise ValueError(f"unknown method {method!r}: use one of {sorted(DEFAULTS)}")
    default_window, default_threshold = DEFAULTS[method]
    window = window or default_window
    threshold = default_threshold if threshold is None else threshold
    frame = _as_frame(values)
    events = []
    for layer in frame.columns:
        x = frame[layer].astype(float)
        x = x[np.isfinite(x) & ((x > 0) | (method == "sigma"))]
        with np.errstate(divide="ignore", invalid="ignore"):
            baseline, score = _score(x.to_numpy(), method, window)
        flagged = score >= threshold
        flagged[:warmup] = False
        events.append(_events(layer, x, baseline, score, np.flatnonzero(flagged)))
    out = pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=SPIKE_COLUMNS)
    out["layer"] = pd.Categorical(out["layer"], categories=list(frame.columns))
    return out


def peak_ratio(values, *, window=DEFAULTS["ratio"][0], warmup=WARMUP) -> pd.Series:
    """Largest value / causal rolling median of each column (the paper-style "10x" yardstick).

    values: Series or wide frame as for `find_spikes`. Same baseline as method="ratio"
    (median of the previous `window` finite positive values) and the same `warmup` rows
    skipped, but no threshold: the answer to "how big was the largest excursion?" even in a
    run with no spikes. NaN for a series shorter than warmup + 1.
    """
    frame = _as_frame(values)
    out = {}
    for layer in frame.columns:
        x = frame[layer].astype(float).to_numpy()
        x = x[np.isfinite(x) & (x > 0)]
        _, ratio = _score(x, "ratio", window)
        out[layer] = np.nanmax(ratio[warmup:]) if len(x) > warmup else np.nan
    return pd.Series(out, dtype=float)


def _as_frame(values) -> pd.DataFrame:
    """A wide frame as is; a Series as a one-column frame named after it ("value" if unnamed)."""
    if isinstance(values, pd.Series):
        return values.to_frame("value" if values.name is None else values.name)
    return values


def _events(layer, x: pd.Series, baseline, score, pos) -> pd.DataFrame:
    """Group consecutive flagged positions `pos` of one series into events."""
    steps = x.index.to_numpy()
    run = np.cumsum(np.diff(pos, prepend=-2) > 1)
    g = pd.DataFrame({"run": run, "pos": pos, "score": score[pos]}).groupby("run")
    peak = pos[g["score"].idxmax().to_numpy()]
    return pd.DataFrame({
        "layer": layer,
        "step": steps[g["pos"].min().to_numpy()],
        "peak_step": steps[peak],
        "end_step": steps[g["pos"].max().to_numpy()],
        "n_steps": g.size().to_numpy(),
        "value": x.to_numpy()[peak],
        "baseline": baseline[peak],
        "score": score[peak],
    }, columns=SPIKE_COLUMNS)
