"""Hugging Face `Trainer`: `StabilityCallback`, a callback writing a stabilitylab run directory.

    trainer = Trainer(model, args, ..., callbacks=[StabilityCallback(run_dir="runs/mine")])

The Trainer clips gradients before its first hook after backward (`on_pre_optimizer_step`),
so the norms seen there are the clipped ones (transformers#31033). When `max_grad_norm` is
set, the callback therefore does that clipping itself: it sets the Trainer's
`args.max_grad_norm` to 0 for the fit, records the per-group norms in
`on_pre_optimizer_step` and then clips with `torch.nn.utils.clip_grad_norm_` and the same
max norm (restored at the end). The Trainer's own logged `grad_norm` is unchanged (it is
computed before the hook). Not done under DeepSpeed / FSDP, whose sharded gradients
`clip_grad_norm_` cannot see: there the norms are after clipping (meta says so).

The loss comes from the Trainer's logs (its mean over `logging_steps`: set `logging_steps=1`
for a loss every step); evaluation metrics named in `metrics` become kNN-style curves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import TrainerCallback

from stabilitylab.integrations import curve_names, log_curves
from stabilitylab.monitor import Monitor


class StabilityCallback(TrainerCallback):
    """Write the run directory of a Hugging Face Trainer fit.

    run_dir: default `<args.output_dir>/stabilitylab`.
    metrics: evaluation metrics to log as curves (accuracies in 0-1): names as the Trainer
        reports them (`eval_accuracy`) or {metric: curve name}.
    monitor_options: passed to `stabilitylab.Monitor` (groups, every, update_norms,
        per_param, resume, flush_every_steps, ...).
    """

    def __init__(self, run_dir=None, *, metrics: Sequence[str] | Mapping[str, str] = (),
                 **monitor_options):
        self.run_dir = run_dir
        self.metrics = curve_names(metrics)
        self.monitor_options = monitor_options
        self.monitor: Monitor | None = None
        self._model = None
        self._clip = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        sharded = bool(args.deepspeed or args.fsdp)
        self._clip = 0.0 if sharded else float(args.max_grad_norm or 0.0)
        if self._clip > 0:
            args.max_grad_norm = 0.0  # clipped in on_pre_optimizer_step, after recording
        self._model = model
        config = {"training_args": args.to_dict(), "model": getattr(model, "config", None)}
        self.monitor = Monitor(model, optimizer, self.run_dir or Path(args.output_dir) / "stabilitylab",
                               config=config, rank=0 if state.is_world_process_zero else 1,
                               source="huggingface", **self.monitor_options)
        if self.monitor.active:
            from stabilitylab.rundir import update_meta

            update_meta(self.monitor.run_dir, norms=(
                "after the Trainer's gradient clipping (DeepSpeed / FSDP)" if sharded and args.max_grad_norm
                else "before gradient clipping"))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.after_backward(state.global_step)
        if self._clip > 0:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._clip)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.after_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.monitor.log_loss(state.global_step - 1, logs["loss"])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        log_curves(self.monitor, state.global_step - 1, metrics, self.metrics, epoch=state.epoch)

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor.close()
        if self._clip > 0:
            args.max_grad_norm = self._clip
