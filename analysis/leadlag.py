"""Lead-lag of gradient spikes between layers: do first-layer spikes come first?

Chen, Xie & He (2021) saw gradient spikes appear first in the patch projection and reach
the last layers a few iterations later. Here every later-layer spike event is matched to the
nearest first-layer event within `max_lag` steps; lag = layer step - first-layer step, so a
positive lag means the first layer leads. Two questions get two tests:

* association: do the layer's events fall near first-layer events more often than chance?
  The number of matched events against circular shifts of the first layer's event train,
  which keep its event count and spacing but break any timing link.
* direction: among the matched pairs, does the first layer come first more often than not?
  A sign test of the lags (the exact sign-flip null: with no lead, each lag's sign is a coin
  flip). Coupled layers with no lead are associated but not directed.

The verdict "first leads" rests on the direction test.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import signal, stats

from .layers import last_block
from .spikes import SpikeRule, find_spikes, log_deviation

MAX_LAG_INTERVALS = 10
ALPHA = 0.05
PER_LAYER_COLUMNS = ["layer", "n_first_events", "n_layer_events", "n_matched", "n_first_leads",
                     "n_first_follows", "frac_first_leads", "median_lag", "mean_lag", "xcorr_lag",
                     "association_p", "direction_p"]
VERDICTS = ("first leads", "not significant", "no matched spikes", "no later layer")


@dataclass
class LeadLagResult:
    """per_layer: one row per later layer (see `spike_lead_lag`); matches: the event pairs
    (layer, first_step, layer_step, lag); events: every spike event found (`find_spikes`
    columns); summary: one plain paragraph; first and last: the first and the last layer."""

    per_layer: pd.DataFrame
    matches: pd.DataFrame
    events: pd.DataFrame
    summary: str
    first: str
    last: str | None
    n_permutations: int
    max_lag: float

    @property
    def verdict(self) -> str:
        """One of VERDICTS, for the last layer: 'first leads' when its direction_p < ALPHA
        and its median lag > 0 (most matched pairs have the first layer strictly earlier)."""
        if self.last is None:
            return "no later layer"
        row = self.per_layer.set_index("layer").loc[self.last]
        if row["n_matched"] == 0:
            return "no matched spikes"
        leads = row["direction_p"] < ALPHA and row["median_lag"] > 0
        return "first leads" if leads else "not significant"


def nearest_lags(first: np.ndarray, later: np.ndarray, max_lag) -> np.ndarray:
    """Lag from the nearest `first` event to each `later` event, NaN beyond `max_lag`.

    first: (K, m) event steps, each row sorted (K event trains, e.g. shifted copies);
    later: (q,) event steps. Returns (K, q) lags later - first. On a tie between an earlier
    and a later first event the later one wins (lag <= 0), which counts against "first
    leads". One batched searchsorted: row r is offset by r * span so rows never overlap.
    """
    K, m = first.shape
    if m == 0 or len(later) == 0:
        return np.full((K, len(later)), np.nan)
    lo = min(first.min(), later.min())
    span = max(first.max(), later.max()) - lo + 1
    offset = np.arange(K)[:, None] * span
    pos = np.searchsorted((first - lo + offset).ravel(), (later - lo + offset).ravel())
    pos = pos.reshape(K, -1) - np.arange(K)[:, None] * m
    rows = np.arange(K)[:, None]
    before = np.where(pos > 0, later - first[rows, np.maximum(pos - 1, 0)], np.inf)
    after = np.where(pos < m, later - first[rows, np.minimum(pos, m - 1)], -np.inf)
    lag = np.where(before < -after, before, after)
    return np.where(np.abs(lag) <= max_lag, lag, np.nan)


def spike_lead_lag(grad_norms: pd.DataFrame, *, first="patch_embed", layers=None, last=None,
                   max_lag=None, n_permutations=999, seed=0, events=None, rule=None) -> LeadLagResult:
    """Test whether spikes of layer `first` precede spikes of the later layers.

    grad_norms: wide frame, index step, one column per layer in model order
        (`Run.grad_norms()`).
    first: the layer expected to lead (the patch projection).
    layers: the layers compared with it; default every other column, in order.
    last: the layer the verdict and summary speak of; default the last transformer block
        (the last `blocks.N` column; the paper's "last layers"), else the last of `layers`.
    max_lag: largest |lag| matched, in steps. Default 10 logging intervals ("a few
        iterations" in the paper, with room for logging every few steps).
    n_permutations: circular shifts of the first layer's events (by a whole number of
        logged rows, more than max_lag either way) forming the association null; association_p =
        (1 + #{shifts matching >= n_matched}) / (1 + n_permutations).
    seed: seed of the shifts.
    events: spike events already found (`find_spikes` output, e.g. per run and then pooled
        over seeds laid end to end); default: `find_spikes(grad_norms, rule)`.
    rule: the `SpikeRule` (or its text) of the events; its window also sets the baseline of
        the cross-correlation. Default `DEFAULT_RULE`.

    per_layer columns (PER_LAYER_COLUMNS): layer, n_first_events, n_layer_events, n_matched,
    n_first_leads / n_first_follows (matched pairs with lag > 0 / lag < 0; same-step pairs
    are neither), frac_first_leads (n_first_leads / n_matched), median_lag, mean_lag,
    xcorr_lag (peak of the cross-correlation of log-norm deviations from a causal rolling
    median, within +-max_lag, in steps, same sign: positive = first leads), association_p
    (circular-shift test of n_matched; NaN when either layer has no events) and direction_p
    (one-sided exact sign test of n_first_leads among the n_first_leads + n_first_follows
    ordered pairs; NaN when there is none).
    """
    if first not in grad_norms.columns:
        raise ValueError(f"layer {first!r} not in grad_norms columns")
    layers = [c for c in grad_norms.columns if c != first] if layers is None else list(layers)
    frame = grad_norms[[first, *layers]].sort_index()
    steps = frame.index.to_numpy()
    dt = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
    max_lag = MAX_LAG_INTERVALS * dt if max_lag is None else max_lag

    rule = SpikeRule.parse(rule)
    events = find_spikes(frame, rule) if events is None else events
    first_steps = np.sort(events.loc[events["layer"] == first, "step"].to_numpy())
    # shifts move the train by more than max_lag both ways round, so none keeps the pairs
    near = max(0, min(int(np.ceil(max_lag / dt)), (len(steps) - 2) // 2))
    shifts = np.random.default_rng(seed).integers(1 + near, max(len(steps) - near, 2), size=n_permutations)
    rows = np.searchsorted(steps, first_steps)
    null_first = np.sort(steps[(rows[None, :] + shifts[:, None]) % max(len(steps), 1)], axis=1)

    deviation = {c: log_deviation(frame[c], rule.window).reindex(frame.index).fillna(0).to_numpy()
                 for c in frame.columns}

    per_layer, matches = [], []
    for layer in layers:
        layer_steps = events.loc[events["layer"] == layer, "step"].to_numpy()
        lag = nearest_lags(first_steps[None, :], layer_steps, max_lag)[0]
        ok = ~np.isnan(lag)
        n_matched, leads, follows = int(ok.sum()), int(np.sum(lag > 0)), int(np.sum(lag < 0))
        null_matched = np.sum(~np.isnan(nearest_lags(null_first, layer_steps, max_lag)), axis=1)
        has_events = len(first_steps) > 0 and len(layer_steps) > 0
        per_layer.append({
            "layer": layer,
            "n_first_events": len(first_steps),
            "n_layer_events": len(layer_steps),
            "n_matched": n_matched,
            "n_first_leads": leads,
            "n_first_follows": follows,
            "frac_first_leads": leads / n_matched if n_matched else np.nan,
            "median_lag": np.median(lag[ok]) if n_matched else np.nan,
            "mean_lag": np.mean(lag[ok]) if n_matched else np.nan,
            "xcorr_lag": _xcorr_lag(deviation[layer], deviation[first], max_lag / dt) * dt,
            "association_p": ((1 + np.sum(null_matched >= n_matched)) / (1 + n_permutations)
                              if has_events else np.nan),
            "direction_p": (stats.binomtest(leads, leads + follows, alternative="greater").pvalue
                            if leads + follows else np.nan),
        })
        matches.append(pd.DataFrame({"layer": layer, "first_step": (layer_steps[ok] - lag[ok]).astype(steps.dtype),
                                     "layer_step": layer_steps[ok], "lag": lag[ok]}))
    per_layer = pd.DataFrame(per_layer, columns=PER_LAYER_COLUMNS)
    matches = (pd.concat(matches, ignore_index=True) if matches
               else pd.DataFrame(columns=["layer", "first_step", "layer_step", "lag"]))
    if last is None:
        last = last_block(None, layers)
    elif last not in layers:
        raise ValueError(f"last={last!r} is not one of the compared layers")
    result = LeadLagResult(per_layer, matches, events, "", first, last, n_permutations, max_lag)
    result.summary = _summary(result)
    return result


def _xcorr_lag(layer: np.ndarray, first: np.ndarray, max_rows: float) -> float:
    """Lag (in rows) of the cross-correlation peak of `layer` against `first`, |lag| <= max_rows.

    Only the 2L+1 lags needed are computed: `layer` against `first` trimmed by L rows at
    each end ("valid" mode, direct), O(n L) instead of a full-length FFT.
    """
    L = int(min(max_rows, (len(first) - 1) // 2))
    if not (np.any(layer) and np.any(first)):
        return np.nan
    corr = signal.correlate(layer, first[L:len(first) - L], mode="valid", method="direct")
    return float(np.argmax(corr) - L)


def _summary(r: LeadLagResult) -> str:
    """One plain paragraph describing a LeadLagResult."""
    n_first = int(r.per_layer["n_first_events"].iloc[0]) if len(r.per_layer) else 0
    if r.last is None:
        return f"Only {r.first} was given: there is no later layer to compare."
    if n_first == 0:
        return f"{r.first} had no spike events, so there is nothing for it to lead."
    lags = r.matches["lag"].to_numpy(dtype=float)
    text = (f"{r.first} had {n_first} spike event{'s' * (n_first != 1)}. Across {len(r.per_layer)} later layer(s), "
            f"{len(lags)} spike events had a {r.first} event within {r.max_lag:g} steps")
    if len(lags):
        text += (f"; in {np.mean(lags > 0):.0%} of them the {r.first} event came first "
                 f"(median lag {np.median(lags):g} steps)")
    row = r.per_layer.set_index("layer").loc[r.last]
    text += (f". In the last layer, {r.last}, {int(row['n_matched'])} of "
             f"{int(row['n_layer_events'])} events matched")
    if row["n_matched"]:
        direction = ("no pair had an order" if np.isnan(row["direction_p"]) else
                     f"direction p = {row['direction_p']:.3g}")
        text += (f", {int(row['n_first_leads'])} with {r.first} first and "
                 f"{int(row['n_first_follows'])} after it, median lag {row['median_lag']:g} steps; "
                 f"association p = {row['association_p']:.3g} against {r.n_permutations} circular "
                 f"shifts of the {r.first} events, {direction} (sign test)")
    verdict = {"first leads": f"{r.first} spikes lead.",
               "not significant": f"no evidence that {r.first} spikes lead."}.get(r.verdict, "")
    return text + (": " + verdict if verdict else ".")
