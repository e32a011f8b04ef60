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
numbers only in `drain`. It takes one copy of the trained weights for the update; handed the
run's `GradientProbe` (`gradients=`), it shares that probe's copy, update and per-tensor
gradient norms instead (the norms of gradients clipped in between are taken again).

Works on any model and any torch optimizer (it reads `optimizer.state` by key, so optimizers
are recognised by what they keep, not by class), e.g. from a plain training loop:

    probe = OptimizerStateProbe(model, optimizer)     # or named parameters; gradients=GradientProbe
    loss.backward(); clip_grad_norm_(...)
    probe.before_step(step)
    optimizer.step()
    probe.after_step()
    ...; columns = probe.drain()                       # step, layer, the columns above
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from timm.optim.lars import _lars_trust_ratio
from torch import nn

from trainer.probes import GradientProbe, UpdateSnapshot, group_members, named_grouping, tensor_norms

COLUMNS = ("adam_freshness", "adam_small_v_frac", "update_rms_over_lr", "update_cos_neg_grad",
           "lars_trust_ratio")
SMALL_V = 10.0  # adam_small_v_frac counts entries with sqrt(v_hat) < SMALL_V * eps


def _sums(tensors: list[torch.Tensor], *, nonnegative: bool = False) -> torch.Tensor:
    """Per-tensor sums as one float32 vector. torch has no fused signed sum: on the CPU a loop
    of `sum` (one pass each; the foreach L1 norm is about 5x slower than L2 there), elsewhere
    fused L1 norms, for tensors that may be negative 2·Σmax(x, 0) − Σ|x| -- clamping them in
    place, so pass temporaries."""
    if tensors[0].device.type == "cpu":
        return torch.stack([t.sum(dtype=torch.float32) for t in tensors])
    total = tensor_norms(tensors, 1)
    if nonnegative:
        return total
    torch._foreach_clamp_min_(tensors, 0.0)
    return 2 * tensor_norms(tensors, 1) - total


def _count_below(tensors: list[torch.Tensor], limits: list[float]) -> torch.Tensor:
    """Per-tensor counts of the entries below their limit, as one float32 vector. On the CPU
    each tensor's minimum first (one fast reduction pass), then compare-and-count only in the
    tensors that have an entry below (in practice a few small biases that get no gradient):
    0.2 instead of 1.7 ms for the CPU preset's 1.3 M entries; the host sync is free there.
    Elsewhere fused and sync-free: the L2 norm of -1 where below, else 0, rounded (its square
    is the count up to rounding)."""
    if tensors[0].device.type == "cpu":
        counts = torch.zeros(len(tensors))
        below = torch.stack([t.amin() for t in tensors]) < torch.tensor(limits, dtype=tensors[0].dtype)
        for i in below.nonzero().flatten().tolist():
            counts[i] = torch.count_nonzero(tensors[i] < limits[i])
        return counts
    below = torch._foreach_sub(tensors, limits)
    torch._foreach_sign_(below)
    torch._foreach_clamp_max_(below, 0.0)
    return tensor_norms(below, 2).square().round()


def _dots_with_update(snapshot: UpdateSnapshot, others: list[torch.Tensor], positions: list[int]) -> torch.Tensor:
    """Per-tensor <-(theta_t - theta_{t-1}), other> as one float32 vector. On the CPU one vdot
    per tensor: a single read pass that writes nothing (0.4 against 0.7 ms for the CPU preset's
    1.3 M entries); elsewhere fused products made in the copy's memory, then fused sums."""
    if others[0].device.type == "cpu":
        return torch.stack([torch.vdot(u.reshape(-1).float(), g.reshape(-1).float())
                            for u, g in zip(snapshot.negated_update(positions), others)])
    return _sums(snapshot.multiply_update(others, positions))


@dataclass
class _Plan:
    """Which probed tensors have a gradient, an optimizer group, Adam or LARS state, with their
    device-side group indices. The same every step in practice, so it is built once per pattern."""

    with_grad: list[int]  # positions in the probe's params
    grad_index: torch.Tensor  # their layer-group indices
    lr_groups: list[dict | None]  # the optimizer group of each probed param
    adam: list[int]  # positions in with_grad of the tensors with exp_avg_sq
    adam_index: torch.Tensor
    adam_squares: list[torch.Tensor]
    adam_groups: list[dict]  # their optimizer groups
    adam_numel: torch.Tensor  # per layer group
    lars: list[tuple[dict, list[int]]]  # (optimizer group, positions in with_grad)
    lars_index: torch.Tensor
    lars_numel: torch.Tensor  # per tensor


