"""The instrumented MoCo v3 training loop (`trainer.train`).

One optimizer step: lr and m from their per-iteration schedules (written into device tensors:
no host sync, and a compiled forward never recompiles for them) -> forward both views
(momentum update inside, as the official code) -> backward -> unscale -> per-layer gradient
probe (before any clipping) -> optional patch-projection clipping -> finiteness check (the one
host sync: loss, gradient norm and clipped norm come back together) -> optimizer step ->
update norms. Every `knn.every` steps the dense kNN monitor classifies a fixed held-out subset
against the queue of training features; the fresh-bank kNN runs every `knn.full_every_*`,
once before the first step (labelled step -1: the untrained network's baseline) and at the end.

The caller hands in a writer (see stabilitylab.rundir.RunWriter: append / event /
should_flush / flush / update_meta); only rank 0 gets one.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from trainer import distributed as dist_utils
from trainer.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainConfig
from trainer.data import ResumableSampler, build_datasets, build_train_loader
from trainer.knn import KnnMonitor, knn_accuracy, knn_predict
from trainer.model import patch_proj_parameters
from trainer.moco import MoCo
from trainer.optim import build_optimizer, set_lr
from trainer.probes import GradientProbe
from trainer.schedules import lr_at, momentum_at


class UserError(RuntimeError):
    """A problem the user must fix (bad data, diverged run); the CLI prints it as one line."""


class NullWriter:
    """Stands in for the run writer on ranks other than 0."""

    def append(self, table, columns):
        pass

    def event(self, step, kind, detail=""):
        pass

    def should_flush(self, step):
        return False

    def flush(self, step=None):
        pass

    def update_meta(self, **fields):
        pass


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name} asked for, but torch sees no CUDA device")
        torch.cuda.set_device(device)
    return device


def cpu_threads(num_workers: int) -> int:
    """torch threads for training on the CPU: the cores the data workers leave free (more
    threads than free cores make OpenMP spin-wait, several times slower on a small machine)."""
    return max(1, len(os.sched_getaffinity(0)) - num_workers)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def pick_precision(name: str, device: torch.device) -> str:
    """precision=auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32."""
    if name == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise UserError(f"precision={name!r}: use auto, fp32, bf16 or fp16")
    return name


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Holds the model, optimizer, data and instruments of one run."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, writer=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank, self.world, local_rank = dist_utils.setup(
            "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.is_main = self.rank == 0
        self.writer = writer if (writer is not None and self.is_main) else NullWriter()
        self.device = pick_device(cfg.device, local_rank)
        threads = cfg.threads or (cpu_threads(cfg.data.num_workers) if self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.precision = pick_precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)

        if cfg.optim.batch_size % self.world:
            raise UserError(f"optim.batch_size={cfg.optim.batch_size} is not divisible by "
                            f"the world size {self.world}")
        self.local_batch = cfg.optim.batch_size // self.world
        self.data = build_datasets(cfg.data, cfg.model.img_size, cfg.seed)
        if len(self.data.train) < cfg.optim.batch_size:
            raise UserError(f"the training set has {len(self.data.train)} images, fewer than one "
                            f"batch of optim.batch_size={cfg.optim.batch_size}")
        self.sampler = ResumableSampler(len(self.data.train), self.local_batch, seed=cfg.seed,
                                        rank=self.rank, world_size=self.world)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.loader = build_train_loader(self.data, cfg.data, self.sampler, self.local_batch, self.device)
        # the schedules always span optim.epochs; optim.max_steps only stops early
        self.schedule_steps = max(1, round(cfg.optim.epochs * self.steps_per_epoch))
        self.total_steps = min(self.schedule_steps, cfg.optim.max_steps or self.schedule_steps)
        self.warmup_epochs = (cfg.optim.warmup_epochs if cfg.optim.warmup_steps is None
                              else cfg.optim.warmup_steps / self.steps_per_epoch)

        self.model = MoCo(cfg.model, cfg.moco).to(self.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = self.model
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.momentum = torch.tensor(cfg.moco.m, device=self.device)  # refilled every step
        self.peak_lr = cfg.optim.base_lr * cfg.optim.batch_size / 256
        self.optimizer = build_optimizer(self.model, cfg.optim, self.peak_lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.clip_params = patch_proj_parameters(self.model.backbone) if cfg.model.patch_proj == "clip" else []
        log_rows = max(1, cfg.log.flush_every_steps // max(1, cfg.log.every) + 1)
        self.probe = GradientProbe(self.model, per_param=cfg.log.per_param,
                                   update_norms=cfg.log.update_norms, capacity=log_rows,
                                   device=self.device)
        self.knn = None
        if cfg.knn.enabled:
            queue_size = max(1, int(cfg.knn.queue_fraction * len(self.data.train)))
            self.knn = KnnMonitor(queue_size, self.model.feature_dim, self.data.num_classes,
                                  k=cfg.knn.k, temperature=cfg.knn.temperature,
                                  backend=cfg.knn.backend, device=self.device)
            self.knn_queries = self._fixed_subset(self.data.val_plain, cfg.knn.val_size) if self.is_main else None
            # fresh-bank kNN on fixed subsets, decoded once, or (None) on the whole splits, streamed
            self.full_bank = (self._fixed_subset(self.data.train_plain, cfg.knn.bank_size)
                              if self.is_main and cfg.knn.bank_size else None)
            self.full_queries = (self._fixed_subset(self.data.val_plain, cfg.knn.full_queries)
                                 if self.is_main and cfg.knn.full_queries else None)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.step_rows: list[dict] = []
        self.last_top1 = float("nan")

    # ------------------------------------------------------------------ helpers

    def _autocast(self):
        """Autocast for bf16 / fp16. On a CPU also torch's math attention kernel: there the
        flash-attention backward in bf16 is several times slower than the whole rest of a
        short-sequence ViT step (measured in docs/benchmarks.md, figure 6)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=dtype))
        if self.device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack

    def _epoch(self, step: int) -> float:
        return step / self.steps_per_epoch

    def _fixed_subset(self, dataset, size: int):
        """A fixed seeded subset of a plain dataset, decoded once and kept on the device
        (float16 to halve memory), so each kNN evaluation on it costs one forward pass."""
        size = min(size, len(dataset))
        generator = torch.Generator().manual_seed(self.cfg.seed)
        indices = torch.randperm(len(dataset), generator=generator)[:size].tolist()
        images, labels = [], []
        for x, y in self._eval_loader(torch.utils.data.Subset(dataset, indices)):
            images.append(x.to(self.device, torch.float16))
            labels.append(y.to(self.device))
        return torch.cat(images), torch.cat(labels)

    def _eval_loader(self, dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=self.cfg.data.num_workers)

    @torch.no_grad()
    def _embed(self, batches) -> torch.Tensor:
        """Backbone features of image batches in eval mode (BatchNorm statistics untouched)."""
        self.model.eval()
        try:
            with self._autocast():
                feats = [self.model.backbone_features(x.to(self.device).float()).float() for x in batches]
        finally:
            self.model.train()
        return torch.cat(feats)

    def _features_of(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of a whole dataset, streamed batch by batch."""
        labels = []

        def images():
            for x, y in self._eval_loader(dataset):
                labels.append(y)
                yield x

        features = self._embed(images())
        return features, torch.cat(labels).to(self.device)

    def _knn_row(self, source: str, result: dict) -> None:
        """Evaluations run between steps; they are labelled with the last completed step."""
        self.writer.append("knn", {
            "step": [self.step - 1], "epoch": [self._epoch(self.step)], "source": [source],
            "k": [result["k"]], "top1": [result["top1"]], "top5": [result["top5"]],
            "bank_size": [result["bank_size"]], "n_queries": [result["n_queries"]]})

    def evaluate_queue_knn(self) -> None:
        images, labels = self.knn_queries
        result = self.knn.evaluate(self._embed(images.split(256)), labels)
        if result is not None:
            self.last_top1 = result["top1"]
            self._knn_row("queue", result)

    def _features_of_subset(self, subset, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of a cached fixed subset, or of the whole dataset streamed."""
        if subset is None:
            return self._features_of(dataset)
        images, labels = subset
        return self._embed(images.split(256)), labels

    def evaluate_full_knn(self) -> None:
        """Fresh bank of the training split (no augmentation) vs the held-out split, each
        whole or its fixed subset (knn.bank_size, knn.full_queries)."""
        bank, bank_labels = self._features_of_subset(self.full_bank, self.data.train_plain)
        queries, labels = self._features_of_subset(self.full_queries, self.data.val_plain)
        scores = knn_predict(bank, bank_labels, queries, k=self.cfg.knn.k,
                             temperature=self.cfg.knn.temperature,
                             num_classes=self.data.num_classes, backend=self.cfg.knn.backend)
        top1, top5 = knn_accuracy(scores, labels)
        self._knn_row("val", {"k": self.cfg.knn.k, "top1": top1, "top5": top5,
                              "bank_size": len(bank), "n_queries": len(queries)})

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "knn": self.knn.state_dict() if self.knn else None, "rng": _rng_state(),
            "config": asdict(self.cfg), "world_size": self.world,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.knn and state["knn"] is not None:
            self.knn.load_state_dict(state["knn"])
        _set_rng_state(state["rng"])
        self.step = state["step"]

    def save(self) -> None:
        """Flush the logs first: a checkpoint at step S promises every row up to S is on disk."""
        self._flush_logs()
        if self.is_main:
            save_checkpoint(self.state_dict(), self.run_dir, self.step - 1, keep=self.cfg.checkpoint.keep)
            self.writer.event(self.step - 1, "checkpoint", f"step-{self.step - 1:08d}.pt")
            self.writer.flush(self.step - 1)

    # ------------------------------------------------------------------ logging

    def _flush_logs(self) -> None:
        if self.step_rows:
            columns = {key: [row[key] for row in self.step_rows] for key in self.step_rows[0]}
            self.writer.append("steps", columns)
            self.step_rows.clear()
        layers = self.probe.drain()
        if len(layers["step"]):
            self.writer.append("layers", layers)
        self.writer.flush(self.step - 1)

    # ------------------------------------------------------------------ one step

    def train_step(self, x1, x2, labels) -> dict:
        cfg = self.cfg
        started = time.perf_counter()
        lr = lr_at(self.step, base_lr=cfg.optim.base_lr, global_batch=cfg.optim.batch_size,
                   steps_per_epoch=self.steps_per_epoch, warmup_epochs=self.warmup_epochs,
                   epochs=cfg.optim.epochs, schedule=cfg.optim.schedule)
        m = momentum_at(self.step, m=cfg.moco.m, steps_per_epoch=self.steps_per_epoch,
                        epochs=cfg.optim.epochs, cosine=cfg.moco.m_cos)
        set_lr(self.optimizer, lr)
        self.momentum.fill_(m)
        x1 = x1.to(self.device, non_blocking=True)
        x2 = x2.to(self.device, non_blocking=True)
        with self._autocast():
            loss, features = self.forward(x1, x2, self.momentum)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)

        log_layers = cfg.log.every > 0 and self.step % cfg.log.every == 0
        grad_norm = self.probe.record(self.step) if log_layers else self.probe.total_grad_norm()
        loss_mean = dist_utils.all_reduce_mean(loss.detach().float())
        fetched = [loss_mean, grad_norm.float()]
        if self.clip_params:  # the norm before clipping, capped at the limit: what the step applied
            clip = cfg.model.patch_proj_clip
            fetched.append(torch.nn.utils.clip_grad_norm_(self.clip_params, clip).float().clamp(max=clip))
        loss_value, grad_value, *clipped = torch.stack(fetched).tolist()  # the one host sync
        clipped = clipped[0] if clipped else None
        finite = math.isfinite(loss_value) and math.isfinite(grad_value)
        if log_layers:
            self.probe.snapshot_params()
        if finite:
            self.scaler.step(self.optimizer)
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.writer.event(self.step, "nan_loss" if not math.isfinite(loss_value) else "skipped_step",
                              f"loss={loss_value:.4g} grad_norm={grad_value:.4g}; update skipped")
        self.scaler.update()
        if log_layers:
            self.probe.record_update()  # a skipped step logs update_l2 = 0
        if self.knn is not None:
            feats = dist_utils.concat_all_gather(features.float())
            self.knn.enqueue(feats, dist_utils.concat_all_gather(labels.to(self.device, non_blocking=True)))
        elapsed = time.perf_counter() - started
        return {
            "step": self.step, "epoch": self._epoch(self.step + 1), "lr": lr, "momentum": m,
            "loss": loss_value, "grad_norm": grad_value,
            "patch_proj_grad_norm_clipped": clipped,
            "images_per_sec": cfg.optim.batch_size / elapsed, "step_time_s": elapsed,
            "loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else None,
            "skipped": not finite, "time": datetime.now(timezone.utc),
        }

    # ------------------------------------------------------------------ the loop

    def _full_knn_every(self) -> int:
        """Steps between fresh-bank kNN evaluations (knn.full_every_steps, else
        knn.full_every_epochs); 0 = never."""
        knn = self.cfg.knn
        if self.knn is None:
            return 0
        if knn.full_every_steps:
            return knn.full_every_steps
        return max(1, round(knn.full_every_epochs * self.steps_per_epoch)) if knn.full_every_epochs > 0 else 0

    def fit(self) -> None:
        cfg = self.cfg
        self.writer.update_meta(device=str(self.device) if self.device.type == "cpu"
                                else torch.cuda.get_device_name(self.device),
                                world_size=self.world, precision=self.precision,
                                total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        full_every = self._full_knn_every()
        if full_every and self.is_main and self.step == 0:
            self.evaluate_full_knn()  # the untrained network: the curve's baseline, at step -1
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.log.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch)
                self.sampler.set_start_batch(start_batch)
                for x1, x2, labels, bad_paths in self.loader:  # re-reads the sampler's epoch
                    for path in filter(None, bad_paths):
                        self.writer.event(self.step, "bad_image", f"unreadable, replaced: {path}")
                    row = self.train_step(x1, x2, labels)
                    self.step_rows.append(row)
                    self.step += 1
                    if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                        self.save()
                        raise UserError(f"{self.nonfinite_in_a_row} non-finite steps in a row at step "
                                        f"{self.step - 1}: the run diverged (lower optim.base_lr, or "
                                        f"use precision=fp32/bf16); checkpoint saved")
                    if self.knn is not None and self.is_main and self.step % cfg.knn.every == 0:
                        self.evaluate_queue_knn()
                    if full_every and self.step % full_every == 0 and self.is_main:
                        self.evaluate_full_knn()
                    if self.probe.full or self.writer.should_flush(self.step - 1):
                        self._flush_logs()
                    if self.step % cfg.checkpoint.every_steps == 0 and self.step < self.total_steps:
                        self.save()
                    bar.set_postfix(loss=f"{row['loss']:.3f}", knn=f"{self.last_top1:.1%}",
                                    img_s=f"{row['images_per_sec']:.0f}", refresh=False)
                    bar.update(1)
                    if self.step >= self.total_steps:
                        break
            if full_every and self.is_main and self.step % full_every != 0:
                self.evaluate_full_knn()  # always end with a fresh-bank number
            self.save()
        except KeyboardInterrupt:
            self.writer.event(self.step - 1, "stopped", "interrupted; checkpoint saved")
            self.save()
            raise
        finally:
            bar.close()


def train(cfg: TrainConfig, *, run_dir, writer=None, resume_from: Checkpoint | None = None) -> Trainer:
    """Train MoCo v3 as configured, logging to `writer`; resume from a checkpoint if given."""
    trainer = Trainer(cfg, run_dir, writer)
    try:
        if resume_from is not None:
            trainer.load_state_dict(load_checkpoint(resume_from, map_location=trainer.device))
            trainer.writer.event(trainer.step - 1, "resumed", f"from {resume_from.path.name}")
        trainer.fit()
    finally:
        dist_utils.teardown()
    return trainer
