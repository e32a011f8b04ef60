"""Which signal moved first: for each gradient spike, when each probe signal had its own excursion.

Each mechanism of a spike has its own early signal (docs/probes.md): Adam's stale second
moment shows in `adam_freshness` (falling far below 1, then jumping above it) and in the
update size (`update_l2`, `update_rms_over_lr`); attention collapse in a falling attention
entropy and a growing max logit; a first-layer lead in the other layers' gradient norms.
A signal "moves" where it passes the same spike rule as the gradient norms (`find_spikes`),
applied to the signal for rises and to its reciprocal for falls, so no second set of
thresholds exists. Its lead over a spike is the spike's first step minus the signal's first
flagged step within `lookback` steps either side: positive means the signal moved first.

The rule's window and warm-up count rows of the gradient norms (steps at `log.every=1`); a
signal logged more sparsely (attention, every `log.attention_every` steps) uses as many of
its own rows as cover the same steps, so that it is not blind for `warmup x attention_every`
steps.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd

from .spikes import SpikeRule, find_spikes

# signal -> (run table, directions that count as moving)
SIGNALS = {
    "grad_l2": ("layers", ("rise",)),
    "update_l2": ("layers", ("rise",)),
    "update_rms_over_lr": ("layers", ("rise",)),
    "adam_freshness": ("layers", ("rise", "fall")),
    "max_logit": ("attention", ("rise",)),
    "entropy_mean": ("attention", ("fall",)),
}
LOOKBACK = 50
ONSET_COLUMNS = ["layer", "step", "signal", "signal_layer", "direction", "onset_step", "lead"]
TABLE_COLUMNS = ["signal", "n_spikes", "n_moved", "n_before", "n_same_step", "n_after",
                 "median_lead", "min_lead", "max_lead", "chance_moved"]


def run_signals(run) -> dict[str, pd.DataFrame]:
    """The run's probe signals as wide frames (index step, one column per layer or block).

    Signals the run did not record (no optimizer-state probe, no attention table, an
    optimizer without that state) are left out.
    """
    out = {}
    for signal, (table, _) in SIGNALS.items():
        long = run.layers if table == "layers" else run.table("attention")
        if long is None or signal not in long.columns or long[signal].notna().sum() == 0:
            continue
        wide = long.pivot_table(index="step", columns="layer", values=signal, observed=True)
        out[signal] = wide.dropna(axis=1, how="all")
    return out


def _cadence(wide: pd.DataFrame) -> float:
    """Median steps between a signal's rows (1 for fewer than two rows)."""
    return float(np.median(np.diff(wide.index.to_numpy()))) if len(wide) > 1 else 1.0


def signal_rule(rule, wide: pd.DataFrame, reference: float = 1.0) -> SpikeRule:
    """`rule` with its window and warm-up in rows of a signal logged every `_cadence(wide)`
    steps, where the rule's own rows come every `reference` steps."""
    rule = SpikeRule.parse(rule)
    scale = max(1.0, _cadence(wide) / reference)
    return replace(rule, window=max(1, round(rule.window / scale)), warmup=math.ceil(rule.warmup / scale))


def signal_moves(signals: dict[str, pd.DataFrame], rule=None) -> pd.DataFrame:
    """Every flagged move of every signal: signal, layer, direction, step (`find_spikes` of
    the signal for rises, of its reciprocal for falls, under `signal_rule`). Names outside
    `SIGNALS` count rises."""
    reference = _cadence(signals["grad_l2"]) if "grad_l2" in signals else 1.0
    moves = []
    for signal, wide in signals.items():
        own = signal_rule(rule, wide, reference)
        for direction in SIGNALS.get(signal, (None, ("rise",)))[1]:
            found = find_spikes(wide if direction == "rise" else 1.0 / wide, own)
            moves.append(pd.DataFrame({"signal": signal, "layer": found["layer"].astype(str),
                                       "direction": direction, "step": found["step"]}))
    return (pd.concat(moves, ignore_index=True) if moves
            else pd.DataFrame(columns=["signal", "layer", "direction", "step"]))


def signal_onsets(events: pd.DataFrame, signals: dict[str, pd.DataFrame], *, rule=None,
                  lookback: int = LOOKBACK) -> pd.DataFrame:
    """Per spike event and signal, the earliest flagged move of that signal near the spike.

    events: `find_spikes` rows (layer, step, ...); signals: name -> wide frame as
    `run_signals` returns. Returns one row per (event, signal) whose signal moved within
    `lookback` steps either side: the spike's layer and step, the signal, the layer or block
    where it moved first, the direction, the signal's first flagged step, and
    lead = step - onset_step (> 0: the signal came first).
    """
    return _onsets(events, signal_moves(signals, rule), lookback)


def _onsets(events: pd.DataFrame, moves: pd.DataFrame, lookback: int) -> pd.DataFrame:
    """`signal_onsets` from the signals' moves (`signal_moves`)."""
    rows = []
    for event in events.itertuples(index=False):
        near = moves[(moves["step"] - event.step).abs() <= lookback]
        for signal, group in near.groupby("signal", sort=False):
            first = group.sort_values("step", kind="stable").iloc[0]
            rows.append((str(event.layer), int(event.step), signal, first["layer"],
                         first["direction"], int(first["step"]), int(event.step - first["step"])))
    return pd.DataFrame(rows, columns=ONSET_COLUMNS)


def precursor_table(events: pd.DataFrame, signals: dict[str, pd.DataFrame], *, rule=None,
                    lookback: int = LOOKBACK) -> pd.DataFrame:
    """Per signal: how many of the spikes it moved near (before, at, after), the median and
    range of its lead in steps (positive: before the spike), and `chance_moved`: how many it
    would have moved near anyway, n_spikes x the share of all logged steps that have one of
    its moves within `lookback` steps. A signal that moves all the time is near every spike
    at the longest lead; only n_moved well above chance_moved says something."""
    moves = signal_moves(signals, rule)
    onsets = _onsets(events, moves, lookback)
    rows = []
    for signal, wide in signals.items():
        lead = onsets.loc[onsets["signal"] == signal, "lead"].to_numpy()
        steps = wide.index.to_numpy()
        moved = np.sort(moves.loc[moves["signal"] == signal, "step"].to_numpy())
        covered = (np.searchsorted(moved, steps + lookback, side="right")
                   > np.searchsorted(moved, steps - lookback, side="left"))
        stats = ((float(np.median(lead)), int(lead.min()), int(lead.max())) if len(lead)
                 else (np.nan, np.nan, np.nan))
        rows.append((signal, len(events), len(lead), int((lead > 0).sum()), int((lead == 0).sum()),
                     int((lead < 0).sum()), *stats, len(events) * float(covered.mean())))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)