class OptimizerStateProbe:
    """Per-group optimizer-state columns (module docstring), buffered on the device.

    model_or_named_params: the model (MoCo module or any `nn.Module`; DDP / compile wrappers
    are unwrapped) or an iterable of (name, parameter); trained (requires_grad) parameters
    are grouped by name as the gradient probe groups them, so rows line up with its rows.
    Parameters the optimizer does not hold get NaN. gradients: the run's `GradientProbe` over the
    same parameters and groups, to share its weight copy, update and gradient norms (call its
    `record` before, and `snapshot_params` / `record_update` around, the same optimizer step).
    """

    def __init__(self, model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
                 optimizer: torch.optim.Optimizer, *, per_param: bool = False, capacity: int = 1000,
                 groups: Mapping[str, str] | None = None, gradients: GradientProbe | None = None):
        grouping, named = named_grouping(model_or_named_params, per_param=per_param, rules=groups)
        if not grouping.groups:
            raise ValueError("no trainable parameters to probe")
        self.optimizer = optimizer
        self.layer_names = grouping.names
        self.params, index = group_members(grouping, named)
        if gradients is not None and (gradients.layer_names != self.layer_names or len(gradients.params) != len(self.params)
                                      or any(a is not b for a, b in zip(gradients.params, self.params))):
            raise ValueError("gradients= must probe the same parameters in the same groups")
        self.gradients = gradients
        self.device = self.params[0].device
        self._group_of = torch.tensor(index, device=self.device)
        self._numel = self._sum(self._tensor([p.numel() for p in self.params]), self._group_of)
        self.capacity = capacity
        self._buffer = torch.full((capacity, len(self.layer_names), len(COLUMNS)), math.nan,
                                  device=self.device)
        self._steps: list[int] = []
        shared = gradients.snapshot if gradients is not None else None
        self.snapshot = shared if shared is not None else UpdateSnapshot(self.params)
        self._plans: dict[tuple, _Plan] = {}
        self._pending: tuple | None = None  # (plan, per-tensor grad norms^2) from before_step

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).to(self.device, non_blocking=True)

    def _sum(self, per_tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per layer group sums of per-tensor values with layer-group indices `index`."""
        return torch.zeros(len(self.layer_names), device=self.device).index_add_(0, index, per_tensor)

    def _plan(self) -> _Plan:
        state = self.optimizer.state
        key = (tuple(len(g["params"]) for g in self.optimizer.param_groups),
               tuple(id(state[p]["exp_avg_sq"]) if p.grad is not None and "exp_avg_sq" in state.get(p, ())
                     else p.grad is not None for p in self.params))
        if key not in self._plans:
            self._plans = {key: self._build_plan()}  # the old pattern will not come back
        return self._plans[key]

    def _build_plan(self) -> _Plan:
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        lr_groups = [group_of.get(id(p)) for p in self.params]
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        adam = [j for j, i in enumerate(with_grad)
                if lr_groups[i] is not None and "exp_avg_sq" in self.optimizer.state.get(self.params[i], ())]
        lars: dict[int, tuple[dict, list[int]]] = {}
        for j, i in enumerate(with_grad):
            if lr_groups[i] is not None and "trust_coeff" in lr_groups[i]:
                lars.setdefault(id(lr_groups[i]), (lr_groups[i], []))[1].append(j)
        lars_order = [with_grad[j] for _, members in lars.values() for j in members]
        index = lambda positions: self._group_of[positions] if positions else self._group_of[:0]
        adam_index = index([with_grad[j] for j in adam])
        return _Plan(
            with_grad=with_grad, grad_index=index(with_grad), lr_groups=lr_groups, adam=adam,
            adam_index=adam_index,
            adam_squares=[self.optimizer.state[self.params[with_grad[j]]]["exp_avg_sq"] for j in adam],
            adam_groups=[lr_groups[with_grad[j]] for j in adam],
            adam_numel=self._sum(self._tensor([self.params[with_grad[j]].numel() for j in adam]), adam_index),
            lars=list(lars.values()), lars_index=index(lars_order),
            lars_numel=self._tensor([self.params[i].numel() for i in lars_order]))

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Record the gradient / state columns for `step` and keep θ_{t-1}; call right
        before `optimizer.step()` (after clipping)."""
        if self.full:
            raise RuntimeError(f"OptimizerStateProbe buffer is full ({self.capacity} rows): drain() first")
        row = self._buffer[len(self._steps)]
        self._steps.append(int(step))
        plan = self._plan()
        if self.gradients is not None:
            grad_sq = self.gradients.gradient_sq_norms()[plan.with_grad]
        else:
            grads = [self.params[i].grad for i in plan.with_grad]
            grad_sq = tensor_norms(grads, 2).square() if grads else torch.zeros(0, device=self.device)

        if plan.adam:  # v_hat = exp_avg_sq / (1 - beta2^t) as the previous step t left it
            corrections = {}
            for j, group in zip(plan.adam, plan.adam_groups):  # one step count per group, as LAMB keeps it
                if id(group) not in corrections:
                    state = self.optimizer.state[self.params[plan.with_grad[j]]]
                    t = float(state.get("step", group.get("step", 0)))
                    corrections[id(group)] = 1 - group["betas"][1] ** t if group.get("bias_correction", True) else 1.0
            correction = [corrections[id(g)] for g in plan.adam_groups]
            v_hat = _sums(plan.adam_squares, nonnegative=True) / self._tensor(correction)
            small = _count_below(plan.adam_squares, [(SMALL_V * g["eps"]) ** 2 * c  # sqrt(v/c) < 10 eps
                                                     for g, c in zip(plan.adam_groups, correction)])
            has_state = plan.adam_numel > 0
            nan = torch.full_like(plan.adam_numel, math.nan)
            row[:, 0] = torch.where(has_state, self._sum(grad_sq[plan.adam], plan.adam_index)
                                    / self._sum(v_hat, plan.adam_index), nan)
            row[:, 1] = torch.where(has_state, self._sum(small, plan.adam_index) / plan.adam_numel, nan)

        if plan.lars:  # timm's trust ratio of each tensor, from its weight and gradient norms
            ratios = []
            for g, members in plan.lars:
                w_norm = tensor_norms([self.params[plan.with_grad[j]] for j in members], 2)
                adapts = g["weight_decay"] != 0 or g.get("always_adapt", False)
                ratios.append(_lars_trust_ratio(w_norm, grad_sq[members].sqrt(), g["trust_coeff"], g["weight_decay"],
                                                g["eps"], g["trust_clip"], g["lr"]) if adapts else torch.ones_like(w_norm))
            weight = self._sum(plan.lars_numel, plan.lars_index)
            row[:, 4] = torch.where(weight > 0, self._sum(torch.cat(ratios) * plan.lars_numel, plan.lars_index)
                                    / weight, torch.full_like(weight, math.nan))

        self.snapshot.take(step)
        self._pending = (plan, grad_sq)

    @torch.no_grad()
    def after_step(self) -> None:
        """Update columns of the last row; call after `optimizer.step()`, or after skipping it."""
        if self._pending is None:
            raise RuntimeError("after_step() without a preceding before_step(step)")
        plan, grad_sq = self._pending
        self._pending = None
        row = self._buffer[len(self._steps) - 1]
        update = self.snapshot.update()  # ||theta_t - theta_{t-1}|| per tensor
        lr = self._tensor([math.nan if g is None else float(g["lr"]) for g in plan.lr_groups])
        row[:, 2] = (self._sum((update / lr).square(), self._group_of) / self._numel).sqrt()
        if plan.with_grad:
            dot = _dots_with_update(self.snapshot, [self.params[i].grad for i in plan.with_grad],
                                    plan.with_grad)  # <-update, g>
            grad_norm = self._sum(grad_sq, plan.grad_index).sqrt()
            update_norm = self._sum(update.square(), self._group_of).sqrt()
            row[:, 3] = self._sum(dot, plan.grad_index) / (update_norm * grad_norm)

    def drain(self) -> dict[str, np.ndarray]:
        """Columns (step, layer, COLUMNS) of the buffered rows, one device->host copy; resets."""
        n, groups = len(self._steps), len(self.layer_names)
        values = self._buffer[:n].cpu().numpy().reshape(n * groups, len(COLUMNS))
        columns = {"step": np.repeat(np.asarray(self._steps, dtype=np.int64), groups),
                   "layer": np.tile(np.asarray(self.layer_names, dtype=object), n)}
        columns.update({name: values[:, i].copy() for i, name in enumerate(COLUMNS)})
        self._buffer[:n].fill_(math.nan)
        self._steps = []
        self._pending = None
        return columns
