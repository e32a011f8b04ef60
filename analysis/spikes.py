"""Spikes: sudden jumps of a norm series (per-layer gradient norm, loss) above its recent past.

One rule decides what a spike is everywhere (`SpikeRule`, default `DEFAULT_RULE`): the
offline detector here, the lead-lag test, the run summary, the report and its figures, the
findings scripts and the trainer's online detector all take a rule, never their own
thresholds.

Every score compares a point with a causal baseline over the `window` values before it (the
point itself excluded), so a spike cannot hide itself and nothing after it matters. The
baseline of every "x median" number is the same: the median of the previous `window` finite
positive values (`causal_median`, `running_ratio`). Consecutive flagged values form one
event. Windows and warmup count logged values (rows), not optimizer steps; with
`log.every=1` the two coincide.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import ndimage

WINDOW = 100  # values in every causal baseline
WARMUP = 50  # first values of a series that are never flagged: the baseline needs history
MAD_TO_SIGMA = 1.4826
# floor of the mad test's scale, in log units: a series flat to within float32 rounding
# (relative resolution 6e-8) has no robust scale, and its rounding must not score as a spike
MIN_LOG_SCALE = 1e-6
METHODS = ("mad", "sigma", "ratio")
SPIKE_COLUMNS = ["layer", "step", "peak_step", "end_step", "n_steps", "value", "baseline", "ratio",
                 "score"]


@dataclass(frozen=True)
class SpikeTest:
    """One test of a rule: `method` score >= `threshold`.

    mad:   robust z of the log-norm, (log x - m) / (1.4826 s): m = log of the causal median,
           s = median |log x - m| of the previous `window` points (the MAD of these
           one-step-ahead residuals; equal to the plain MAD on a flat series, a little
           larger, so more conservative, under a trend). Scale-free, robust to earlier spikes.
    sigma: (x - mean) / std of the previous `window` raw values (OLMo 2's rule is
           sigma:7 with window=1000), two-pass over each window offline and online:
           running sums (pandas' rolling) drift once values far larger than the window's
           have left it (1e-5 relative after values 1e5x larger).
    ratio: x / causal median, the paper-style effect size ("10x").
    """

    method: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.method}:{self.threshold:g}"


@dataclass(frozen=True)
class SpikeRule:
    """What counts as a spike: any of `alternatives`, each a group of tests that must all pass.

    Written as text (`SpikeRule.parse`): tests joined by `+` must all pass, alternatives
    joined by `|` are OR-ed, and `,window=W` / `,warmup=N` set the baseline length and the
    warm-up, e.g. `ratio:10`, `mad:6`, `mad:6+ratio:3`, `mad:6+ratio:3|ratio:10`,
    `sigma:7,window=1000`. `str(rule)` gives the canonical text back.
    """

    alternatives: tuple[tuple[SpikeTest, ...], ...]
    window: int = WINDOW
    warmup: int = WARMUP

    def __post_init__(self):
        if not self.alternatives or not all(self.alternatives):
            raise ValueError("a spike rule needs at least one test")
        if self.window < 1 or self.warmup < 0:
            raise ValueError(f"spike rule window must be >= 1 and warmup >= 0, not "
                             f"window={self.window}, warmup={self.warmup}")

    @classmethod
    def parse(cls, text: "str | SpikeRule | None") -> "SpikeRule":
        """A rule from its text (see the class docstring); a rule as is; None -> the default."""
        if text is None:
            return DEFAULT_RULE
        if isinstance(text, SpikeRule):
            return text
        tests_text, *options = [part.strip() for part in str(text).split(",")]
        fields = {}
        for option in options:
            key, sep, value = option.partition("=")
            if key not in ("window", "warmup") or not sep or not re.fullmatch(r"\d+", value):
                raise ValueError(f"bad spike rule option {option!r} in {text!r}: use window=N or warmup=N")
            fields[key] = int(value)
        alternatives = []
        for alternative in tests_text.split("|"):
            tests = []
            for term in alternative.split("+"):
                method, sep, value = term.strip().partition(":")
                try:
                    threshold = float(value)
                except ValueError:
                    threshold = None
                if method not in METHODS or not sep or threshold is None or not np.isfinite(threshold):
                    raise ValueError(f"bad spike rule test {term.strip()!r} in {text!r}: use mad:Z, "
                                     f"sigma:Z or ratio:R joined by + (and) or | (or), "
                                     f"e.g. {DEFAULT_RULE}")
                tests.append(SpikeTest(method, threshold))
            alternatives.append(tuple(tests))
        return cls(tuple(alternatives), **fields)

    def __str__(self) -> str:
        text = "|".join("+".join(map(str, tests)) for tests in self.alternatives)
        if self.window != WINDOW:
            text += f",window={self.window}"
        if self.warmup != WARMUP:
            text += f",warmup={self.warmup}"
        return text

    @property
    def methods(self) -> set[str]:
        return {t.method for tests in self.alternatives for t in tests}

    def score(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Baseline (causal median) and {method: score} of each point of a finite positive series."""
        baseline = causal_median(x, self.window)
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = {"ratio": x / baseline}
            if "mad" in self.methods:
                resid = np.log(scores["ratio"])  # log x - log of the causal median
                scale = np.full(len(x), np.nan)
                scale[1:] = np.maximum(MAD_TO_SIGMA * causal_median(np.abs(resid[1:]), self.window),
                                       MIN_LOG_SCALE)
                scores["mad"] = resid / scale
            if "sigma" in self.methods:
                mean, std = trailing_mean_std(x, self.window)
                scores["sigma"] = (x - mean) / std
        return baseline, scores

    def flag(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """Boolean mask of the points the rule calls spikes (warm-up excluded)."""
        n = len(scores["ratio"])
        flagged = np.zeros(n, dtype=bool)
        for tests in self.alternatives:
            passed = np.ones(n, dtype=bool)
            for t in tests:
                with np.errstate(invalid="ignore"):
                    passed &= scores[t.method] >= t.threshold
            flagged |= passed
        flagged[:self.warmup] = False
        return flagged


# The default, chosen on benchmarks/bench_detectors.py (table in docs/analysis.md): a
# statistically unusual value that is also at least 3x its baseline, or any 10x excursion.
DEFAULT_RULE = SpikeRule.parse("mad:6+ratio:3|ratio:10")


def causal_median(y, window: int = WINDOW) -> np.ndarray:
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


def valid_values(x: pd.Series) -> pd.Series:
    """The finite positive values of a norm series, which every rule looks at."""
    x = x.astype(float)
    return x[np.isfinite(x) & (x > 0)]


def running_ratio(values, window: int = WINDOW):
    """Each value over the causal median of the previous `window` valid values.

    The one "x median" scale of every text, table, hover and figure. Series in, Series out
    (wide frame in, wide frame out), same index; NaN where a value is not finite positive.
    """
    frame = _as_frame(values)
    out = pd.DataFrame(np.nan, index=frame.index, columns=frame.columns)
    for layer in frame.columns:
        x = valid_values(frame[layer])
        with np.errstate(divide="ignore", invalid="ignore"):
            out.loc[x.index, layer] = x.to_numpy() / causal_median(x.to_numpy(), window)
    return out.iloc[:, 0].rename(values.name) if isinstance(values, pd.Series) else out


def log_deviation(x: pd.Series, window: int = WINDOW) -> pd.Series:
    """log(x) minus the log of its causal median: the mad test's residual, index kept."""
    y = np.log(valid_values(x))
    return y - causal_median(y, window)


def find_spikes(values, rule: "SpikeRule | str | None" = None) -> pd.DataFrame:
    """Find spike events in a norm series or in every column of a wide frame.

    values: Series indexed by step, or DataFrame (index step, one column per layer, as
        `Run.grad_norms()` returns).
    rule: a `SpikeRule` or its text; default `DEFAULT_RULE`.

    Only jumps upward count; non-finite and non-positive values are ignored. Returns one row
    per event: layer, step (first flagged), peak_step (largest ratio), end_step (last
    flagged), n_steps (flagged values), and at the peak: value, baseline (causal median),
    ratio (value / baseline) and score (the rule's first test's score). Rows are in column
    order, then step.
    """
    rule = SpikeRule.parse(rule)
    first_method = rule.alternatives[0][0].method
    frame = _as_frame(values)
    events = []
    for layer in frame.columns:
        x = valid_values(frame[layer])
        baseline, scores = rule.score(x.to_numpy())
        pos = np.flatnonzero(rule.flag(scores))
        events.append(_events(layer, x, baseline, scores["ratio"], scores[first_method], pos))
    out = pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=SPIKE_COLUMNS)
    out["layer"] = pd.Categorical(out["layer"], categories=list(frame.columns))
    return out


def peak_ratio(values, rule: "SpikeRule | str | None" = None) -> pd.Series:
    """Largest value / causal median of each column, after the rule's warm-up.

    The answer to "how big was the largest excursion?" even in a run with no spikes, on the
    same baseline as every event's `ratio`. NaN for a series shorter than warmup + 1.
    """
    rule = SpikeRule.parse(rule)
    frame = _as_frame(values)
    out = {}
    for layer in frame.columns:
        x = valid_values(frame[layer]).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = x / causal_median(x, rule.window)
        out[layer] = np.nanmax(ratio[rule.warmup:]) if len(x) > rule.warmup else np.nan
    return pd.Series(out, dtype=float)


def _as_frame(values) -> pd.DataFrame:
    """A wide frame as is; a Series as a one-column frame named after it ("value" if unnamed)."""
    if isinstance(values, pd.Series):
        return values.to_frame("value" if values.name is None else values.name)
    return values


def _events(layer, x: pd.Series, baseline, ratio, score, pos) -> pd.DataFrame:
    """Group consecutive flagged positions `pos` of one series into events."""
    steps = x.index.to_numpy()
    run = np.cumsum(np.diff(pos, prepend=-2) > 1)
    g = pd.DataFrame({"run": run, "pos": pos, "ratio": ratio[pos]}).groupby("run")
    peak = pos[g["ratio"].idxmax().to_numpy()]
    return pd.DataFrame({
        "layer": layer,
        "step": steps[g["pos"].min().to_numpy()],
        "peak_step": steps[peak],
        "end_step": steps[g["pos"].max().to_numpy()],
        "n_steps": g.size().to_numpy(),
        "value": x.to_numpy()[peak],
        "baseline": baseline[peak],
        "ratio": ratio[peak],
        "score": score[peak],
    }, columns=SPIKE_COLUMNS)


class StreamingSpikeDetector:
    """`find_spikes`, one logged step at a time: the online twin of the offline detector.

    Pure numpy, for a training loop. `update(step, values)` takes one value per layer (NaN or
    <= 0 where a layer has none, which it ignores as `find_spikes` does) and returns the
    events that start at that step. `events()` gives every event so far in the form and
    order `find_spikes` gives them on the whole series (an event still open ends at its last
    flagged value so far), so a run fed value by value yields the offline events exactly.
    Same `SpikeRule` semantics: each layer keeps the last `rule.window` valid values (the
    causal median and the sigma test's mean / std) and the last `rule.window` absolute
    log-residuals (the mad test's scale); its first `rule.warmup` valid values are never
    flagged. `flagged` and `ratio` describe the last update, per layer.

    `state_dict()` / `load_state_dict()` carry the whole state (plain numpy and lists), so a
    resumed run continues with the baselines it had.
    """

    def __init__(self, layers, rule: "SpikeRule | str | None" = None):
        self.rule = SpikeRule.parse(rule)
        self.layers = [str(layer) for layer in layers]
        self._tests = replace(self.rule, warmup=0)  # warm-up is per layer here, by its count
        self._first_method = self.rule.alternatives[0][0].method
        shape = (len(self.layers), self.rule.window)
        self._values = np.full(shape, np.nan)  # ring buffer of the last valid values
        self._resid = np.full(shape, np.nan)  # ring buffer of |log x - log baseline|
        self._count = np.zeros(len(self.layers), dtype=np.int64)  # valid values seen
        self._open: list[dict | None] = [None] * len(self.layers)
        self._closed: list[dict] = []
        self.flagged = np.zeros(len(self.layers), dtype=bool)
        self.ratio = np.full(len(self.layers), np.nan)

    def update(self, step: int, values) -> list[dict]:
        """Feed one step: a value per layer, in `layers` order. Returns the events that
        start here, as dicts with layer, step, value, baseline, ratio and score."""
        x = np.asarray(values, dtype=float)
        if x.shape != (len(self.layers),):
            raise ValueError(f"expected {len(self.layers)} values (one per layer), got shape {x.shape}")
        window, n = self.rule.window, self._count
        valid = np.isfinite(x) & (x > 0)
        baseline = _upper_median(self._values, np.minimum(n, window))
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = {"ratio": x / baseline}
            resid = np.log(scores["ratio"])
            if "mad" in self.rule.methods:
                scale = np.maximum(MAD_TO_SIGMA * _upper_median(self._resid, np.minimum(n - 1, window)),
                                   MIN_LOG_SCALE)
                scores["mad"] = resid / scale
            if "sigma" in self.rule.methods:
                mean, std = _mean_std(self._values)
                scores["sigma"] = (x - mean) / std
        self.flagged = self._tests.flag(scores) & valid & (n >= self.rule.warmup)
        self.ratio = np.where(valid, scores["ratio"], np.nan)

        rows = np.flatnonzero(valid)
        self._values[rows, n[rows] % window] = x[rows]
        later = rows[n[rows] >= 1]
        self._resid[later, (n[later] - 1) % window] = np.abs(resid[later])
        self._count[rows] += 1

        started = []
        for i in rows:
            event = self._open[i]
            if not self.flagged[i]:
                if event is not None:
                    self._closed.append(event)
                    self._open[i] = None
                continue
            peak = dict(peak_step=int(step), value=float(x[i]), baseline=float(baseline[i]),
                        ratio=float(scores["ratio"][i]), score=float(scores[self._first_method][i]))
            if event is None:
                event = self._open[i] = dict(layer=self.layers[i], step=int(step), end_step=int(step),
                                             n_steps=0, **peak)
                started.append({"layer": event["layer"], "step": event["step"],
                                **{k: peak[k] for k in ("value", "baseline", "ratio", "score")}})
            elif peak["ratio"] > event["ratio"]:  # the first largest ratio, as idxmax
                event.update(peak)
            event["end_step"] = int(step)
            event["n_steps"] += 1
        return started

    def events(self) -> pd.DataFrame:
        """Every event so far, as `find_spikes` returns them (layer order, then step)."""
        order = {layer: i for i, layer in enumerate(self.layers)}
        rows = sorted(self._closed + [e for e in self._open if e is not None],
                      key=lambda e: (order[e["layer"]], e["step"]))
        out = pd.DataFrame(rows, columns=SPIKE_COLUMNS).astype(
            {"step": np.int64, "peak_step": np.int64, "end_step": np.int64, "n_steps": np.int64,
             "value": float, "baseline": float, "ratio": float, "score": float})
        out["layer"] = pd.Categorical(out["layer"], categories=self.layers)
        return out

    def state_dict(self) -> dict:
        """Plain Python values only (lists, floats, str), so a checkpoint holding it loads
        with torch's weights_only unpickler."""
        return {"layers": list(self.layers), "rule": str(self.rule), "values": self._values.tolist(),
                "resid": self._resid.tolist(), "count": self._count.tolist(),
                "open": [None if e is None else _plain(e) for e in self._open],
                "closed": [_plain(e) for e in self._closed]}

    def select(self, layers) -> "StreamingSpikeDetector":
        """A detector over some of the layers that continues with their state and events
        (a replay that freezes a layer's parameters stops logging it)."""
        keep = [self.layers.index(str(layer)) for layer in layers]
        out = StreamingSpikeDetector([self.layers[i] for i in keep], self.rule)
        out._values, out._resid, out._count = self._values[keep], self._resid[keep], self._count[keep]
        out._open = [None if self._open[i] is None else dict(self._open[i]) for i in keep]
        out._closed = [dict(e) for e in self._closed if e["layer"] in out.layers]
        return out

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`; refuses a state of other layers or another rule."""
        if list(state["layers"]) != self.layers or SpikeRule.parse(state["rule"]) != self.rule:
            raise ValueError(f"spike detector state is for rule {state['rule']} on "
                             f"{len(state['layers'])} layers, not {self.rule} on {len(self.layers)}")
        self._values = np.array(state["values"], dtype=float)
        self._resid = np.array(state["resid"], dtype=float)
        self._count = np.array(state["count"], dtype=np.int64)
        self._open = [None if e is None else dict(e) for e in state["open"]]
        self._closed = [dict(e) for e in state["closed"]]


def _plain(event: dict) -> dict:
    """An event dict with numpy scalars as Python numbers."""
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in event.items()}


def _upper_median(ring: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per row, the upper median of its `counts` filled slots (the rest are NaN); NaN for 0.

    The same value `causal_median` takes: an element of the window, never an average.
    """
    ordered = np.sort(ring, axis=1)  # NaN (unfilled) sorts last
    out = ordered[np.arange(len(ring)), np.clip(counts // 2, 0, ring.shape[1] - 1)]
    return np.where(counts > 0, out, np.nan)


def trailing_mean_std(x: np.ndarray, window: int, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation of the `window` values before each point (fewer
    at the start, NaN below two), each window summed on its own (two-pass), so a value far
    larger than the rest leaves no rounding behind once it has left the window. Windows are
    strided views of the NaN-padded series, taken `chunk` elements at a time to bound memory."""
    x = np.asarray(x, dtype=float)
    windows = np.lib.stride_tricks.sliding_window_view(np.concatenate([np.full(window, np.nan), x]),
                                                       window)[:len(x)]
    rows = max(1, chunk // window)
    parts = [_mean_std(windows[start:start + rows]) for start in range(0, len(x), rows)]
    mean, std = zip(*parts) if parts else ((np.empty(0),), (np.empty(0),))
    return np.concatenate(mean), np.concatenate(std)


def _mean_std(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, mean and sample standard deviation of the filled (finite) slots, two-pass;
    NaN below two values."""
    filled = np.isfinite(ring)
    count = filled.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(filled, ring, 0.0).sum(axis=1) / count
        var = np.where(filled, (ring - mean[:, None]) ** 2, 0.0).sum(axis=1) / (count - 1)
    two = count >= 2
    return np.where(two, mean, np.nan), np.where(two, np.sqrt(np.where(two, var, 0.0)), np.nan)
