"""Gradient probes: per-layer gradient, weight and update norms for the `layers` table.

Everything is computed on the training device with fused `torch._foreach_*` ops and buffered
there; the host sees the numbers only in `GradientProbe.drain`, one bulk copy per flush, so
the probe adds no host synchronisation to the training step.

Call order in the training loop on a logged step:

    loss.backward()
    scaler.unscale_(optimizer)          # fp16 only: the probe must see unscaled gradients
    grad_norm = probe.record(step)      # before any clipping; device scalar, all trained params
    clip gradients (optional)
    probe.snapshot_params()             # no-op unless update_norms
    optimizer.step()
    probe.record_update()               # param_l2 (after the step) and update_l2
    if probe.full: writer.append("layers", probe.drain())

On a step that is not logged, `probe.total_grad_norm()` gives the same device scalar without
recording. A row whose `record_update` is never called keeps NaN `param_l2`/`update_l2`; on a
skipped update call `record_update` anyway (update_l2 is 0 after a snapshot, NaN without one).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

from trainer.groups import Grouping, group_parameters

_COLUMNS = ("grad_l2", "grad_max_abs", "param_l2", "update_l2")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel (`.module`) and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def model_grouping(model: nn.Module, *, per_param: bool = False,
                   rules: Mapping[str, str] | None = None) -> Grouping:
    """The automatic layer groups (`trainer.groups`) of a model's trained parameters.

    The structure comes from every parameter, the members from the trained ones
    (requires_grad): frozen parameters (a fixed patch projection, a momentum encoder) are
    left out, so a fully frozen group does not appear. `rules` override ({regex: group}).
    """
    model = unwrap(model)
    grouping = group_parameters([name for name, _ in model.named_parameters()], rules)
    grouping = grouping.restrict(name for name, p in model.named_parameters() if p.requires_grad)
    return grouping.per_param() if per_param else grouping


def named_grouping(named_params, *, per_param: bool = False,
                   rules: Mapping[str, str] | None = None) -> tuple[Grouping, dict[str, nn.Parameter]]:
    """The grouping and {name: parameter} of a model (wrappers stripped) or of an iterable of
    (name, parameter), as `model_grouping` groups a model."""
    if isinstance(named_params, nn.Module):
        return model_grouping(named_params, per_param=per_param, rules=rules), dict(unwrap(named_params).named_parameters())
    named = dict(named_params)
    grouping = group_parameters(list(named), rules).restrict(n for n, p in named.items() if p.requires_grad)
    return (grouping.per_param() if per_param else grouping), named


def group_members(grouping: Grouping, named: Mapping[str, nn.Parameter]) -> tuple[list[nn.Parameter], list[int]]:
    """The grouped parameters in group order and the index of each one's group: what every
    probe reduces per group."""
    position = {name: i for i, name in enumerate(grouping.names)}
    members = [(named[param], position[group]) for group, params in grouping.groups for param in params]
    return [p for p, _ in members], [i for _, i in members]


def layer_groups(model: nn.Module, per_param: bool = False,
                 rules: Mapping[str, str] | None = None) -> list[tuple[str, list[str]]]:
    """[(group name, [param names])] in model order, trained parameters only.

    On stabilitylab's MoCo module: `patch_embed`, `cls_token` and `pos_embed` when trainable,
    `blocks.i`, `norm`, `projector`, `predictor` (see `trainer.groups` for any model).
    With per_param, one group per parameter named by its full name.
    """
    return model_grouping(model, per_param=per_param, rules=rules).groups


class GradientProbe:
    """Per-group grad_l2, grad_max_abs, param_l2 (after the step) and update_l2, buffered on device.

    update_l2 = ||theta_t - theta_{t-1}|| needs one persistent copy of the trained weights;
    with update_norms=False it is NaN and no copy is kept. All norms are computed in float32
    whatever the parameter/gradient dtype; a None gradient counts as zero. Groups: the
    automatic layer groups of the trained parameters (`model_grouping`; `groups` overrides
    them with {regex: group name}); `grouping.first_layer` / `last_block` name the ends.
    """

    def __init__(self, model: nn.Module, *, per_param: bool = False, update_norms: bool = True,
                 capacity: int = 1000, device: torch.device | str | None = None,
                 groups: Mapping[str, str] | None = None):
        self.grouping, named = named_grouping(model, per_param=per_param, rules=groups)
        if not self.grouping.groups:
            raise ValueError("the model has no trainable parameters to probe")
        self.layer_names = self.grouping.names
        self.params, index = group_members(self.grouping, named)
        self.device = torch.device(device) if device is not None else self.params[0].device
        self._group_index = torch.tensor(index, device=self.device)
        self.update_norms = update_norms
        self.capacity = capacity
        self._buffer = torch.full((capacity, len(self.layer_names), len(_COLUMNS)), math.nan,
                                  device=self.device)
        self._steps: list[int] = []
        self._plans: dict[tuple, list] = {}
        self._snapshot_rows: int | None = None  # len(self._steps) when the snapshot was taken
        self._previous = [torch.empty_like(p) for p in self.params] if update_norms else None

    @property
    def full(self) -> bool:
        """True when the buffer holds `capacity` rows: drain before the next `record`."""
        return len(self._steps) >= self.capacity

    def _plan(self, tensors: list[torch.Tensor | None]) -> list[tuple[list[int], torch.Tensor]]:
        """[(positions, their group index)] of the non-None tensors, one entry per dtype.

        Cached by the dtype / None pattern, which is the same every step in practice.
        """
        key = tuple(None if t is None else t.dtype for t in tensors)
        if key not in self._plans:
            buckets: dict[torch.dtype, list[int]] = {}
            for i, dtype in enumerate(key):
                if dtype is not None:
                    buckets.setdefault(dtype, []).append(i)
            self._plans[key] = [(pos, self._group_index[pos]) for pos in buckets.values()]
        return self._plans[key]

    def _per_group(self, tensors: list[torch.Tensor | None], ord: float) -> torch.Tensor:
        """Per-group norm of the concatenated tensors (L2 or max abs), in float32."""
        out = torch.zeros(len(self.layer_names), device=self.device)
        for positions, index in self._plan(tensors):
            same_dtype = [tensors[i] for i in positions]
            widen = torch.float32 if same_dtype[0].dtype.itemsize < 4 else None  # half, bf16
            if ord == 2 or same_dtype[0].device.type == "cuda":
                norms = torch.stack(torch._foreach_norm(same_dtype, ord, dtype=widen))
            else:  # the CPU's foreach inf-norm is ~7x slower than abs then max (same values)
                norms = torch.stack(torch._foreach_max(torch._foreach_abs(same_dtype)))
            norms = norms.to(self.device, torch.float32)
            if ord == 2:
                out.scatter_add_(0, index, norms.square())
            else:
                out.scatter_reduce_(0, index, norms, "amax")
        return out.sqrt() if ord == 2 else out

    @torch.no_grad()
    def record(self, step: int) -> torch.Tensor:
        """Record grad_l2 and grad_max_abs for `step`; return the total grad norm (device scalar).

        Call after backward (and GradScaler.unscale_) and before clipping.
        """
        if self.full:
            raise RuntimeError(f"GradientProbe buffer is full ({self.capacity} rows): "
                               "drain() first")
        grads = [p.grad for p in self.params]
        row = self._buffer[len(self._steps)]
        row[:, 0] = self._per_group(grads, 2)
        row[:, 1] = self._per_group(grads, math.inf)
        self._steps.append(int(step))
        return row[:, 0].square().sum().sqrt()

    def last_grad_l2(self) -> torch.Tensor:
        """grad_l2 per group of the last recorded row (device tensor), for an online detector."""
        if not self._steps:
            raise RuntimeError("last_grad_l2() without a preceding record(step)")
        return self._buffer[len(self._steps) - 1, :, 0]

    @torch.no_grad()
    def total_grad_norm(self) -> torch.Tensor:
        """Total L2 norm of all trained gradients (device scalar) on a step that is not logged."""
        return self._per_group([p.grad for p in self.params], 2).square().sum().sqrt()

    @torch.no_grad()
    def snapshot_params(self) -> None:
        """Keep a copy of the weights before optimizer.step (only with update_norms)."""
        if self.update_norms:
            torch._foreach_copy_(self._previous, self.params)
            self._snapshot_rows = len(self._steps)

    @torch.no_grad()
    def record_update(self) -> None:
        """After optimizer.step: param_l2 and update_l2 of the last recorded row.

        update_l2 needs `snapshot_params()` after this row's `record`; without it (update_norms
        off, or a skipped step where the loop took no snapshot) it stays NaN.
        """
        if not self._steps:
            raise RuntimeError("record_update() without a preceding record(step)")
        row = self._buffer[len(self._steps) - 1]
        row[:, 2] = self._per_group(self.params, 2)
        if self._snapshot_rows == len(self._steps):
            self._snapshot_rows = None
            torch._foreach_sub_(self._previous, self.params)  # = -(theta_t - theta_{t-1})
            row[:, 3] = self._per_group(self._previous, 2)

    def drain(self) -> dict[str, np.ndarray]:
        """Columns of the `layers` table for the buffered steps (one device->host copy); resets."""
        n, groups = len(self._steps), len(self.layer_names)
        values = self._buffer[:n].cpu().numpy().reshape(n * groups, len(_COLUMNS))
        columns = {
            "step": np.repeat(np.asarray(self._steps, dtype=np.int64), groups),
            "layer": np.tile(np.asarray(self.layer_names, dtype=object), n),
        }
        columns.update({name: values[:, i].copy() for i, name in enumerate(_COLUMNS)})
        self._buffer[:n].fill_(math.nan)
        self._steps = []
        self._snapshot_rows = None
        return columns
