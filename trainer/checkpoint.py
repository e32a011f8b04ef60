"""Checkpoints in RUN_DIR/checkpoints/step-NNNNNNNN.pt: written atomically and durably, loaded
with ``weights_only=True`` so that a checkpoint from someone else cannot run code; the newest
`keep` are kept."""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.durable import write_durably

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
# numpy arrays of the RNG state in checkpoints written before it was stored as a tensor
_LEGACY_NUMPY = [np.empty(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""

    user_error = True  # the CLI prints it as one line, exit 2

    def __init__(self, message: str, *, unsafe: bool = False):
        super().__init__(message)
        self.unsafe = unsafe  # refused for what it holds, not damaged


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int  # the last optimizer step whose effects the checkpoint holds


def list_checkpoints(run_dir: str | os.PathLike) -> list[Checkpoint]:
    folder = Path(run_dir) / "checkpoints"
    found = [Checkpoint(p, int(m.group(1))) for p in folder.glob("step-*.pt")
             if (m := _NAME.match(p.name))]
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class _RememberingFile:
    """A binary file for torch.save that keeps the OSError of a failed write: torch replaces
    it with an opaque RuntimeError ('unexpected pos ...')."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(state: dict, run_dir: str | os.PathLike, step: int, keep: int = 2) -> Checkpoint:
    """torch.save to a hidden temp file, fsync, rename, fsync the folder: neither a kill nor a
    power cut leaves half a checkpoint under a final name. A failed write (disk full) raises
    ``OSError`` "<reason> while writing <file>" and leaves no temp file."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"

    def save(raw) -> None:
        file = _RememberingFile(raw)
        try:
            torch.save(state, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None

    write_durably(path, save)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.path.unlink(missing_ok=True)
    return Checkpoint(path, step)


def load_checkpoint(checkpoint: Checkpoint, map_location="cpu") -> dict:
    """The checkpoint's state; only tensors and plain values are accepted (``weights_only``).

    Raises `CheckpointError` naming the file: ``unsafe=True`` for a file that holds other
    objects (refused: unpickling them could run code), False for a damaged one.
    """
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol")  # a foreign pickle: refused below
            return torch.load(checkpoint.path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise CheckpointError(
                f"refusing {checkpoint.path}: it holds objects other than tensors and plain values, "
                "and loading those could run code; delete it unless you know who wrote it",
                unsafe=True) from None
        raise CheckpointError(f"{checkpoint.path} is damaged: {_first_line(exc)}") from None
    except Exception as exc:  # truncated or garbage files fail in several ways inside torch
        raise CheckpointError(f"{checkpoint.path} is damaged: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    """The first sentence of an error (torch appends paragraphs of advice)."""
    text = (str(exc).splitlines() or [""])[0].split(". ")[0]
    return text or type(exc).__name__


def load_latest_checkpoint(run_dir: str | os.PathLike, map_location="cpu"
                           ) -> tuple[Checkpoint, dict, list[str]] | None:
    """The newest checkpoint that loads, its state, and one warning per damaged newer one
    (skipped); None when the run has no checkpoint. An unsafe checkpoint is never skipped
    silently: it raises. When every checkpoint is damaged, raises naming them all."""
    skipped = []
    found = list_checkpoints(run_dir)
    for checkpoint in reversed(found):
        try:
            state = load_checkpoint(checkpoint, map_location)
        except CheckpointError as exc:
            if exc.unsafe:
                raise
            skipped.append(str(exc))
            continue
        return checkpoint, state, [f"{message}; resuming from the older {checkpoint.path.name}"
                                   for message in skipped]
    if skipped:
        raise CheckpointError(f"no loadable checkpoint in {Path(run_dir) / 'checkpoints'} (delete the "
                              "damaged ones to start over from step 0): " + "; ".join(skipped))
    return None
