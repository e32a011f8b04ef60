"""Per-iteration learning-rate and key-encoder momentum schedules of MoCo v3.

Both are the official facebookresearch/moco-v3 `main_moco.py` functions
(`adjust_learning_rate`, `adjust_moco_momentum`) evaluated at the fractional epoch
`step / steps_per_epoch`, where `step` is the 0-based optimizer step (so step 0 has lr 0,
as in the official code, which calls them with `epoch + i / iters_per_epoch`).
"""
from __future__ import annotations

import math


def _epoch(step: int, steps_per_epoch: int, epochs: float) -> float:
    """Fractional epoch of `step`, clamped to `epochs`: past the end the final value is kept."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return min(step / steps_per_epoch, epochs)


SCHEDULES = ("cosine", "constant")
REFERENCE_BATCH = 256  # the linear scaling rule's reference batch (Goyal et al. 2017; MoCo v3)


def scaled_lr(base_lr: float, batch: int) -> float:
    """The linear scaling rule: lr = base_lr * batch / 256, `base_lr` being per 256 images."""
    return base_lr * batch / REFERENCE_BATCH


def lr_at(step: int, *, base_lr: float, global_batch: int, steps_per_epoch: int,
          warmup_epochs: float, epochs: float, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step`.

    Peak lr = base_lr * global_batch / 256 (linear scaling rule); linear warmup from 0 over
    `warmup_epochs`, then half-cycle cosine to 0 at `epochs` (schedule="cosine", the
    official one) or the peak held (schedule="constant", for long runs at a fixed lr).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    peak = scaled_lr(base_lr, global_batch)
    epoch = _epoch(step, steps_per_epoch, epochs)
    if epoch < warmup_epochs:
        return peak * epoch / warmup_epochs
    if schedule == "constant":
        return peak
    progress = (epoch - warmup_epochs) / (epochs - warmup_epochs) if epochs > warmup_epochs else 1.0
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, *, m: float, steps_per_epoch: int, epochs: float,
                cosine: bool = True) -> float:
    """Key-encoder momentum at `step`: cosine from `m` (step 0) to 1 (`epochs`), or constant `m`."""
    if not cosine:
        return m
    epoch = _epoch(step, steps_per_epoch, epochs)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m)
