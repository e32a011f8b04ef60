"""`stabilitylab.Monitor`: the trainer's instruments in anyone's PyTorch training loop.

    with sl.Monitor(model, optimizer, "runs/mine", config=hparams) as monitor:
        for step, batch in enumerate(loader):
            loss = compute_loss(model, batch)
            optimizer.zero_grad()
            loss.backward()                        # AMP fp16: scaler.unscale_(optimizer) first
            monitor.after_backward(step, loss=loss)    # per-group grad norms, before clipping
            clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            monitor.after_step(lr=scheduler.get_last_lr()[0])   # weight / update norms
            if step % 500 == 0:
                monitor.log_knn(step, top1=acc, n_queries=n, source="val")

It writes the run directory `stabilitylab train` writes (steps, layers, knn, events, meta,
config; docs/run_directory.md) through the same `RunWriter`, so the same crash safety and
flush rules hold, and `analyze`, `compare` and `report` read it unchanged. The per-group
norms come from the trainer's `GradientProbe` over the automatic layer groups of
`trainer.groups`: computed on the device, buffered there, copied to the host once per flush,
so a step adds no host synchronisation. Only rank 0 writes (DDP); frozen parameters are left
out; wrappers (DDP, torch.compile) are looked through.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import socket
import sys
import time
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml

import stabilitylab
from stabilitylab.rundir import CONFIG_FILE, RunWriter, atomic_write_text, update_meta, utc_now, write_meta
from stabilitylab.run import is_run_dir
from trainer.probes import GradientProbe, unwrap
from trainer.probes_optim import OptimizerStateProbe


class Monitor:
    """Per-step loss / lr and per-group gradient, weight and update norms into a run directory.

    model: the module being trained (DDP- or torch.compile-wrapped is fine).
    optimizer: optional; its first param group's lr is logged when `after_step` gets none,
        and with `scaler` it is checked to have been unscaled.
    run_dir: the run directory (default runs/<time>-<model class>). It must not exist or be
        empty, unless `resume`.
    config: the run's hyperparameters (dict, dataclass, argparse.Namespace, OmegaConf, or
        anything with `to_dict()`), written to config.yaml.
    resume: continue `run_dir` if it holds a run: the first step logged (say S) opens a new
        generation, so rows the earlier process wrote from step S on are superseded and no
        step appears twice. Starts a new run when `run_dir` is absent or empty.
    groups: {regex: group name} overriding the automatic layer groups (`trainer.groups`),
        e.g. {r"encoder\\.layer\\.(\\d+)\\.": r"blocks.\\1"}.
    every: per-group norms every `every` steps (steps rows are written every step; their
        grad_norm only on those steps).
    update_norms: also ||theta_t - theta_{t-1}|| per group (one copy of the trained weights).
    optim_state: with an `optimizer`, also its state per group on the logged steps (the
        `layers` optimizer-state columns of `trainer.probes_optim`, the trainer's code),
        taken by a step pre-hook on the optimizer, so after any clipping.
    per_param: one layer row per parameter instead of per group.
    scaler: the torch.amp.GradScaler of an fp16 run: its scale is logged as loss_scale and
        steps whose gradients are not finite are marked skipped (as the scaler skips them).
        Call `scaler.unscale_(optimizer)` before `after_backward`.
    batch_size: samples per step (all ranks), for the images_per_sec column.
    rank: this process's rank (default: torch.distributed's, else $RANK, else 0); only rank
        0 writes, the others do nothing.
    source: the run's meta "source" (the integrations name themselves).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 run_dir: str | os.PathLike | None = None, *, config: Any = None,
                 resume: bool = False, groups: Mapping[str, str] | None = None, every: int = 1,
                 update_norms: bool = True, optim_state: bool = True, per_param: bool = False, scaler=None,
                 batch_size: int | None = None, flush_every_steps: int = 500,
                 flush_every_s: float = 60.0, rank: int | None = None, source: str = "Monitor"):
        if every < 1:
            raise ValueError(f"every={every}: must be >= 1")
        self.rank = _rank() if rank is None else rank
        self.active = self.rank == 0
        self.run_dir = Path(run_dir) if run_dir is not None else _default_run_dir(model)
        self.optimizer, self.scaler, self.every, self.batch_size = optimizer, scaler, every, batch_size
        self.writer: RunWriter | None = None
        self._writer_options = dict(flush_every_steps=flush_every_steps, flush_every_s=flush_every_s)
        self._rows: list[dict] = []
        self._pending: dict | None = None
        self._last_step_end: float | None = None
        self._closed = False
        if not self.active:
            return
        capacity = flush_every_steps // every + 1
        self.probe = GradientProbe(model, per_param=per_param, update_norms=update_norms,
                                   capacity=capacity, groups=groups)
        self.optim_probe, self._optim_hook, self._optim_step = None, None, None
        if optimizer is not None and optim_state:
            self.optim_probe = OptimizerStateProbe(model, optimizer, per_param=per_param,
                                                   capacity=capacity, groups=groups, gradients=self.probe)
            self._optim_hook = _stepping(optimizer).register_step_pre_hook(_weak_hook(self))
        grouping = self.probe.grouping
        self._resuming = resume and is_run_dir(self.run_dir)
        if self.run_dir.exists() and any(self.run_dir.iterdir()) and not self._resuming:
            raise FileExistsError(
                f"{self.run_dir} already exists and is not empty; pick another run_dir"
                + ("" if resume else " or pass resume=True to continue it"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            atomic_write_text(self.run_dir / CONFIG_FILE, _to_yaml(config))
        info = dict(source=source, model=type(unwrap(model)).__name__,
                    first_layer=grouping.first_layer, last_block=grouping.last_block,
                    device=str(self.probe.device), status="running", end_time=None)
        if self._resuming:
            update_meta(self.run_dir, **info, resumed_at=utc_now().isoformat())
        else:
            write_meta(self.run_dir, {**_environment(), **info, "start_time": utc_now().isoformat()})
            self.writer = RunWriter(self.run_dir, **self._writer_options)

    # ------------------------------------------------------------------ the loop's calls

    @torch.no_grad()
    def after_backward(self, step: int, loss: torch.Tensor | float | None = None) -> torch.Tensor | None:
        """After backward (and GradScaler.unscale_), before clipping: record the gradients.

        Returns the total gradient norm of the trained parameters (a device scalar, no host
        sync) on a logged step, else None; None on ranks other than 0.
        """
        if not self.active:
            return None
        if self._pending is not None:  # after_step was not called for the previous step
            self._finish_pending(lr=None, loss=None, epoch=None)
        self._flush_if_due()
        self._open_writer(step)
        self._check_unscaled()
        logged = step % self.every == 0
        grad_norm = None
        if logged:
            grad_norm = self.probe.record(step)
            self.probe.snapshot_params()
        self._pending = {"step": int(step), "loss": _detach(loss), "grad_norm": grad_norm,
                         "logged": logged}
        return grad_norm

    @torch.no_grad()
    def after_step(self, lr: float | None = None, *, loss: torch.Tensor | float | None = None,
                   epoch: float | None = None) -> None:
        """After optimizer.step: weight and update norms, and the step's row (lr, loss, time).

        lr defaults to the optimizer's first param group's; loss may be given here or to
        `after_backward`.
        """
        if not self.active:
            return
        if self._pending is None:
            raise RuntimeError("Monitor.after_step() without a preceding after_backward(step)")
        self._finish_pending(lr, loss, epoch)

    def log_loss(self, step: int, loss: float) -> None:
        """Set the loss of an already recorded step that is not flushed yet (for frameworks
        that report the loss after the step, e.g. the Hugging Face Trainer's logs)."""
        if not self.active:
            return
        for row in reversed(self._rows):
            if row["step"] == step:
                row["loss"] = _detach(loss)
                return

    def log_knn(self, step: int, top1: float, *, top5: float | None = None,
                n_queries: int | None = None, source: str = "val", k: int | None = None,
                bank_size: int | None = None, epoch: float | None = None) -> None:
        """One evaluation of any accuracy-like metric in 0-1 (kNN, linear probe, val acc):
        the `knn` table, where the dip analysis reads it. n_queries (the number of evaluated
        samples) sets its binomial noise; `source` names the curve."""
        if not self.active:
            return
        self._open_writer(step)
        self.writer.append("knn", {"step": [step], "epoch": [epoch], "source": [source], "k": [k],
                                   "top1": [float(top1)], "top5": [top5], "bank_size": [bank_size],
                                   "n_queries": [n_queries]})

    def event(self, step: int, kind: str, detail: str = "") -> None:
        """An entry of the `events` table (checkpoint, resumed, anything worth a marker)."""
        if self.active:
            self._open_writer(step)
            self.writer.event(step, kind, detail)

    def close(self, status: str = "finished", error: str | None = None) -> None:
        """Write what is buffered and set the run's status; compacts the tables when finished."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._optim_hook is not None:
            self._optim_hook.remove()
        if self._pending is not None:
            self._finish_pending(lr=None, loss=None, epoch=None)
        if self.writer is not None:
            self._write_buffered()
            self.writer.close(compact=status == "finished")
        update_meta(self.run_dir, status=status, end_time=utc_now().isoformat(), error=error)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("interrupted")
        else:
            self.close("failed", f"{exc_type.__name__}: {exc}".splitlines()[0])
        return False

    # ------------------------------------------------------------------ internals

    def _open_writer(self, step: int) -> None:
        """A resumed run opens its new generation at the first step it logs."""
        if self.writer is None:
            self.writer = RunWriter(self.run_dir, resume_step=step - 1, **self._writer_options)
            self.writer.event(step, "resumed", f"Monitor continues at step {step}")

    def _check_unscaled(self) -> None:
        if self.scaler is None or not self.scaler.is_enabled() or self.optimizer is None:
            return
        from torch.amp.grad_scaler import OptState

        state = self.scaler._per_optimizer_states.get(id(self.optimizer), {})
        if state.get("stage") is not OptState.UNSCALED:
            raise RuntimeError("call scaler.unscale_(optimizer) before Monitor.after_backward: "
                               "the norms must be of the unscaled gradients")

    def _before_optimizer_step(self) -> None:
        """Step pre-hook of the optimizer: its state and gradients as this update meets them."""
        row = self._pending
        if row is not None and row["logged"] and self._optim_step != row["step"]:
            self.optim_probe.before_step(row["step"])
            self._optim_step = row["step"]

    def _finish_pending(self, lr, loss, epoch) -> None:
        row, self._pending = self._pending, None
        if row["logged"]:
            self.probe.record_update()
            if self.optim_probe is not None:
                if self._optim_step != row["step"]:  # the optimizer skipped this step (fp16 inf)
                    self.optim_probe.before_step(row["step"])
                self.optim_probe.after_step()
                self._optim_step = None
        now = time.perf_counter()
        step_time = None if self._last_step_end is None else now - self._last_step_end
        self._last_step_end = now
        if lr is None and self.optimizer is not None:
            lr = self.optimizer.param_groups[0]["lr"]  # a tensor with capturable optimizers
        lr = _detach(lr)
        scale = None
        if self.scaler is not None and self.scaler.is_enabled():
            scale = self.scaler._get_scale_async().detach().clone()  # no host sync
        row.update(lr=lr, epoch=epoch, step_time_s=step_time, loss_scale=scale, time=utc_now())
        if loss is not None:
            row["loss"] = _detach(loss)
        self._rows.append(row)

    def _flush_if_due(self) -> None:
        last = self._rows[-1]["step"] if self._rows else None
        if self.writer is not None and last is not None and (
                self.probe.full or (self.optim_probe is not None and self.optim_probe.full)
                or self.writer.should_flush(last)):
            self._write_buffered()
            self.writer.flush(last)

    def _write_buffered(self) -> None:
        """Steps rows and the probe's buffer into the writer (one device->host copy each)."""
        layers = self.probe.drain()
        if self.optim_probe is not None:  # the same logged steps and groups, row for row
            layers.update({k: v for k, v in self.optim_probe.drain().items() if k not in ("step", "layer")})
        if len(layers["step"]):
            self.writer.append("layers", layers)
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        loss, grad_norm, scale, lr = (_to_host([r[key] for r in rows])
                                      for key in ("loss", "grad_norm", "loss_scale", "lr"))
        logged = np.array([r["logged"] for r in rows])
        scaled = self.scaler is not None and self.scaler.is_enabled()
        skipped = logged & ~np.isfinite(grad_norm) if scaled else np.zeros(len(rows), dtype=bool)
        step_time = np.array([np.nan if r["step_time_s"] is None else r["step_time_s"] for r in rows])
        columns = {key: [r[key] for r in rows] for key in ("step", "epoch", "time")}
        columns.update(lr=lr, loss=loss, grad_norm=grad_norm, loss_scale=scale, skipped=skipped,
                       step_time_s=step_time)
        if self.batch_size:
            columns["images_per_sec"] = self.batch_size / step_time
        self.writer.append("steps", columns)
        for r, l, g, s, is_logged in zip(rows, loss, grad_norm, skipped, logged):
            if r["loss"] is not None and not math.isfinite(l):
                self.writer.event(r["step"], "nan_loss", f"loss={l:.4g} grad_norm={g:.4g}")
            elif s:
                self.writer.event(r["step"], "skipped_step", f"grad_norm={g:.4g}; update skipped by the scaler")
            elif is_logged and not scaled and not math.isfinite(g):
                self.writer.event(r["step"], "nonfinite_grad",
                                  f"grad_norm={g:.4g}; the optimizer stepped on it")


def _weak_hook(monitor: "Monitor"):
    """The optimizer step pre-hook, holding the Monitor weakly: no reference cycle keeps an
    abandoned Monitor (and its run directory's lock) alive."""
    ref = weakref.ref(monitor)

    def hook(*_):
        if (alive := ref()) is not None:
            alive._before_optimizer_step()
    return hook


def _stepping(optimizer):
    """The torch optimizer whose step() runs: wrappers (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer) hold it as `.optimizer`."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _detach(value):
    """A float, None, or a float32 device scalar copied (the source may change in place)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(torch.float32, copy=True)
    return None if value is None else float(value)


def _to_host(values: list) -> np.ndarray:
    """Floats and device scalars (None = NaN) as one float64 array, one device copy per device."""
    out = np.full(len(values), np.nan)
    tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    if tensors:
        out[[i for i, _ in tensors]] = torch.stack([v.to(tensors[0][1].device) for _, v in tensors]).cpu().numpy()
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, torch.Tensor):
            out[i] = v
    return out


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def _default_run_dir(model) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{type(unwrap(model)).__name__.lower()}"


def _environment() -> dict:
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))
    return {"stabilitylab": stabilitylab.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "host": socket.gethostname(), "world_size": world,
            "argv": sys.argv}


def _plain(value):
    """A config value as YAML-safe plain data (unknown objects as their repr text)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, argparse.Namespace):
        value = vars(value)
    elif type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    elif not isinstance(value, Mapping) and callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _to_yaml(config) -> str:
    plain = _plain(config)
    if not isinstance(plain, dict):
        raise TypeError(f"config must be a mapping-like object, not {type(config).__name__}")
    return yaml.safe_dump(plain, sort_keys=False)
