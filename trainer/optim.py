"""Optimizer construction through timm.optim (AdamW, LAMB, LARS).

Weight decay follows the official MoCo v3 code by default: every trained parameter is decayed,
including norms, biases, `pos_embed` and `cls_token`. With `exclude_norm_bias_wd=True` the 1-D
parameters (norm scales/shifts) and biases get weight decay 0 (timm's `filter_bias_and_bn`
rule). Parameter groups are built with `timm.optim.param_groups_weight_decay` and handed to
`create_optimizer_v2` as groups, so a model's `no_weight_decay()` list (timm ViTs name
`pos_embed`, `cls_token`) is deliberately not applied. Parameters with `requires_grad=False`
(the momentum encoder, a frozen patch projection) are in no group.

AdamW uses torch's fused kernel (one kernel for all parameters) on CUDA and the CPU; on CUDA
its learning rate is a device tensor that `set_lr` fills in place, so a new lr every step
costs no host sync and cannot make a compiled step recompile.
"""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay

from trainer.config import OptimConfig

OPTIMIZERS = ("adamw", "lamb", "lars")
FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # torch.optim.AdamW(fused=True) kernels we use


def build_optimizer(model: torch.nn.Module, optim_cfg: OptimConfig, lr: float,
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """Optimizer over `model`'s trained parameters at initial learning rate `lr`.

    adamw: torch.optim.AdamW(betas, eps), fused on a CUDA or CPU `device`. lamb: timm Lamb(betas, eps) with its built-in global
    gradient-norm clipping turned off (`max_grad_norm=None`) so that no hidden clipping alters
    the gradients this project measures. lars: timm Lars(momentum, trust_coeff=0.001); timm
    applies the trust ratio only to groups with non-zero weight decay, so with
    `exclude_norm_bias_wd=True` 1-D parameters get plain SGD-momentum, as in the official LARS.
    """
    name = optim_cfg.name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={optim_cfg.name!r} is not one of {list(OPTIMIZERS)}")
    groups = param_groups_weight_decay(
        model, weight_decay=optim_cfg.weight_decay,
        weight_decay_exclude_1d=optim_cfg.exclude_norm_bias_wd)
    if name == "lars":
        extra = dict(momentum=optim_cfg.momentum)
    else:
        extra = dict(betas=tuple(float(b) for b in optim_cfg.betas), eps=optim_cfg.eps)
        if name == "lamb":
            extra["max_grad_norm"] = None
    device = torch.device(device)
    fused = name == "adamw" and device.type in FUSED_ADAMW_DEVICES
    if fused:
        extra["fused"] = True
    optimizer = create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=optim_cfg.weight_decay,
                                    **extra)
    if fused and device.type == "cuda":
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate; in place where it is a tensor (fused AdamW on CUDA)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
