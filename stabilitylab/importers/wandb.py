"""An offline W&B run folder -> scalars and config, read with the W&B SDK's own reader of
its `.wandb` transaction log (wandb.sdk.internal.datastore): no server, no login.

The SDK does not keep the order in which one step's metrics were logged (the same script
writes them in a different order on every run), so a step's tags are read in natural name
order (`layer2` before `layer10`): the layers of an import come in that order, the same on
every import, and for names like `conv1`, `layer1.0`, ... that is the forward order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from stabilitylab.importers.core import BadLogError


def run_file(folder: Path) -> Path:
    """The run's .wandb file: the path itself, or the one in an offline-run-* folder."""
    if folder.is_file():
        if folder.suffix != ".wandb":
            raise BadLogError(f"{folder} is not a W&B run file (run-ID.wandb)")
        return folder
    files = sorted(folder.glob("*.wandb")) or sorted(folder.glob("*/*.wandb"))
    if not files:
        raise BadLogError(f"no W&B run file (*.wandb) in {folder}: give an offline-run-* folder")
    if len(files) > 1:
        raise BadLogError(f"{folder} holds {len(files)} W&B runs; import one of them: "
                          + ", ".join(str(f.parent) for f in files[:3]))
    return files[0]


def _records(path: Path):
    try:
        from wandb.proto import wandb_internal_pb2
        from wandb.sdk.internal import datastore
    except ImportError:
        raise BadLogError("reading W&B runs needs wandb < 0.30 (its file reader): "
                          "pip install 'stabilitylab[importers]'") from None
    store = datastore.DataStore()
    try:
        store.open_for_scan(str(path))
    except Exception as exc:  # the reader asserts on a bad header
        raise BadLogError(f"{path} is not a readable W&B run file: {exc or type(exc).__name__}") from None
    while True:
        try:
            data = store.scan_data()
        except Exception:  # a run killed mid-write: keep what was complete
            return
        if data is None:
            return
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        yield record


def _natural(tag: str) -> list:
    """Sort key: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", tag)]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_wandb(folder) -> tuple[pd.DataFrame, dict]:
    """(scalars: step, tag, value from the history rows, by `_step`; the run's config)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"no such W&B run folder: {folder}")
    rows, config = [], {}
    for record in _records(run_file(folder)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            values = {_key(i): json.loads(i.value_json) for i in record.history.item}
            step = values.get("_step")
            for tag, value in sorted(values.items(), key=lambda item: _natural(item[0])):
                if tag.startswith("_") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if step is not None:
                    rows.append((int(step), tag, float(value)))
    config.pop("_wandb", None)
    config = {k: v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v
              for k, v in config.items()}
    if not rows:
        raise BadLogError(f"{folder} holds no logged numbers (W&B history rows)")
    return pd.DataFrame(rows, columns=["step", "tag", "value"]), config
