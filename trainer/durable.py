"""Durable writes: a file appears under its final name complete or not at all, and once
written it survives a power cut (the file and its folder are fsynced: a commit point).

One mechanism for the run writer's small files and Parquet parts (`stabilitylab.rundir`) and
for checkpoints (`trainer.checkpoint`). Plain Python, no torch: the readers import it too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def tmp_name(path: Path) -> Path:
    """The hidden temporary a write goes to before its rename (``.*.tmp``: leftovers of a
    killed write are found by that pattern)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure(exc: OSError, target: str | os.PathLike) -> OSError:
    """The one-line form of a failed write: ``No space left on device while writing RUN/layers``."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc).splitlines()[0]
    return OSError(exc.errno, f"{reason} while writing {target}")


def write_durably(path: str | os.PathLike, write: Callable[[IO], None], *, mode: str = "wb",
                  failure_target: str | os.PathLike | None = None) -> None:
    """`write(file)` into a temporary beside `path`, fsync it, rename it to `path`, fsync the
    folder. A failed write raises `write_failure` naming `failure_target` (default `path`)
    and leaves no temporary behind."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_failure(exc, path if failure_target is None else failure_target) from None
