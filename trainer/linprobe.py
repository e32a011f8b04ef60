"""Linear probing: a linear classifier on a checkpoint's frozen backbone, the yardstick of every
accuracy in the MoCo v3 paper. Values and their sources: docs/linear_probe.md.

protocol="official" (main_lincls.py): the backbone in eval mode under a BatchNorm without
affine and a linear layer, trained 90 epochs by SGD (momentum 0.9, no weight decay,
lr = base_lr x batch / 256, cosine per epoch) on RandomResizedCrop + flip images, evaluated on
resized, centre-cropped held-out images.

protocol="fast" (CPUs, curves during training): features of the unaugmented images extracted
once, the same BatchNorm in its inference form with the training features' statistics, and
the linear layer fitted to convergence by full-batch L-BFGS on the L2-regularised
cross-entropy (a convex problem: the result does not depend on the initialisation or order).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer.config import PROBE_PROTOCOLS, ProbeConfig
from trainer.data import Datasets, PlainDataset, linear_probe_transform
from trainer.model import build_backbone
from trainer.schedules import scaled_lr

BN_EPS = 1e-6  # the BatchNorm before the classifier (MAE's main_linprobe value)


class LinearProbeError(ValueError):
    """A checkpoint or dataset that cannot be probed; the CLI prints it as one line, exit 2."""

    user_error = True


def load_backbone(model_cfg, state: dict) -> nn.Module:
    """The base encoder of a training checkpoint (`backbone.*` weights), frozen, in eval mode."""
    backbone = build_backbone(model_cfg)
    weights = {k.removeprefix("backbone."): v for k, v in state["model"].items()
               if k.startswith("backbone.")}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatches: name the first
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise LinearProbeError(f"the checkpoint's backbone does not fit the run's model config: "
                               f"{lines[min(1, len(lines) - 1)]}") from None
    return backbone.requires_grad_(False).eval()


def linear_head(dim: int, num_classes: int, batchnorm: bool = True) -> nn.Sequential:
    """[BatchNorm1d without affine] + Linear, the classifier both protocols train."""
    layers = [nn.BatchNorm1d(dim, affine=False, eps=BN_EPS)] if batchnorm else []
    return nn.Sequential(*layers, nn.Linear(dim, num_classes))


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top1, top5) in 0-1; with fewer than 5 classes top5 is top-(number of classes)."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == labels.to(ranked.device)[:, None]
    return hits[:, 0].sum().item() / len(labels), hits.any(dim=1).sum().item() / len(labels)


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _loader(dataset, batch_size, num_workers, device, shuffle=False, seed=0, drop_last=False):
    """In order, or shuffled anew each epoch by a seeded generator (which also seeds the
    workers' augmentations), so a probe is reproducible."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=drop_last,
                      persistent_workers=shuffle and num_workers > 0)


