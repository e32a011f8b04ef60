"""The `Run` object for Jupyter, `load_run`, `load_runs` and `concat_runs`.

The format itself (schemas, segment rule, reader) lives in `stabilitylab.rundir`.
No torch here: reports and analyses load runs without it.
"""
from __future__ import annotations

import glob
import os
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from stabilitylab.rundir import SCHEMAS, RunDirError, is_run_dir, read_config, read_meta, read_table


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
        return read_meta(self.path, lenient=self.lenient)

    @cached_property
    def config(self) -> dict:
        return read_config(self.path, lenient=self.lenient)

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

    @cached_property
    def linear(self) -> pd.DataFrame:
        """Linear-probe results (`stabilitylab linprobe`); empty for a run never probed."""
        return self.table("linear")

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


def run_dirs_under(folder: Path) -> list[Path]:
    """The run directories in `folder`, sorted: its subfolders that are run directories (a
    sweep folder), or when it has none (a folder of sweeps) those found the same way in each
    subfolder. Hidden folders are skipped."""
    children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p for p in children if is_run_dir(p)] or [r for child in children for r in run_dirs_under(child)]


def expand_run_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Run directories from paths, globs, sweep folders or folders of sweeps (see `run_dirs_under`)."""
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
            elif path.is_dir() and (children := run_dirs_under(path)):
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
    `config_keys`; default: every key whose value differs between the runs, the
    `analysis.RUNTIME_KEYS` aside (e.g.
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
