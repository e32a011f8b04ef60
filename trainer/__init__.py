"""Instrumented MoCo v3 for timm Vision Transformers.

`train(cfg, run_dir=..., writer=...)` runs the loop; the caller supplies the config
(`trainer.config.TrainConfig`) and the run writer. Paper concepts, one module each:
model (backbone + patch-projection variants), heads, moco (loss, momentum update), simclr and
byol (the other methods, picked by `methods.build_method`), linprobe (linear probing),
probes (per-layer gradient statistics), probes_optim (optimizer state), probes_attention
(attention entropy and logits), knn (dense kNN monitor), schedules, optim, data.

Exports load lazily so that `trainer.config` (plain dataclasses) can be read without torch.
"""
from importlib import import_module

_EXPORTS = {
    "TrainConfig": "trainer.config",
    "Trainer": "trainer.loop",
    "UserError": "trainer.loop",
    "train": "trainer.loop",
    "MoCo": "trainer.moco",
    "contrastive_loss": "trainer.moco",
    "SimCLR": "trainer.simclr",
    "build_method": "trainer.methods",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
