"""The run directory, both ways: table schemas, the lock, the crash-safe writer, the segment
rule and the reader.

See docs/run_directory.md for the contract. This module has no torch dependency: the
trainer is handed a `RunWriter` by its caller and only calls `append`, `event`,
`should_flush`, `flush` and `update_meta` on it; `stabilitylab.run.Run` reads through
`read_table`, `read_meta` and `read_config`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trainer.durable import write_durably, write_failure

if TYPE_CHECKING:  # pandas is imported where tables are read: the CLI's --help and the writer need none
    import pandas as pd

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
    "linear": pa.schema([  # written by `stabilitylab linprobe`, one row per probe
        ("step", pa.int64()),  # the probed checkpoint's step
        ("protocol", pa.string()),
        ("epoch", pa.float64()),
        ("top1", pa.float64()),
        ("top5", pa.float64()),
        ("train_loss", pa.float64()),
        ("n_train", pa.int64()),
        ("n_val", pa.int64()),
        ("settings", pa.string()),
        ("time", TIMESTAMP),
    ]),
}
TABLES = tuple(SCHEMAS)
SEGMENTS_FILE = "segments.json"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
CHECKPOINT_DIR = "checkpoints"
# every name the format puts in a run directory (a folder holding only these is one, maybe half made)
RUN_ENTRIES = frozenset({CONFIG_FILE, META_FILE, SEGMENTS_FILE, LOCK_FILE, CHECKPOINT_DIR, *TABLES})
LENIENT_HINT = " (--lenient / lenient=True skips it)"
_PART = re.compile(r"^part-(\d+)\.parquet$")


class RunDirError(ValueError):
    """A path that is not a readable run directory (the message says what to fix)."""

    user_error = True  # the CLI prints it as one line and exits 2


class RunInUseError(RunDirError):
    """Another process holds the run directory's lock."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- durable writes (trainer.durable)

