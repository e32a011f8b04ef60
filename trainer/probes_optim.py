"""Optimizer-state probe: what the optimizer does to each layer group, for the `layers` table.

Columns, per group (the groups of `trainer.probes.layer_groups`), every logged step, NaN
where the optimizer keeps no such state:

- `adam_freshness`: mean(g²) / mean(v̂) over the group's entries, with v̂ the bias-corrected
  `exp_avg_sq` *before* this step's g² enters it, i.e. the preconditioner this update meets.
  Falling far below 1 for a stretch (gradients shrank under a stale v̂), then jumping far above
  1 is the Adam-lag mechanism of Molybog et al. 2023 / Bai et al. 2025. AdamW and LAMB.
- `adam_small_v_frac`: share of the group's entries with √v̂ < 10·eps (same v̂): where eps,
  not the gradient history, sets the step size.
- `update_rms_over_lr`: RMS of the update θ_t − θ_{t−1} (the `update_l2` update, weight decay
  and trust ratios included) over the group's lr. Adam's steps are about ≤ 1 per unit lr;
  a stale v̂ shows as a burst far above that. Any optimizer; 0 on a skipped step, NaN at lr 0.
- `update_cos_neg_grad`: cosine between that update and −g (1: plain gradient descent; Adam's
  preconditioning and momentum bend it). Any optimizer.
- `lars_trust_ratio`: the layer-wise trust ratio timm's LARS multiplies the step with, the
  numel-weighted mean over the group's tensors (1 for tensors it does not adapt); LARS only.

g is the gradient the optimizer sees (after unscaling and any clipping). Everything runs on
the parameters' device with fused `torch._foreach_*` ops and is buffered there; the host sees
numbers only in `drain`. It takes one copy of the trained weights for the update.

Works on any model and any torch optimizer (it reads `optimizer.state` by key, so optimizers
are recognised by what they keep, not by class), e.g. from a plain training loop:

    probe = OptimizerStateProbe(model, optimizer)     # or named parameters
    loss.backward(); clip_grad_norm_(...)
    probe.before_step(step)
    optimizer.step()
    probe.after_step()
    ...; columns = probe.drain()                       # step, layer, the columns above
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from timm.optim.lars import _lars_trust_ratio
from torch import nn

from trainer.probes import _group_of, _trained_params

COLUMNS = ("adam_freshness", "adam_small_v_frac", "update_rms_over_lr", "update_cos_neg_grad",
           "lars_trust_ratio")
SMALL_V = 10.0  # adam_small_v_frac counts entries with sqrt(v_hat) < SMALL_V * eps


def _norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """Per-tensor norms as one float32 vector (half and bf16 accumulate in float32)."""
    if not tensors:
        return torch.zeros(0)
    out = torch.empty(len(tensors), device=tensors[0].device)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, positions in by_dtype.items():
        widen = torch.float32 if dtype.itemsize < 4 else None
        norms = torch._foreach_norm([tensors[i] for i in positions], ord, dtype=widen)
        out[positions] = torch.stack(norms).float()
    return out


class OptimizerStateProbe:
    """Per-group optimizer-state columns (module docstring), buffered on the device.

    model_or_named_params: the model (MoCo module or any `nn.Module`; DDP / compile wrappers
    are unwrapped) or an iterable of (name, parameter); trained (requires_grad) parameters
    are grouped by name as the gradient probe groups them, so rows line up with its rows.
    Parameters the optimizer does not hold get NaN.
    """

    def __init__(self, model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
                 optimizer: torch.optim.Optimizer, *, per_param: bool = False, capacity: int = 1000):
        if isinstance(model_or_named_params, nn.Module):
            rows = _trained_params(model_or_named_params)
        else:
            rows = sorted(((name, *_group_of(name), p) for name, p in model_or_named_params
                           if p.requires_grad), key=lambda row: row[2])
        if not rows:
            raise ValueError("no trainable parameters to probe")
        self.optimizer = optimizer
        self.params = [p for *_, p in rows]
        names = [name if per_param else group for name, group, _, _ in rows]
        self.layer_names = list(dict.fromkeys(names))
        self.device = self.params[0].device
        position = {name: i for i, name in enumerate(self.layer_names)}
        self._group_of = torch.tensor([position[n] for n in names], device=self.device)
        numel = torch.tensor([float(p.numel()) for p in self.params], device=self.device)
        self._numel = self._sum(numel)
        self.capacity = capacity
        self._buffer = torch.full((capacity, len(self.layer_names), len(COLUMNS)), math.nan,
                                  device=self.device)
        self._steps: list[int] = []
        self._previous = [torch.empty_like(p) for p in self.params]
        self._pending = False  # before_step ran and after_step has not

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def _sum(self, per_tensor: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-group sums of per-tensor values (`index`: their group indices; default all)."""
        out = torch.zeros(len(self.layer_names), device=self.device)
        return out.index_add_(0, self._group_of if index is None else index, per_tensor.to(self.device))

    def _groups(self) -> list[dict | None]:
        """The optimizer param group of each probed parameter (None if it holds none)."""
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        return [group_of.get(id(p)) for p in self.params]

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Record the gradient / state columns for `step` and keep θ_{t-1}; call right
        before `optimizer.step()` (after clipping)."""
        if self.full:
            raise RuntimeError(f"OptimizerStateProbe buffer is full ({self.capacity} rows): drain() first")
        row = self._buffer[len(self._steps)]
        self._steps.append(int(step))
        groups = self._groups()
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in with_grad]
        grad_sq = _norms(grads, 2).square()

        # Adam family: v_hat = exp_avg_sq / (1 - beta2^t) of the previous step t
        adam, corrections, thresholds = [], [], []
        for j, i in enumerate(with_grad):
            group, state = groups[i], self.optimizer.state.get(self.params[i], {})
            if group is None or "exp_avg_sq" not in state:
                continue
            t = float(state.get("step", group.get("step", 0)))
            correction = 1 - group["betas"][1] ** t if group.get("bias_correction", True) else 1.0
            adam.append(j)
            corrections.append(correction)
            thresholds.append((SMALL_V * group["eps"]) ** 2 * correction)  # sqrt(v/c) < 10 eps
        if adam:
            index = self._group_of[[with_grad[j] for j in adam]]
            squares = [self.optimizer.state[self.params[with_grad[j]]]["exp_avg_sq"] for j in adam]
            v_hat = _norms(squares, 1) / torch.tensor(corrections, device=self.device)  # v >= 0
            below = torch._foreach_sub(squares, thresholds)
            torch._foreach_sign_(below)
            torch._foreach_clamp_max_(below, 0.0)  # -1 where v < threshold, else 0
            n_small = _norms(below, 1)
            numel = self._sum(torch.tensor([float(s.numel()) for s in squares]), index)
            has_state = numel > 0
            nan = torch.full_like(numel, math.nan)
            row[:, 0] = torch.where(has_state, self._sum(grad_sq[adam], index) / self._sum(v_hat, index), nan)
            row[:, 1] = torch.where(has_state, self._sum(n_small, index) / numel, nan)

        # LARS: timm's trust ratio of each tensor, from its weight and gradient norms
        lars: dict[int, tuple[dict, list[int]]] = {}
        for j, i in enumerate(with_grad):
            if groups[i] is not None and "trust_coeff" in groups[i]:
                lars.setdefault(id(groups[i]), (groups[i], []))[1].append(j)
        if lars:
            ratios, positions = [], []
            for g, members in lars.values():
                w_norm = _norms([self.params[with_grad[j]] for j in members], 2)
                adapts = g["weight_decay"] != 0 or g.get("always_adapt", False)
                ratios.append(_lars_trust_ratio(w_norm, grad_sq[members].sqrt(), g["trust_coeff"],
                                                g["weight_decay"], g["eps"], g["trust_clip"], g["lr"])
                              if adapts else torch.ones_like(w_norm))
                positions += [with_grad[j] for j in members]
            index = self._group_of[positions]
            numel = torch.tensor([float(self.params[i].numel()) for i in positions], device=self.device)
            weight = self._sum(numel, index)
            row[:, 4] = torch.where(weight > 0, self._sum(torch.cat(ratios) * numel, index) / weight,
                                    torch.full_like(weight, math.nan))

        torch._foreach_copy_(self._previous, self.params)
        self._pending = True

    @torch.no_grad()
    def after_step(self) -> None:
        """Update columns of the last row; call after `optimizer.step()`, or after skipping it."""
        if not self._pending:
            raise RuntimeError("after_step() without a preceding before_step(step)")
        self._pending = False
        row = self._buffer[len(self._steps) - 1]
        torch._foreach_sub_(self._previous, self.params)  # = -(theta_t - theta_{t-1})
        groups = self._groups()
        lr = torch.tensor([math.nan if g is None else float(g["lr"]) for g in groups], device=self.device)
        update = _norms(self._previous, 2)
        row[:, 2] = (self._sum((update / lr).square()) / self._numel).sqrt()
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        if with_grad:
            # <-update, g> per tensor; foreach has no signed sum, so sum(x) = 2 sum(max(x, 0)) - sum|x|
            products = torch._foreach_mul([self._previous[i] for i in with_grad],
                                          [self.params[i].grad for i in with_grad])
            absolute = _norms(products, 1)
            torch._foreach_clamp_min_(products, 0.0)
            dot = 2 * _norms(products, 1) - absolute
            index = self._group_of[with_grad]
            grad_norm = self._sum(_norms([self.params[i].grad for i in with_grad], 2).square(), index).sqrt()
            update_norm = self._sum(update.square()).sqrt()
            row[:, 3] = self._sum(dot, index) / (update_norm * grad_norm)

    def drain(self) -> dict[str, np.ndarray]:
        """Columns (step, layer, COLUMNS) of the buffered rows, one device->host copy; resets."""
        n, groups = len(self._steps), len(self.layer_names)
        values = self._buffer[:n].cpu().numpy().reshape(n * groups, len(COLUMNS))
        columns = {"step": np.repeat(np.asarray(self._steps, dtype=np.int64), groups),
                   "layer": np.tile(np.asarray(self.layer_names, dtype=object), n)}
        columns.update({name: values[:, i].copy() for i, name in enumerate(COLUMNS)})
        self._buffer[:n].fill_(math.nan)
        self._steps = []
        self._pending = False
        return columns
