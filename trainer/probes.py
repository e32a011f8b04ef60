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

The optimizer-state probe (`trainer.probes_optim`) needs the same per-tensor gradient norms,
weight copy and update: handed this probe, it takes them from here (`gradient_sq_norms`,
`snapshot`) instead of computing them a second time.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
from torch import nn

from trainer.groups import Grouping, group_parameters

_COLUMNS = ("grad_l2", "grad_max_abs", "param_l2", "update_l2")


def tensor_norms(tensors: list[torch.Tensor], ord: float) -> torch.Tensor:
    """Per-tensor L2 or max-abs norms as one float32 vector (half and bf16 accumulate in
    float32), with fused ops: the one implementation of every probe's per-tensor norms."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        out = torch.empty(len(tensors), device=tensors[0].device)
        for dtype in dtypes:
            positions = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            out[positions] = tensor_norms([tensors[i] for i in positions], ord)
        return out
    if ord == math.inf and tensors[0].device.type == "cpu":
        # the CPU's foreach inf-norm is ~25x slower and abs then max ~1.6x than one min/max
        # pass per tensor (the largest |x| is the largest or the smallest x: the same values)
        lowest, highest = zip(*(torch.aminmax(t) for t in tensors))
        return torch.maximum(torch.stack(highest).abs(), torch.stack(lowest).abs()).float()
    widen = torch.float32 if tensors[0].dtype.itemsize < 4 else None
    return torch.stack(torch._foreach_norm(tensors, ord, dtype=widen)).float()


class UpdateSnapshot:
    """theta_{t-1}: one copy of the trained weights taken before optimizer.step, and the update
    theta_t - theta_{t-1} with its per-tensor L2 norms after it, computed once however many
    probes ask (the gradient probe's update_l2, the optimizer-state probe's update columns)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self._previous = [torch.empty_like(p) for p in params]
        self._norms: torch.Tensor | None = None
        self._taken: int | None = None  # the step of a copy that waits for `update`
        self._spent = False  # the copy was multiplied in place (`multiply_update`)

    @torch.no_grad()
    def take(self, step: int) -> None:
        """Copy the weights before step `step`'s update (once: a second probe's call is free)."""
        if self._taken != step:
            torch._foreach_copy_(self._previous, self.params)
            self._taken, self._norms, self._spent = step, None, False

    @torch.no_grad()
    def update(self) -> torch.Tensor:
        """Float32 L2 norm of each tensor's theta_t - theta_{t-1} since the last `take`."""
        if self._taken is not None:
            torch._foreach_sub_(self._previous, self.params)  # = -(theta_t - theta_{t-1})
            self._norms, self._taken = tensor_norms(self._previous, 2), None
        if self._norms is None:
            raise RuntimeError("UpdateSnapshot.update() without a preceding take()")
        return self._norms

    @torch.no_grad()
    def negated_update(self, positions: list[int]) -> list[torch.Tensor]:
        """-(theta_t - theta_{t-1}) of the tensors at `positions`, to read, not to modify."""
        self.update()
        if self._spent:
            raise RuntimeError("UpdateSnapshot.negated_update() after multiply_update() spent the copy")
        return [self._previous[i] for i in positions]

    @torch.no_grad()
    def multiply_update(self, others: list[torch.Tensor], positions: list[int]) -> list[torch.Tensor]:
        """-(theta_t - theta_{t-1}) * other for the tensors at `positions`, elementwise, made in
        the copy's own memory (no temporary the size of the weights). That spends the copy:
        once per step, after any `update` it needs."""
        self.update()
        if self._spent:
            raise RuntimeError("UpdateSnapshot.multiply_update() twice on one copy")
        self._spent = True
        products = [self._previous[i] for i in positions]
        torch._foreach_mul_(products, others)
        return products


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

    update_l2 = ||theta_t - theta_{t-1}|| needs one persistent copy of the trained weights
    (`snapshot`, an `UpdateSnapshot`); with update_norms=False it is NaN and no copy is kept.
    All norms are computed in float32 whatever the parameter/gradient dtype; a None gradient
    counts as zero. Groups: the automatic layer groups of the trained parameters
    (`model_grouping`; `groups` overrides them with {regex: group name}); `grouping.first_layer`
    / `last_block` name the ends.
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
        self._plans: dict[tuple, tuple[list[int], torch.Tensor]] = {}
        self._snapshot_rows: int | None = None  # len(self._steps) when the snapshot was taken
        self.snapshot = UpdateSnapshot(self.params) if update_norms else None
        # the last record's gradients (tensor, version) and per-tensor squared L2 norms, until
        # its record_update: what `gradient_sq_norms` reuses while a gradient is unchanged
        self._recorded: tuple[list, torch.Tensor] | None = None

    @property
    def full(self) -> bool:
        """True when the buffer holds `capacity` rows: drain before the next `record`."""
        return len(self._steps) >= self.capacity

    def _present(self, tensors: list[torch.Tensor | None]) -> tuple[list[int], torch.Tensor]:
        """Positions of the non-None tensors and their group indices, cached by the None
        pattern (the same every step in practice)."""
        key = tuple(t is not None for t in tensors)
        if key not in self._plans:
            positions = [i for i, present in enumerate(key) if present]
            self._plans[key] = (positions, self._group_index[positions])
        return self._plans[key]

    def _group_l2(self, squares: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Per-group L2 norms from per-tensor squared norms with group indices `index`."""
        out = torch.zeros(len(self.layer_names), device=self.device)
        return out.scatter_add_(0, index, squares.to(self.device)).sqrt()

    def _squares(self, tensors: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared L2 norms of the non-None tensors, their group indices)."""
        positions, index = self._present(tensors)
        present = [tensors[i] for i in positions]
        return (tensor_norms(present, 2).square() if present else torch.zeros(0, device=self.device)), index

    @torch.no_grad()
    def record(self, step: int) -> torch.Tensor:
        """Record grad_l2 and grad_max_abs for `step`; return the total grad norm (device scalar).

        Call after backward (and GradScaler.unscale_) and before clipping.
        """
        if self.full:
            raise RuntimeError(f"GradientProbe buffer is full ({self.capacity} rows): "
                               "drain() first")
        grads = [p.grad for p in self.params]
        positions, index = self._present(grads)
        squares, _ = self._squares(grads)
        row = self._buffer[len(self._steps)]
        row[:, 0] = self._group_l2(squares, index)
        max_abs = torch.zeros(len(self.layer_names), device=self.device)
        if positions:
            max_abs.scatter_reduce_(0, index, tensor_norms([grads[i] for i in positions], math.inf).to(self.device), "amax")
        row[:, 1] = max_abs
        self._steps.append(int(step))
        per_tensor = torch.zeros(len(self.params), device=squares.device)
        per_tensor[positions] = squares
        self._recorded = ([None if g is None else (g, g._version) for g in grads], per_tensor)
        return row[:, 0].square().sum().sqrt()

    def last_grad_l2(self) -> torch.Tensor:
        """grad_l2 per group of the last recorded row (device tensor), for an online detector."""
        if not self._steps:
            raise RuntimeError("last_grad_l2() without a preceding record(step)")
        return self._buffer[len(self._steps) - 1, :, 0]

    @torch.no_grad()
    def gradient_sq_norms(self) -> torch.Tensor:
        """Squared L2 norm of each probed parameter's current gradient (float32, 0 without one),
        in `params` order: the last `record`'s for a gradient not changed since (the same tensor,
        not modified in place, e.g. by clipping), computed for the others."""
        grads = [p.grad for p in self.params]
        if self._recorded is None:
            seen, out = [None] * len(grads), torch.zeros(len(grads), device=self.params[0].device)
        else:
            seen, out = self._recorded
        changed = [i for i, (g, key) in enumerate(zip(grads, seen))
                   if (key is None) != (g is None) or (g is not None and (key[0] is not g or key[1] != g._version))]
        if self._recorded is None or changed:
            out = out.clone()
            out[changed] = 0.0
            fresh = [i for i in changed if grads[i] is not None]
            if fresh:
                out[fresh] = tensor_norms([grads[i] for i in fresh], 2).square()
        return out

    @torch.no_grad()
    def total_grad_norm(self) -> torch.Tensor:
        """Total L2 norm of all trained gradients (device scalar) on a step that is not logged."""
        return self._group_l2(*self._squares([p.grad for p in self.params])).square().sum().sqrt()

    @torch.no_grad()
    def snapshot_params(self) -> None:
        """Keep a copy of the weights before optimizer.step (only with update_norms)."""
        if self.snapshot is not None and self._steps:
            self.snapshot.take(self._steps[-1])
            self._snapshot_rows = len(self._steps)

    @torch.no_grad()
    def record_update(self) -> None:
        """After optimizer.step: param_l2 and update_l2 of the last recorded row.

        update_l2 needs `snapshot_params()` after this row's `record`; without it (update_norms
        off, or a skipped step where the loop took no snapshot) it stays NaN.
        """
        if not self._steps:
            raise RuntimeError("record_update() without a preceding record(step)")
        self._recorded = None  # this step's gradients are done with
        row = self._buffer[len(self._steps) - 1]
        row[:, 2] = self._group_l2(*self._squares(self.params))
        if self._snapshot_rows == len(self._steps):
            self._snapshot_rows = None
            row[:, 3] = self._group_l2(self.snapshot.update().square(), self._group_index)

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
        self._recorded = None
        return columns
