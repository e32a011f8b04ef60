"""Linear-probe results of a run (its `linear` table, written by `stabilitylab linprobe`).

A checkpoint may be probed several times and by both protocols: the latest probe of each
(checkpoint, protocol) counts. The run's number is that of its last probed checkpoint, by
the official protocol when it has one there (the paper's), else the fast one.
"""
from __future__ import annotations

import pandas as pd

PREFERRED = ("official", "fast")


def linear_curve(linear: pd.DataFrame) -> pd.DataFrame:
    """One row per (checkpoint step, protocol), the latest probe: step, protocol, top1, top5,
    n_val, sorted by step then protocol (official first) — a coarse linear curve for plotting
    beside the kNN curve."""
    columns = ["step", "protocol", "top1", "top5", "n_val"]
    if linear is None or linear.empty:
        return pd.DataFrame(columns=columns)
    latest = linear.sort_values("time", kind="stable").drop_duplicates(["step", "protocol"], keep="last")
    rank = latest["protocol"].map({p: i for i, p in enumerate(PREFERRED)}).fillna(len(PREFERRED))
    return latest.assign(_rank=rank).sort_values(["step", "_rank"])[columns].reset_index(drop=True)


def linear_summary(linear: pd.DataFrame) -> dict:
    """linear_top1, linear_top5 (0-1), linear_protocol and linear_step of the run's last probed
    checkpoint (None each when never probed), and linear_n_val (held-out images behind it:
    the binomial noise of linear_top1 is sqrt(p (1 - p) / n_val))."""
    curve = linear_curve(linear)
    if curve.empty:
        return dict(linear_top1=None, linear_top5=None, linear_protocol=None, linear_step=None,
                    linear_n_val=None)
    last = curve[curve["step"] == curve["step"].max()].iloc[0]
    return dict(linear_top1=float(last["top1"]), linear_top5=float(last["top5"]),
                linear_protocol=str(last["protocol"]), linear_step=int(last["step"]),
                linear_n_val=int(last["n_val"]))
