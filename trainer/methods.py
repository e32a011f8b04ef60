"""The self-supervised method a run trains (`method=mocov3|simclr|byol`), built from its config.

Every method is an nn.Module with the same interface, which is all the training loop, the
probes, the kNN monitor and linear probing use:

- ``forward(x1, x2, m) -> (loss, pooled backbone features of x1, detached)``; m is the
  momentum of the momentum encoder for this step (unused by SimCLR);
- ``backbone`` (the ViT whose features are evaluated), ``feature_dim``,
  ``backbone_features(x)``;
- momentum-encoder parameters live under ``momentum_*`` names (the gradient probe skips them).

Hyper-parameters and choices: docs/methods.md.
"""
from __future__ import annotations

from torch import nn

from trainer.byol import regression_loss
from trainer.config import METHODS, TrainConfig
from trainer.moco import MoCo
from trainer.simclr import SimCLR


def build_method(cfg: TrainConfig) -> nn.Module:
    """MoCo v3, SimCLR or BYOL on the configured ViT and heads."""
    if cfg.method == "mocov3":
        return MoCo(cfg.model, cfg.moco)
    if cfg.method == "simclr":
        return SimCLR(cfg.model, cfg.moco)
    if cfg.method == "byol":
        return MoCo(cfg.model, cfg.moco, loss=regression_loss)
    raise ValueError(f"method={cfg.method!r} is not one of: {', '.join(METHODS)}")
