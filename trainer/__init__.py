"""Instrumented MoCo v3 for timm Vision Transformers.

`train(cfg, run_dir=..., writer=...)` runs the loop; the caller supplies the config
(`trainer.config.TrainConfig`) and the run writer. Paper concepts, one module each:
model (backbone + patch-projection variants), heads, moco (loss, momentum update),
probes (per-layer gradient statistics), knn (dense kNN monitor), schedules, optim, data.
"""
from trainer.config import TrainConfig
from trainer.loop import Trainer, UserError, train
from trainer.moco import MoCo, contrastive_loss

__all__ = ["TrainConfig", "Trainer", "UserError", "train", "MoCo", "contrastive_loss"]
