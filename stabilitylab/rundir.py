"""The run directory: table schemas, the crash-safe Parquet writer and the segment rule.

See docs/run_directory.md for the contract. This module has no torch dependency: the
trainer is handed a `RunWriter` by its caller and only calls `append`, `event`,
`should_flush`, `flush` and `update_meta` on it.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TIMESTAMP = pa.timestamp("us", tz="UTC")
LAYER_TYPE = pa.dictionary(pa.int16(), pa.string())

SCHEMAS: dict[str, pa.Schema] = {
    "steps": pa.schema([
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("lr", pa.float64()),
        ("momentum", pa.float64()),
        ("loss", pa.float32()),
        ("grad_norm", pa.float32()),
        ("patch_proj_grad_norm_clipped", pa.float32()),
        ("images_per_sec", pa.float32()),
        ("step_time_s", pa.float32()),
        ("loss_scale", pa.float32()),
        ("skipped", pa.bool_()),
        ("time", TIMESTAMP),
    ]),
    "layers": pa.schema([
        ("step", pa.int64()),
        ("layer", LAYER_TYPE),
        ("grad_l2", pa.float32()),
        ("grad_max_abs", pa.float32()),
        ("param_l2", pa.float32()),
        ("update_l2", pa.float32()),
        # optimizer state (trainer/probes_optim.py), null where the optimizer keeps none
        ("adam_freshness", pa.float32()),
        ("adam_small_v_frac", pa.float32()),
        ("update_rms_over_lr", pa.float32()),
        ("update_cos_neg_grad", pa.float32()),
        ("lars_trust_ratio", pa.float32()),
    ]),
    "knn": pa.schema([
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("source", pa.string()),
        ("k", pa.int32()),
        ("top1", pa.float64()),
        ("top5", pa.float64()),
        ("bank_size", pa.int64()),
        ("n_queries", pa.int64()),
        ("effective_rank", pa.float64()),
        ("feature_std", pa.float64()),
    ]),
    "events": pa.schema([
        ("step", pa.int64()),
        ("kind", pa.string()),
        ("detail", pa.string()),
        ("time", TIMESTAMP),
        ("layer", pa.string()),  # spike events: the layer and its ratio over the running median
        ("ratio", pa.float64()),
    ]),
    "attention": pa.schema([
        ("step", pa.int64()),
        ("layer", LAYER_TYPE),
        ("entropy_mean", pa.float32()),
        ("entropy_min", pa.float32()),
        ("max_logit", pa.float32()),
    ]),
}
ADDED_TABLES = ("attention",)  # tables newer than the first runs: a run without the folder has no rows
TABLES = tuple(SCHEMAS)
SEGMENTS_FILE = "segments.json"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_segments(run_dir: Path) -> list[dict] | None:
    """The listed generations, or None for a directory written without a segments file."""
    path = Path(run_dir) / SEGMENTS_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def segment_cutoffs(segments: list[dict]) -> dict[int, float]:
    """gen -> exclusive upper step bound of its valid rows (the segment rule)."""
    cutoffs, later_min = {}, float("inf")
    for seg in sorted(segments, key=lambda s: s["gen"], reverse=True):
        cutoffs[seg["gen"]] = later_min
        later_min = min(later_min, seg["start_step"])
    return cutoffs


def next_gen(run_dir: Path) -> int:
    """A generation number above every listed one and every folder on disk (even unlisted
    leftovers of an interrupted compaction, which must never be revived)."""
    listed = [s["gen"] for s in read_segments(run_dir) or []]
    on_disk = [int(p.name[4:]) for t in TABLES for p in (run_dir / t).glob("gen=*")
               if p.name[4:].isdigit()]
    return max(listed + on_disk, default=-1) + 1


def to_arrow(table: str, columns: Mapping[str, Sequence] | pa.Table) -> pa.Table:
    """Columns (numpy arrays, lists) -> an Arrow table with the table's schema.

    Missing nullable columns become nulls; extra columns are an error so typos surface.
    """
    if isinstance(columns, pa.Table):
        return columns.select(SCHEMAS[table].names).cast(SCHEMAS[table])
    schema = SCHEMAS[table]
    unknown = set(columns) - set(schema.names)
    if unknown:
        raise KeyError(f"unknown column(s) for table {table!r}: {sorted(unknown)}")
    n = len(next(iter(columns.values())))
    arrays = []
    for field in schema:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        elif pa.types.is_dictionary(field.type):
            arrays.append(pa.array(np.asarray(value, dtype=object), pa.string())
                          .dictionary_encode().cast(field.type))
        elif pa.types.is_floating(field.type):
            arr = np.asarray(value, dtype=field.type.to_pandas_dtype())
            arrays.append(pa.array(arr, field.type, from_pandas=True))  # NaN -> null
        else:
            arrays.append(pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    # noisy floats compress best byte-stream-split, which pyarrow only applies to columns
    # that are not dictionary-encoded: keep dictionaries for the other columns only
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    others = [f.name for f in table.schema if f.name not in floats]
    pq.write_table(table, tmp, compression="zstd", use_dictionary=others or False,
                   use_byte_stream_split=floats or False)
    os.replace(tmp, path)


class RunWriter:
    """Buffers table rows in memory and flushes them as complete Parquet files.

    A flush writes one file per non-empty table under ``TABLE/gen=G/`` via a temporary
    name and an atomic rename, so a process killed at any moment leaves only complete
    files. ``resume_step`` (the step of the checkpoint being resumed) opens a new
    generation starting at ``resume_step + 1``: rows of older generations from that step on
    are superseded for every reader.
    """

    def __init__(self, run_dir: str | os.PathLike, *, flush_every_steps: int = 500,
                 flush_every_s: float = 60.0, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.flush_every_steps = flush_every_steps
        self.flush_every_s = flush_every_s
        self.run_dir.mkdir(parents=True, exist_ok=True)
        segments = read_segments(self.run_dir) or []
        if resume_step is None and segments:
            raise FileExistsError(f"{self.run_dir} already holds logs; resume it or pick a new directory")
        self.gen = next_gen(self.run_dir)
        start = 0 if resume_step is None else resume_step + 1
        self._segments = segments + [{"gen": self.gen, "start_step": start}]
        for table in TABLES:
            (self.run_dir / table / f"gen={self.gen}").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "checkpoints").mkdir(exist_ok=True)
        atomic_write_text(self.run_dir / SEGMENTS_FILE, json.dumps(self._segments))
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._part = 0
        self._last_flush_step = start - 1
        self._last_flush_time = time.monotonic()

    def append(self, table: str, columns: Mapping[str, Sequence] | pa.Table) -> None:
        """Buffer rows for `table` (columns of equal length)."""
        rows = to_arrow(table, columns)
        if rows.num_rows:
            self._buffers[table].append(rows)

    def event(self, step: int, kind: str, detail: str = "") -> None:
        self.append("events", {"step": [step], "kind": [kind], "detail": [detail],
                               "time": [utc_now()]})

    def should_flush(self, step: int) -> bool:
        """True when `flush_every_steps` steps or `flush_every_s` seconds have passed."""
        return (step - self._last_flush_step >= self.flush_every_steps
                or time.monotonic() - self._last_flush_time >= self.flush_every_s)

    def flush(self, step: int | None = None) -> None:
        """Write every buffered table as one Parquet file each."""
        for table, parts in self._buffers.items():
            if parts:
                path = self.run_dir / table / f"gen={self.gen}" / f"part-{self._part:06d}.parquet"
                write_parquet_atomic(pa.concat_tables(parts), path)
                parts.clear()
        self._part += 1
        if step is not None:
            self._last_flush_step = step
        self._last_flush_time = time.monotonic()

    def update_meta(self, **fields) -> None:
        update_meta(self.run_dir, **fields)

    def close(self, compact: bool = True) -> None:
        """Flush what is buffered and, by default, compact the tables into one file each."""
        self.flush()
        if compact:
            compact_run(self.run_dir)


def compact_run(run_dir: str | os.PathLike) -> None:
    """Rewrite every table's valid rows into one new generation and drop the old ones.

    Listing the new generation with start_step 0 in segments.json is the commit point:
    before it readers use the old files, after it the new one; leftover old folders are
    superseded by the rule and deleted last.
    """
    from stabilitylab.run import read_table  # the reader owns the segment rule

    run_dir = Path(run_dir)
    new_gen = next_gen(run_dir)
    for table in TABLES:
        rows = read_table(run_dir, table, as_arrow=True)
        gen_dir = run_dir / table / f"gen={new_gen}"
        gen_dir.mkdir(parents=True, exist_ok=True)
        if rows.num_rows:
            write_parquet_atomic(rows, gen_dir / "part-000000.parquet")
    atomic_write_text(run_dir / SEGMENTS_FILE, json.dumps([{"gen": new_gen, "start_step": 0}]))
    for table in TABLES:
        for gen_dir in (run_dir / table).glob("gen=*"):
            if gen_dir.name != f"gen={new_gen}":
                shutil.rmtree(gen_dir, ignore_errors=True)


def write_meta(run_dir: str | os.PathLike, meta: dict) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / META_FILE, json.dumps(meta, indent=2, default=str))


def update_meta(run_dir: str | os.PathLike, **fields) -> dict:
    path = Path(run_dir) / META_FILE
    meta = json.loads(path.read_text()) if path.exists() else {}
    meta.update(fields)
    write_meta(run_dir, meta)
    return meta
