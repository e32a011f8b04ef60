"""PyTorch Lightning: `StabilityMonitor`, a callback writing a stabilitylab run directory.

    trainer = L.Trainer(callbacks=[StabilityMonitor(run_dir="runs/mine", metrics={"val_acc": "val"})])

Per-group gradient norms in `on_before_optimizer_step` (after Lightning's AMP unscaling and
before its gradient clipping, once per optimizer step with gradient accumulation), weight /
update norms, loss (`training_step`'s) and lr in `on_train_batch_end` after that step, and
each named validation metric (an accuracy in 0-1) as a kNN-style curve after validation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import lightning.pytorch as pl

from stabilitylab.integrations import curve_names, log_curves
from stabilitylab.monitor import Monitor


class StabilityMonitor(pl.Callback):
    """Write the run directory of a Lightning fit.

    run_dir: default `<trainer.log_dir>/stabilitylab` (next to the logger's files), or
        `<default_root_dir>/stabilitylab` without a logger.
    metrics: validation metrics to log as curves: names (the curve is named after the metric)
        or {metric: curve name}, e.g. {"val_acc": "val"}.
    monitor_options: passed to `stabilitylab.Monitor` (groups, every, update_norms,
        per_param, resume, flush_every_steps, ...).
    """

    def __init__(self, run_dir=None, *, metrics: Sequence[str] | Mapping[str, str] = (),
                 **monitor_options):
        self.run_dir = run_dir
        self.metrics = curve_names(metrics)
        self.monitor_options = monitor_options
        self.monitor: Monitor | None = None
        self._stepped = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            return
        run_dir = self.run_dir or Path(trainer.log_dir or trainer.default_root_dir) / "stabilitylab"
        config = {"hparams": dict(pl_module.hparams), "max_steps": trainer.max_steps,
                  "max_epochs": trainer.max_epochs, "precision": str(trainer.precision),
                  "accumulate_grad_batches": trainer.accumulate_grad_batches,
                  "gradient_clip_val": trainer.gradient_clip_val}
        self.monitor = Monitor(pl_module, trainer.optimizers[0] if trainer.optimizers else None,
                               run_dir, config=config, rank=trainer.global_rank,
                               scaler=getattr(trainer.precision_plugin, "scaler", None),
                               source="lightning", **self.monitor_options)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.monitor.after_backward(trainer.global_step)
        self._stepped = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._stepped:  # a gradient-accumulation micro-batch
            return
        self._stepped = False
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        batches = trainer.num_training_batches
        epoch = trainer.current_epoch + (batch_idx + 1) / batches if batches not in (0, float("inf")) else None
        self.monitor.after_step(loss=loss, epoch=epoch)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor is None:
            return
        log_curves(self.monitor, trainer.global_step - 1, trainer.callback_metrics, self.metrics)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.monitor.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close("interrupted" if isinstance(exception, KeyboardInterrupt) else "failed",
                               f"{type(exception).__name__}: {exception}".splitlines()[0])