def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never half, and a
    power cut cannot leave it empty (file and directory are fsynced: a commit point)."""
    write_durably(path, lambda f: f.write(text), mode="w")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """One complete, fsynced Parquet file under its final name (temporary name, then rename)."""
    # noisy floats compress best byte-stream-split, which pyarrow only applies to columns
    # that are not dictionary-encoded: keep dictionaries for the other columns only
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    others = [f.name for f in table.schema if f.name not in floats]
    write_durably(path, lambda f: pq.write_table(table, f, compression="zstd", use_dictionary=others or False,
                                                 use_byte_stream_split=floats or False),
                  failure_target=Path(path).parent.parent)


def remove_temporaries(run_dir: Path) -> None:
    """Delete the ``.*.tmp`` files that a killed write left behind (call with the lock held)."""
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / CHECKPOINT_DIR] + [g for t in TABLES for g in (run_dir / t).glob("gen=*")]
    for folder in folders:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- the lock

class RunLock:
    """The exclusive lock on one run directory, held until `release()` or the process ends.

    A POSIX record lock (``fcntl.lockf``) on ``RUN_DIR/.lock`` (which says who holds it): the
    kernel drops it when the holder dies, so the lock of a killed process never blocks, and,
    unlike ``flock``, forked children (DataLoader workers, which outlive a killed parent for
    a few seconds) do not inherit it. POSIX locks belong to the process, so one process
    holds at most one `RunLock` per directory. Creates the directory (and parents) if needed.
    """

    _held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"{self.run_dir} is a file, not a run directory; give a directory path")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create {self.run_dir}: {exc.strerror or exc}") from None
        key = str(self.run_dir.resolve())
        if key in RunLock._held:
            raise RunInUseError(f"{self.run_dir} is already open for writing in this process")
        path = self.run_dir / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise RunDirError(f"cannot lock {self.run_dir}: {exc.strerror or exc}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise RunDirError(f"cannot lock {self.run_dir}: {exc.strerror or exc}") from None
                raise RunInUseError(f"{self.run_dir} is being written by another process "
                                    f"({_describe_holder(holder)}); wait for it to end or stop it") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was replaced between open and lock: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": utc_now().isoformat(timespec="seconds"),
                                 "command": " ".join(sys.argv)}).encode())
        self._fd = fd
        RunLock._held[key] = self
        self._key = key

    def release(self) -> None:
        """Unlock and remove the lock file (a process that opened it meanwhile notices that
        the name is gone once it holds the lock, and locks a fresh file instead)."""
        if self._fd is None:
            return
        try:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)
        except OSError:
            pass  # a read-only disk: the stale file does not block anyone
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        RunLock._held.pop(self._key, None)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError, TypeError):
        return "unknown process"


# ---------------------------------------------------------------- the segment rule

def read_segments(run_dir: str | os.PathLike, *, lenient: bool = False) -> list[dict] | None:
    """The listed generations, or None for a directory written without a segments file.

    A damaged file raises `RunDirError`; with ``lenient=True`` it warns and returns None
    (every generation is then read, so superseded rows may repeat).
    """
    path = Path(run_dir) / SEGMENTS_FILE
    if not path.exists():
        return None
    try:
        segments = json.loads(path.read_bytes())
        valid = isinstance(segments, list) and all(
            isinstance(s, dict) and _is_count(s.get("gen")) and _is_count(s.get("start_step"))
            and _is_count(s.get("flushes", 0)) and isinstance(s.get("append", False), bool)
            for s in segments)
        if not valid:
            raise ValueError("expected a list of {\"gen\": G, \"start_step\": S} entries")
    except (ValueError, UnicodeDecodeError) as exc:
        message = f"{path} is damaged: {str(exc).splitlines()[0]}"
        if not lenient:
            raise RunDirError(message + " (--lenient / lenient=True reads every generation)") from None
        warnings.warn(message + "; reading every generation, superseded rows may repeat", stacklevel=3)
        return None
    return segments


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def segment_bounds(segments: list[dict]) -> dict[int, tuple[float, float, int | None]]:
    """gen -> (lower bound, exclusive upper bound, committed flushes or None): the segment rule.

    A row of generation g is valid iff floor(g) <= step < floor of every later generation
    that is not an append-only one, and it lies in one of g's first `flushes` part files (all
    when unrecorded). floor(g) is g's start_step, or -inf when that is 0: a generation that
    starts at step 0 (a new run, a restart, a compaction) holds rows from before the first
    step too (the untrained network's kNN at step -1) and supersedes every earlier row. An
    append-only generation ("append": true, start_step 0: rows added to a run after the
    fact, such as linear probes) supersedes nothing.
    """
    bounds, later_min = {}, float("inf")
    for seg in sorted(segments, key=lambda s: s["gen"], reverse=True):
        floor = seg["start_step"] if seg["start_step"] > 0 else -math.inf
        bounds[seg["gen"]] = (floor, later_min, seg.get("flushes"))
        if not seg.get("append", False):
            later_min = min(later_min, floor)
    return bounds


def next_gen(run_dir: Path) -> int:
    """A generation number above every listed one and every folder on disk (even unlisted
    leftovers of an interrupted compaction, which must never be revived)."""
    listed = [s["gen"] for s in read_segments(run_dir) or []]
    return max(listed + _gens_on_disk(run_dir), default=-1) + 1


def _gens_on_disk(run_dir: Path) -> list[int]:
    return [int(p.name[4:]) for t in TABLES for p in (Path(run_dir) / t).glob("gen=*")
            if p.name[4:].isdigit()]


# ---------------------------------------------------------------- writing

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


class RunWriter:
    """Buffers table rows in memory and flushes them as complete Parquet files.

    Constructing a writer takes the directory's exclusive `RunLock` before touching
    anything (or takes over `lock`, one the caller already holds); `close()` releases it.
    A flush writes one fsynced file per non-empty table under ``TABLE/gen=G/``, then commits
    them together by recording the flush count in segments.json: a process killed at any
    moment leaves whole flushes only, never a `steps` part without its `layers` part.
    ``resume_step`` (the step of the checkpoint being resumed; -1 starts over from step 0)
    opens a new generation starting at ``resume_step + 1``: rows of older generations from
    that step on are superseded for every reader. ``append=True`` opens an append-only
    generation in a run that has logs: its rows (at any step) supersede none (linear probes
    of a run's checkpoints, written after the fact).
    """

    def __init__(self, run_dir: str | os.PathLike, *, flush_every_steps: int = 500,
                 flush_every_s: float = 60.0, resume_step: int | None = None,
                 append: bool = False, lock: RunLock | None = None):
        self.run_dir = Path(run_dir)
        self.flush_every_steps = flush_every_steps
        self.flush_every_s = flush_every_s
        self.lock = lock if lock is not None else RunLock(self.run_dir)
        self._closed = False
        try:
            segments = read_segments(self.run_dir) or []
            if resume_step is None and segments and not append:
                raise FileExistsError(f"{self.run_dir} already holds logs; resume it or pick a new directory")
            if append and resume_step is not None:
                raise ValueError("an append-only writer has no resume_step")
            self.gen = next_gen(self.run_dir)
            self.start_step = 0 if resume_step is None else resume_step + 1
            _remove_unlisted(self.run_dir, segments)
            remove_temporaries(self.run_dir)
            self._segments = segments + [{"gen": self.gen, "start_step": self.start_step, "flushes": 0,
                                          **({"append": True} if append else {})}]
            try:
                for table in TABLES:
                    (self.run_dir / table / f"gen={self.gen}").mkdir(parents=True, exist_ok=True)
                (self.run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
            except OSError as exc:
                raise write_failure(exc, self.run_dir) from None
            atomic_write_text(self.run_dir / SEGMENTS_FILE, json.dumps(self._segments))
        except BaseException:
            self.lock.release()
            raise
        self._buffers: dict[str, list[pa.Table]] = {t: [] for t in TABLES}
        self._part = 0
        self._last_flush_step = self.start_step - 1
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
        """Write every buffered table as one Parquet file each, then commit them as one unit."""
        pending = [(table, parts) for table, parts in self._buffers.items() if parts]
        if pending:
            part = self._part
            self._part += 1  # a part number is used once, even when a write below fails
            for table, parts in pending:
                path = self.run_dir / table / f"gen={self.gen}" / f"part-{part:06d}.parquet"
                write_parquet_atomic(pa.concat_tables(parts), path)
                parts.clear()
            self._segments[-1]["flushes"] = self._part
            atomic_write_text(self.run_dir / SEGMENTS_FILE, json.dumps(self._segments))
        if step is not None:
            self._last_flush_step = step
        self._last_flush_time = time.monotonic()

    def update_meta(self, **fields) -> None:
        update_meta(self.run_dir, **fields)

    def compact(self) -> None:
        """Flush, then rewrite every table's valid rows into one file each; the lock stays
        held and later rows go to the compacted generation."""
        self.flush()
        self.gen = _compact(self.run_dir)
        self._segments, self._part = [{"gen": self.gen, "start_step": 0, "flushes": 1}], 1

    def close(self, compact: bool = True) -> None:
        """Flush what is buffered, by default compact the tables into one file each, and
        release the lock (also when a write fails)."""
        if self._closed:
            return
        self._closed = True
        try:
            if compact:
                self.compact()
            else:
                self.flush()
        finally:
            self.lock.release()


def _remove_unlisted(run_dir: Path, segments: list[dict]) -> None:
    """Delete generation folders that segments.json does not list (an interrupted
    compaction's output: never read). Only with the lock held and a segments file."""
    if not segments:
        return
    listed = {f"gen={s['gen']}" for s in segments}
    for table in TABLES:
        for gen_dir in (run_dir / table).glob("gen=*"):
            if gen_dir.name not in listed:
                shutil.rmtree(gen_dir, ignore_errors=True)


def compact_run(run_dir: str | os.PathLike) -> None:
    """Rewrite every table's valid rows into one new generation and drop the old ones
    (takes the directory's lock for the duration)."""
    with RunLock(run_dir):
        _compact(Path(run_dir))


def _compact(run_dir: Path) -> int:
    """Listing the new generation with start_step 0 in segments.json is the commit point:
    before it readers use the old files, after it the new one; leftover old folders are
    superseded by the rule and deleted last. Returns the new generation."""
    new_gen = next_gen(run_dir)
    for table in TABLES:
        rows = read_table(run_dir, table, as_arrow=True)
        gen_dir = run_dir / table / f"gen={new_gen}"
        try:
            gen_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failure(exc, run_dir / table) from None
        if rows.num_rows:
            write_parquet_atomic(rows, gen_dir / "part-000000.parquet")
    atomic_write_text(run_dir / SEGMENTS_FILE,
                      json.dumps([{"gen": new_gen, "start_step": 0, "flushes": 1}]))
    for table in TABLES:
        for gen_dir in (run_dir / table).glob("gen=*"):
            if gen_dir.name != f"gen={new_gen}":
                shutil.rmtree(gen_dir, ignore_errors=True)
    return new_gen


def write_meta(run_dir: str | os.PathLike, meta: dict) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / META_FILE, json.dumps(meta, indent=2, default=str))


def update_meta(run_dir: str | os.PathLike, **fields) -> dict:
    path = Path(run_dir) / META_FILE
    meta = read_meta(run_dir) if path.exists() else {}
    meta.update(fields)
    write_meta(run_dir, meta)
    return meta


# ---------------------------------------------------------------- reading

def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).exists() and (path / "steps").is_dir()


def read_meta(run_dir: str | os.PathLike, *, lenient: bool = False) -> dict:
    """meta.json as a dict; a damaged file raises `RunDirError` (lenient: warns, returns {})."""
    path = Path(run_dir) / META_FILE
    try:
        meta = json.loads(path.read_bytes())
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, found {type(meta).__name__}")
    except (ValueError, UnicodeDecodeError) as exc:
        return _damaged(path, f"is not valid JSON: {exc}", lenient, {})
    return meta


def read_config(run_dir: str | os.PathLike, *, lenient: bool = False) -> dict:
    """config.yaml as plain dicts ({} when absent), parsed safely: no Python tags, no
    interpolation. A damaged file raises `RunDirError` (lenient: warns, returns {})."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        return read_yaml_mapping(path)
    except ValueError as exc:
        return _damaged(path, str(exc), lenient, {})


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file holding a mapping, as plain dicts; safe YAML only (a ``!!python`` tag is
    an error, never code). Raises ValueError with one line saying what is wrong."""
    import yaml  # omegaconf's dependency; plain YAML in, plain dicts out

    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("is not a text file (not UTF-8)") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"is not valid YAML: {exc.problem or exc.context}{where}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"holds a YAML {type(data).__name__}, not a mapping of config keys")
    return data


def _damaged(path: Path, what: str, lenient: bool, fallback):
    message = f"{path} {what}".splitlines()[0]
    if not lenient:
        raise RunDirError(message + LENIENT_HINT)
    warnings.warn(message + "; skipped", stacklevel=3)
    return fallback


def _parts(run_dir: Path, table: str) -> list[tuple[int | None, int | None, Path]]:
    """(gen, part number, file) of every visible part, in write order; gen None for
    unpartitioned files, part number None for names the writer does not use."""
    parts = []
    for path in (run_dir / table).rglob("*.parquet"):
        if path.name.startswith("."):
            continue
        gen_name = path.parent.name
        gen = int(gen_name[4:]) if gen_name.startswith("gen=") and gen_name[4:].isdigit() else None
        match = _PART.match(path.name)
        parts.append((gen, int(match.group(1)) if match else None, path))
    return sorted(parts, key=lambda p: (-1 if p[0] is None else p[0], p[2].name))


def read_table(run_dir: str | os.PathLike, table: str, *, columns: list[str] | None = None,
               lenient: bool = False, as_arrow: bool = False) -> pd.DataFrame | pa.Table:
    """Valid rows of one table, sorted by step (stable), with the segment rule applied.

    `columns` projects (``step`` is always read); a column that an older part lacks reads
    as nulls, a table folder that an older run lacks as no rows. A damaged part (unreadable,
    or a column of the wrong type) raises `RunDirError` naming the file; with
    ``lenient=True`` it is skipped with a warning.
    """
    run_dir = Path(run_dir)
    if table not in SCHEMAS:
        raise RunDirError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
    schema = SCHEMAS[table]
    names = schema.names if columns is None else ["step"] + [c for c in columns if c != "step"]
    missing = [c for c in names if c not in schema.names]
    if missing:
        raise RunDirError(f"table {table!r} has no column(s) {missing}; columns are {schema.names}")
    target = pa.schema([schema.field(n) for n in names])
    if not (run_dir / table).is_dir():  # a table added after the run was written
        result = target.empty_table()
        return result if as_arrow else _to_pandas(result)
    try:
        result = _read_valid_rows(run_dir, table, target, lenient)
    except FileNotFoundError:  # a compaction finished between listing and reading: read again
        result = _read_valid_rows(run_dir, table, target, lenient)
    step = result["step"]
    if result.num_rows > 1 and not pc.all(pc.greater_equal(step[1:], step[:-1])).as_py():
        result = result.take(pc.sort_indices(step))  # stable: keeps model order within a step
    if as_arrow:
        return result
    return _to_pandas(result)


def _read_valid_rows(run_dir: Path, table: str, target: pa.Schema, lenient: bool) -> pa.Table:
    segments = read_segments(run_dir, lenient=lenient)
    bounds = segment_bounds(segments) if segments is not None else None
    pieces = []
    for gen, number, path in _parts(run_dir, table):
        if bounds is not None:
            if gen not in bounds:
                continue  # unlisted generation: leftover of an interrupted compaction
            start, end, flushes = bounds[gen]
            if flushes is not None and (number is None or number >= flushes):
                continue  # not committed: the writer died in the middle of this flush
            if end == -math.inf:
                continue  # superseded: a later generation started over from step 0
        part = _read_part(path, target, lenient)
        if part is None:
            continue
        if bounds is not None and (np.isfinite(start) or np.isfinite(end)):
            step = part["step"]
            keep = pc.greater_equal(step, int(start)) if np.isfinite(start) else None
            if np.isfinite(end):
                below = pc.less(step, int(end))
                keep = below if keep is None else pc.and_(keep, below)
            part = part.filter(keep)
        pieces.append(part)
    return pa.concat_tables(pieces) if pieces else target.empty_table()


def _read_part(path: Path, target: pa.Schema, lenient: bool) -> pa.Table | None:
    """One part in the `target` schema; None when damaged and lenient."""
    try:
        with pq.ParquetFile(path) as file:
            present = set(file.schema_arrow.names)
            if "step" not in present:
                raise ValueError("no step column")
            part = file.read(columns=[n for n in target.names if n in present])
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises several types for damaged files
        return _bad_part(f"corrupt Parquet part {path}: {exc}", lenient)
    if part.schema.equals(target):
        return part
    arrays = []
    for field in target:
        if field.name not in present or pa.types.is_null(part[field.name].type):
            arrays.append(pa.nulls(part.num_rows, field.type))
            continue
        column = part[field.name]
        try:
            converted = column.cast(field.type) if _kind(column.type) == _kind(field.type) else None
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # e.g. a value out of range
            converted = None
        if converted is None:
            return _bad_part(f"Parquet part {path}: column {field.name!r} is {column.type}, "
                             f"not {field.type}", lenient)
        arrays.append(converted)
    return pa.Table.from_arrays(arrays, schema=target)


def _kind(arrow_type: pa.DataType) -> str:
    """Types that convert without reinterpreting the data: numbers among themselves (an
    older part's float64 loss), text and dictionary-encoded text, timestamps."""
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    for kind, test in [("number", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)),
                       ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
                       ("time", pa.types.is_timestamp), ("bool", pa.types.is_boolean)]:
        if test(arrow_type):
            return kind
    return str(arrow_type)


def _bad_part(message: str, lenient: bool) -> None:
    message = message.splitlines()[0]
    if not lenient:
        raise RunDirError(message + LENIENT_HINT)
    warnings.warn(message + "; skipped", stacklevel=4)
    return None


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    import pandas as pd

    df = table.to_pandas()
    if isinstance(df.get("layer", pd.Series()).dtype, pd.CategoricalDtype):
        # the dictionary-encoded layer columns (layers, attention): categories in model
        # order = order of first appearance; events' optional layer stays plain text
        layer = df["layer"].cat.remove_unused_categories()
        first_seen = layer.cat.categories[pd.unique(layer.cat.codes.to_numpy())]
        df["layer"] = layer.cat.reorder_categories(first_seen, ordered=True)
    return df
