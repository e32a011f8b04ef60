"""Reading run directories: `load_run`, `load_runs` and the `Run` object for Jupyter.

No torch here: reports and analyses load runs without it.
"""
from __future__ import annotations

import glob
import json
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stabilitylab.rundir import (ADDED_TABLES, CONFIG_FILE, META_FILE, SCHEMAS, TABLES, read_segments,
                                 segment_cutoffs)


class RunDirError(ValueError):
    """A path that is not a readable run directory (the message says what to fix)."""


def is_run_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / META_FILE).exists() and (path / "steps").is_dir()


def _parts(run_dir: Path, table: str) -> list[tuple[int | None, Path]]:
    """(gen, file) of every visible part, in write order; gen None for unpartitioned files."""
    table_dir = run_dir / table
    parts = []
    for path in sorted(table_dir.rglob("*.parquet")):
        if path.name.startswith("."):
            continue
        gen_name = path.parent.name
        gen = int(gen_name[4:]) if gen_name.startswith("gen=") and gen_name[4:].isdigit() else None
        parts.append((gen, path))
    return sorted(parts, key=lambda gp: (-1 if gp[0] is None else gp[0], gp[1].name))


def read_table(run_dir: str | os.PathLike, table: str, *, columns: list[str] | None = None,
               lenient: bool = False, as_arrow: bool = False) -> pd.DataFrame | pa.Table:
    """Valid rows of one table, sorted by step (stable), with the segment rule applied.

    `columns` projects (``step`` is always read). A corrupt part raises `RunDirError` naming
    the file; with ``lenient=True`` it is skipped with a warning instead.
    """
    run_dir = Path(run_dir)
    if table not in SCHEMAS:
        raise RunDirError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
    schema = SCHEMAS[table]
    names = schema.names if columns is None else ["step"] + [c for c in columns if c != "step"]
    missing = [c for c in names if c not in schema.names]
    if missing:
        raise RunDirError(f"table {table!r} has no column(s) {missing}; columns are {schema.names}")
    if not (run_dir / table).is_dir():
        if table not in ADDED_TABLES:
            raise RunDirError(f"{run_dir} has no {table}/ table folder: not a complete run directory")
        empty = pa.schema([schema.field(n) for n in names]).empty_table()  # a run from before the table
        return empty if as_arrow else _to_pandas(empty)
    segments = read_segments(run_dir)
    cutoffs = segment_cutoffs(segments) if segments is not None else None
    pieces = []
    for gen, path in _parts(run_dir, table):
        if cutoffs is not None and gen not in cutoffs:
            continue  # unlisted generation: leftover of an interrupted compaction
        try:
            part = _read_part(path, names, schema)
        except Exception as exc:  # pyarrow raises several types for damaged files
            message = f"corrupt Parquet part {path}: {exc}".splitlines()[0]
            if not lenient:
                raise RunDirError(message + " (load with lenient=True to skip it)") from exc
            warnings.warn(message + "; skipped", stacklevel=2)
            continue
        if cutoffs is not None and np.isfinite(cutoffs[gen]):
            part = part.filter(pc.less(part["step"], int(cutoffs[gen])))
        pieces.append(part.cast(pa.schema([schema.field(n) for n in names])))
    result = (pa.concat_tables(pieces) if pieces
              else pa.schema([schema.field(n) for n in names]).empty_table())
    step = result["step"]
    if result.num_rows > 1 and not pc.all(pc.greater_equal(step[1:], step[:-1])).as_py():
        result = result.take(pc.sort_indices(step))  # stable: keeps model order within a step
    if as_arrow:
        return result
    return _to_pandas(result)


def _read_part(path: Path, names: list[str], schema: pa.Schema) -> pa.Table:
    """Columns `names` of one part; a column the part predates comes back as nulls."""
    part_file = pq.ParquetFile(path)
    present = set(part_file.schema_arrow.names)
    part = part_file.read(columns=[n for n in names if n in present])
    for name in names:
        if name not in present:
            part = part.append_column(schema.field(name), pa.nulls(part.num_rows, schema.field(name).type))
    return part.select(names)


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    if isinstance(df.dtypes.get("layer"), pd.CategoricalDtype):  # model order = order of first appearance
        layer = df["layer"].cat.remove_unused_categories()
        first_seen = layer.cat.categories[pd.unique(layer.cat.codes.to_numpy())]
        df["layer"] = layer.cat.reorder_categories(first_seen, ordered=True)
    return df