@torch.no_grad()
def extract_features(backbone, dataset, *, device, precision="fp32", batch_size=256, num_workers=0,
                     progress=False, desc="features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled float32 features and labels of a whole dataset, on `device`."""
    feats, labels = [], []
    loader = _loader(dataset, batch_size, num_workers, device)
    for x, y in tqdm(loader, desc=desc, disable=not progress, unit="batch", leave=False):
        with _autocast(device, precision):
            feats.append(backbone(x.to(device, non_blocking=True)).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def fit_lbfgs(features, labels, num_classes, *, l2=1e-4, max_iter=1000, batchnorm=True):
    """The head fitted by full-batch L-BFGS (strong-Wolfe line search) on cached features.

    Minimises mean cross-entropy + (l2 / 2) * ||W||^2 (bias not penalised), the weights
    starting at zero; the BatchNorm holds the features' mean and biased variance, i.e. what
    BatchNorm computes on the full batch. Returns (head in eval mode, final cross-entropy,
    iterations used).
    """
    head = linear_head(features.shape[1], num_classes, batchnorm).to(features.device, features.dtype)
    if batchnorm:
        head[0].running_mean.copy_(features.mean(0))
        head[0].running_var.copy_(features.var(0, unbiased=False))
    linear = head[-1]
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    head.eval()
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    cross_entropy = {}

    def closure():
        optimizer.zero_grad()
        ce = F.cross_entropy(head(features), labels)
        loss = ce + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        cross_entropy["value"] = ce.item()
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[linear.weight]["n_iter"]
    return head, cross_entropy["value"], iterations


def probe_fast(backbone, data: Datasets, cfg: ProbeConfig, *, device, precision="fp32",
               num_workers=0, progress=False) -> dict:
    """Fast protocol: unaugmented features once, L-BFGS on them."""
    kwargs = dict(device=device, precision=precision, num_workers=num_workers, progress=progress)
    train_x, train_y = extract_features(backbone, data.train_plain, desc="train features", **kwargs)
    val_x, val_y = extract_features(backbone, data.val_plain, desc="val features", **kwargs)
    head, train_loss, iterations = fit_lbfgs(train_x, train_y, data.num_classes, l2=cfg.l2,
                                             max_iter=cfg.max_iter, batchnorm=cfg.batchnorm)
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(val_x), val_y)
    return dict(protocol="fast", epoch=None, top1=top1, top5=top5, train_loss=train_loss,
                n_train=len(train_y), n_val=len(val_y), settings=f"{cfg.settings()} iters={iterations}")


def probe_official(backbone, data: Datasets, cfg: ProbeConfig, *, device, precision="fp32",
                   num_workers=0, progress=False) -> dict:
    """Official protocol: SGD on augmented images through the frozen backbone, evaluated on the
    held-out split after the last epoch."""
    base = data.train_plain
    img_size = backbone.patch_embed.img_size[0]
    train_set = PlainDataset(base.base, linear_probe_transform(img_size), base.skip_bad_images)
    batch = min(cfg.batch_size, len(train_set))  # whole batches only: BatchNorm needs > 1 sample
    head = linear_head(backbone.num_features, data.num_classes, cfg.batchnorm).to(device)
    torch.manual_seed(cfg.seed)
    nn.init.normal_(head[-1].weight, std=0.01)  # main_lincls.py
    nn.init.zeros_(head[-1].bias)
    lr = scaled_lr(cfg.base_lr, batch)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)  # per epoch
    loader = _loader(train_set, batch, num_workers, device, shuffle=True, seed=cfg.seed, drop_last=True)
    bar = tqdm(range(cfg.epochs), desc="linear epochs", disable=not progress, unit="epoch")
    for _ in bar:
        head.train()
        total, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for x, y in loader:
            with torch.no_grad(), _autocast(device, precision):
                features = backbone(x.to(device, non_blocking=True)).float()
            y = y.to(device, non_blocking=True)
            loss = F.cross_entropy(head(features), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.detach() * len(y), seen + len(y)
        schedule.step()
        bar.set_postfix(loss=f"{total.item() / seen:.3f}", refresh=False)
    head.eval()
    val_x, val_y = extract_features(backbone, data.val_plain, device=device, precision=precision,
                                    num_workers=num_workers, progress=progress, desc="val features")
    with torch.no_grad():
        top1, top5 = topk_accuracy(head(val_x), val_y)
    return dict(protocol="official", epoch=float(cfg.epochs), top1=top1, top5=top5,
                train_loss=total.item() / seen, n_train=len(train_set), n_val=len(val_y),
                settings=cfg.settings())


def probe(backbone, data: Datasets, cfg: ProbeConfig, **kwargs) -> dict:
    """One linear-probe result (a `linear` row without step and time) for `cfg.protocol`."""
    if cfg.protocol not in PROBE_PROTOCOLS:
        raise LinearProbeError(f"protocol={cfg.protocol!r} is not one of: {', '.join(PROBE_PROTOCOLS)}")
    return (probe_official if cfg.protocol == "official" else probe_fast)(backbone, data, cfg, **kwargs)
