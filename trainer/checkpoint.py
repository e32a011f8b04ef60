"""Atomic checkpoints in RUN_DIR/checkpoints/step-NNNNNNNN.pt; the newest `keep` are kept."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d{8,})\.pt$")


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


def save_checkpoint(state: dict, run_dir: str | os.PathLike, step: int, keep: int = 2) -> Checkpoint:
    """torch.save to a hidden temp file, then rename: a kill never leaves half a checkpoint."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.path.unlink(missing_ok=True)
    return Checkpoint(path, step)


def load_checkpoint(checkpoint: Checkpoint, map_location="cpu") -> dict:
    # weights_only=False: the checkpoint holds RNG states and plain config values we wrote ourselves
    return torch.load(checkpoint.path, map_location=map_location, weights_only=False)