class Run:
    """One run directory. Tables load lazily on first access and are cached.

    >>> run = load_run("runs/my_run")
    >>> run.knn.plot(x="step", y="top1")
    >>> run.grad_norms().iloc[:, [0, -1]]   # first vs last layer
    """

    def __init__(self, path: str | os.PathLike, *, lenient: bool = False):
        self.path = Path(path)
        self.lenient = lenient
        if not self.path.exists():
            raise RunDirError(f"no such run directory: {self.path}")
        if not is_run_dir(self.path):
            raise RunDirError(f"not a run directory: {self.path} (expected meta.json and steps/ "
                              "as written by `stabilitylab train`)")
        self.name = self.path.resolve().name

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.meta.get('status')!r})"

    @cached_property
    def meta(self) -> dict:
        try:
            return json.loads((self.path / META_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{self.path / META_FILE} is not valid JSON: {exc}") from exc

    @cached_property
    def config(self) -> dict:
        path = self.path / CONFIG_FILE
        if not path.exists():
            return {}
        import yaml  # omegaconf's dependency; plain YAML in, plain dicts out

        return yaml.safe_load(path.read_text()) or {}

    def table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """One table with optional column projection (uncached)."""
        return read_table(self.path, name, columns=columns, lenient=self.lenient)

    @cached_property
    def steps(self) -> pd.DataFrame:
        return self.table("steps")

    @cached_property
    def layers(self) -> pd.DataFrame:
        return self.table("layers")

    @cached_property
    def knn(self) -> pd.DataFrame:
        return self.table("knn")

    @cached_property
    def events(self) -> pd.DataFrame:
        return self.table("events")

    def config_value(self, dotted: str, default=None):
        """A config value by dotted key, e.g. ``run.config_value("model.patch_proj")``."""
        node = self.config
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def grad_norms(self, stat: str = "grad_l2") -> pd.DataFrame:
        """Wide per-layer statistic: index step, one column per layer in model order."""
        if stat not in SCHEMAS["layers"].names[2:]:
            raise ValueError(f"stat must be one of {SCHEMAS['layers'].names[2:]}, not {stat!r}")
        if "layers" in self.__dict__:
            long = self.layers[["step", "layer", stat]]
        else:
            long = self.table("layers", columns=["layer", stat])
        return pivot_layers(long, stat)


def pivot_layers(long: pd.DataFrame, stat: str) -> pd.DataFrame:
    """Long (step, layer, stat) rows -> wide frame, columns in categorical (model) order.

    Scatter by integer codes instead of DataFrame.pivot: linear time on millions of rows.
    """
    layer = long["layer"]
    layer = layer.array if isinstance(layer.dtype, pd.CategoricalDtype) else pd.Categorical(
        layer, categories=pd.unique(layer))
    step = long["step"].to_numpy()
    if len(step) and np.all(step[1:] >= step[:-1]):  # sorted (as read_table returns): linear
        new_row = np.concatenate([[True], step[1:] != step[:-1]])
        steps, row = step[new_row], np.cumsum(new_row) - 1
    else:
        steps, row = np.unique(step, return_inverse=True)
    codes = np.asarray(layer.codes)
    wide = np.full((len(steps), len(layer.categories)), np.nan, dtype=np.float64)
    wide[row, codes] = long[stat].to_numpy(dtype=np.float64)
    used = np.bincount(codes, minlength=len(layer.categories)) > 0  # drop unused categories
    return pd.DataFrame(wide[:, used], index=pd.Index(steps, name="step"),
                        columns=pd.Index([str(c) for c in layer.categories[used]], name="layer"))


def load_run(path: str | os.PathLike, *, lenient: bool = False) -> Run:
    """Open a run directory (see docs/run_directory.md). Tables load on first access."""
    return Run(path, lenient=lenient)


def expand_run_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Run directories from paths, globs, or sweep folders (folders of run directories)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for item in paths:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        if not matches:
            raise RunDirError(f"no run directory matches {item}")
        for match in matches:
            path = Path(match)
            if is_run_dir(path):
                found.append(path)
            elif path.is_dir() and (children := sorted(p for p in path.iterdir() if is_run_dir(p))):
                found.extend(children)
            elif glob.has_magic(str(item)):
                continue
            else:
                Run(path)  # raises the precise error
    if not found:
        raise RunDirError(f"no run directories found in {', '.join(map(str, paths))}")
    return found


def load_runs(paths, *, lenient: bool = False) -> list[Run]:
    """Several runs from a list of paths, a glob, or a sweep folder."""
    return [Run(p, lenient=lenient) for p in expand_run_paths(paths)]


def concat_runs(runs, table: str = "steps", *, config_keys: list[str] | None = None) -> pd.DataFrame:
    """One long frame of `table` over several runs: a whole sweep as one DataFrame.

    Each run's rows get a `run` column (its name) and one column per dotted config key in
    `config_keys`; default: every key whose value differs between the runs (e.g.
    `model.patch_proj`, `optim.base_lr`, `seed`), so that
    ``concat_runs(load_runs("runs/s4"), "knn").groupby(["model.patch_proj", "step"]).top1.mean()``
    averages seeds.
    """
    from analysis import config_table, varied_keys  # lazily: `import stabilitylab` stays light

    runs = list(runs)
    config = config_table(runs)
    if config_keys is None:
        config_keys = varied_keys(config)
    frames = []
    for i, run in enumerate(runs):
        frame = run.table(table)
        frame.insert(0, "run", run.name)
        for key in config_keys:
            frame[key] = config.at[i, key] if key in config else None
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", *config_keys])
