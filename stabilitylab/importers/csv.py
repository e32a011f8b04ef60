"""A metrics CSV -> scalars: one row per step, wide (a column per metric) or long (tag, value)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stabilitylab.importers.core import BadLogError

STEP_NAMES = ("step", "global_step", "_step", "iteration", "iter", "trainer/global_step")
LONG_TAG_NAMES = ("tag", "metric", "name", "key")


def read_csv(path, *, step: str | None = None, tag: str | None = None,
             value: str | None = None) -> tuple[pd.DataFrame, dict]:
    """(scalars: step, tag, value; no config). `step` names the step column (default: the
    first of STEP_NAMES present); `tag` and `value` name a long file's columns (default:
    tag/metric/name/key and value when present, else the file is wide)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such CSV file: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BadLogError(f"{path} is not a readable CSV file: {exc}".splitlines()[0]) from None
    columns = list(frame.columns)
    step = step or next((c for c in STEP_NAMES if c in columns), None)
    if step not in columns:
        named = f"{step!r} " if step else ""
        raise BadLogError(f"no step column {named}in {path}: name it with --step (columns: "
                          + ", ".join(map(str, columns[:8])) + ")")
    if tag is None and value is None and "value" in columns:
        tag, value = next((c for c in LONG_TAG_NAMES if c in columns), None), "value"
    if tag is not None or value is not None:
        missing = [c for c in (tag, value) if c not in columns]
        if missing:
            raise BadLogError(f"no column {missing[0]!r} in {path} for --tag/--value (columns: "
                              + ", ".join(map(str, columns[:8])) + ")")
        long = frame[[step, tag, value]].set_axis(["step", "tag", "value"], axis=1)
    else:
        metrics = [c for c in columns if c != step and pd.api.types.is_numeric_dtype(frame[c])]
        long = frame.melt(id_vars=[step], value_vars=metrics, var_name="tag",
                          value_name="value").rename(columns={step: "step"})
    long["step"] = pd.to_numeric(long["step"], errors="coerce")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long = long.dropna(subset=["step", "value"])
    if long.empty:
        raise BadLogError(f"{path} has no numeric values with a step")
    return long.astype({"tag": str}), {}
