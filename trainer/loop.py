"""The instrumented MoCo v3 training loop (`trainer.train`).

One optimizer step: lr and m from their per-iteration schedules (written into device tensors:
no host sync, and a compiled forward never recompiles for them) -> forward both views
(momentum update inside, as the official code; the attention probe looks at it every
`log.attention_every` steps) -> backward -> unscale -> per-layer gradient probe (before any
clipping) -> optional patch-projection clipping -> finiteness check (the one host sync: loss,
gradient norm, clipped norm and the per-layer norms of the online spike detector come back
together) -> online spike detector (`on_spike`: log, keep the pre-update state, or skip the
update) -> optimizer-state probe -> optimizer step -> update norms. Every `knn.every` steps the
dense kNN monitor classifies a fixed held-out subset against the queue of training features;
the fresh-bank kNN runs every `knn.full_every_*`, once before the first step (labelled step -1:
the untrained network's baseline) and at the end.

The caller hands in a writer (see stabilitylab.rundir.RunWriter: append / event /
should_flush / flush / update_meta); only rank 0 gets one.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from analysis.spikes import StreamingSpikeDetector
from trainer import distributed as dist_utils
from trainer.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, save_checkpoint
from trainer.config import TrainConfig, config_differences
from trainer.data import ResumableSampler, build_datasets, build_train_loader
from trainer.knn import KnnMonitor, feature_stats, knn_accuracy, knn_predict
from trainer.methods import build_method
from trainer.model import patch_proj_parameters
from trainer.optim import build_optimizer, set_lr
from trainer.probes import GradientProbe
from trainer.probes_attention import AttentionProbe
from trainer.probes_optim import OptimizerStateProbe
from trainer.schedules import lr_at, momentum_at, scaled_lr

SPIKE_CHECKPOINTS = "spikes"  # on_spike=checkpoint writes RUN_DIR/spikes/checkpoints/step-N.pt


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


def _flushing_denormals() -> bool:
    """Whether this thread's CPU now computes subnormal floats as 0 (torch has no getter)."""
    return (torch.tensor([1e-39]) * torch.tensor([1.0])).item() == 0.0


def cpu_threads(num_workers: int) -> int:
    """torch threads for training on the CPU: the cores the data workers leave free (more
    threads than free cores make OpenMP spin-wait, several times slower on a small machine)."""
    return max(1, len(os.sched_getaffinity(0)) - num_workers)


# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_HEAP = {M_MMAP_THRESHOLD: 64 << 20, M_TRIM_THRESHOLD: 256 << 20, M_TOP_PAD: 64 << 20}


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory a CPU step frees (`keep_heap`): by default it
    returns the step's large activation buffers to the kernel and page-faults them back in on
    the next step, about 15% of a CPU step's time (docs/benchmarks.md). Buffers up to 64 MiB
    come from the heap, which keeps up to 256 MiB free at its top. Process-wide and inherited
    by forked data workers; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in KEEP_HEAP.items())


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
    """Tensors and plain values only, so that checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]  # keys: a tensor, or an array in older checkpoints
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Holds the model, optimizer, data and instruments of one run."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, writer=None, *, source: str = "stabilitylab train"):
        """source: who trains, as the run's meta records it (a replay says so)."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.source = source
        self.rank, self.world, local_rank = dist_utils.setup(
            "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.is_main = self.rank == 0
        self.writer = writer if (writer is not None and self.is_main) else NullWriter()
        self.device = pick_device(cfg.device, local_rank)
        threads = cfg.threads or (cpu_threads(cfg.data.num_workers) if self.device.type == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        if cfg.keep_heap and self.device.type == "cpu":
            keep_freed_memory()
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

        self.model = build_method(cfg).to(self.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = self.model
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.momentum = torch.tensor(cfg.moco.m, device=self.device)  # refilled every step
        self.peak_lr = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.peak_lr, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.clip_params = patch_proj_parameters(self.model.backbone) if cfg.model.patch_proj == "clip" else []
        self.build_probes()
        every = cfg.log.attention_every
        self.attention = (AttentionProbe(self.model.backbone, samples=cfg.log.attention_samples,
                                         capacity=cfg.log.flush_every_steps // every + 1)
                          if every > 0 and not cfg.compile else None)  # hooks and compile: not tested
        self.spikes = (StreamingSpikeDetector(self.probe.layer_names, cfg.log.spike_rule)
                       if cfg.log.spike_detect and cfg.log.every > 0 else None)
        self.spike_skips = self.spike_skips_in_a_row = 0
        self._last_good: dict | None = None  # on_spike=checkpoint: see _remember_last_good_state
        self._spike_state: dict | None = None  # a pre-spike state waiting to be written
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
        self.saved_step = -1  # the step of the newest checkpoint (-1: none)
        self.stop_requested = False
        self.nonfinite_in_a_row = 0
        self.step_rows: list[dict] = []
        self.last_top1 = float("nan")

    # ------------------------------------------------------------------ probes

    def build_probes(self) -> None:
        """The per-layer probes over the parameters trained now (a replay that freezes some
        builds them again)."""
        cfg = self.cfg
        rows = max(1, cfg.log.flush_every_steps // max(1, cfg.log.every) + 1)
        self.probe = GradientProbe(self.model, per_param=cfg.log.per_param,
                                   update_norms=cfg.log.update_norms, capacity=rows, device=self.device)
        self.optim_probe = (OptimizerStateProbe(self.model, self.optimizer, per_param=cfg.log.per_param,
                                                capacity=rows, gradients=self.probe)
                            if cfg.log.optim_state else None)

    @property
    def probes_full(self) -> bool:
        """A probe buffer is full: flush before the next step."""
        return any(p is not None and p.full for p in (self.probe, self.optim_probe, self.attention))

    @contextlib.contextmanager
    def _probing_attention(self):
        """The attention probe looks at this step's forward every log.attention_every steps."""
        probing = self.attention is not None and self.step % self.cfg.log.attention_every == 0
        if probing:
            self.attention.arm(self.step)
        try:
            yield
        finally:
            if probing:
                self.attention.disarm()

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
            "bank_size": [result["bank_size"]], "n_queries": [result["n_queries"]],
            "effective_rank": [result["effective_rank"]], "feature_std": [result["feature_std"]]})

    def evaluate_queue_knn(self) -> None:
        images, labels = self.knn_queries
        features = self._embed(images.split(256))
        result = self.knn.evaluate(features, labels)
        if result is not None:
            self.last_top1 = result["top1"]
            self._knn_row("queue", {**result, **feature_stats(features)})

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
                              "bank_size": len(bank), "n_queries": len(queries), **feature_stats(queries)})

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "knn": self.knn.state_dict() if self.knn else None, "rng": _rng_state(),
            "config": asdict(self.cfg), "world_size": self.world,
            "spike_detector": self.spikes.state_dict() if self.spikes else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.knn and state["knn"] is not None:
            self.knn.load_state_dict(state["knn"])
        _set_rng_state(state["rng"])
        self.step = state["step"]
        self.saved_step = self.step - 1
        if self.spikes is not None and state.get("spike_detector") is not None:
            try:
                self.spikes.load_state_dict(state["spike_detector"])
            except ValueError as exc:  # another rule or other layers: start afresh, say so
                self.writer.event(self.step - 1, "spike_detector_reset", str(exc))

    def resume(self, checkpoint: Checkpoint, state: dict) -> None:
        """Continue from a loaded checkpoint; one that does not fit the configured model or
        optimizer raises `CheckpointError` naming the file and the config keys changed since."""
        try:
            self.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
            detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
            changed = [key for key, _, _ in config_differences(state.get("config", {}), asdict(self.cfg))]
            since = f" (config changed since: {', '.join(changed)})" if changed else ""
            raise CheckpointError(f"{checkpoint.path} does not fit this run's model: {detail}{since}") from None

    def log_to(self, writer) -> None:
        """Log through `writer` from now on (rank 0; the other ranks keep writing nothing)."""
        if self.is_main:
            self.writer = writer

    def _state_is_finite(self) -> bool:
        tensors = [t for t in self.model.state_dict().values() if t.is_floating_point()]
        tensors += [v for per_param in self.optimizer.state.values() for v in per_param.values()
                    if torch.is_tensor(v) and v.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

    def save(self) -> Checkpoint | None:
        """Checkpoint the state after step S = step - 1, flushing the logs first: a checkpoint
        at step S promises every row up to S is on disk. Non-finite weights are never saved,
        so the newest checkpoint is always the last finite one."""
        self._flush_logs()
        step = self.step - 1
        if not self.is_main or step == self.saved_step:
            return None  # no step since the last checkpoint (or the one resumed from)
        if not self._state_is_finite():
            kept = latest_checkpoint(self.run_dir)
            self.writer.event(step, "checkpoint_skipped", "non-finite weights; newest finite checkpoint: "
                              + (kept.path.name if kept else "none"))
            self.writer.flush(step)
            return None
        checkpoint = save_checkpoint(self.state_dict(), self.run_dir, step, keep=self.cfg.checkpoint.keep)
        self.saved_step = step
        self.writer.event(step, "checkpoint", checkpoint.path.name)
        self.writer.flush(step)
        return checkpoint

    # ------------------------------------------------------------------ logging

    def _flush_logs(self) -> None:
        if self.step_rows:
            columns = {key: [row[key] for row in self.step_rows] for key in self.step_rows[0]}
            self.writer.append("steps", columns)
            self.step_rows.clear()
        layers = self.probe.drain()
        if self.optim_probe is not None:
            optim = self.optim_probe.drain()
            assert np.array_equal(optim["step"], layers["step"]), "probes recorded different steps"
            layers.update({k: v for k, v in optim.items() if k not in ("step", "layer")})
        if len(layers["step"]):
            self.writer.append("layers", layers)
        if self.attention is not None:
            self.writer.append("attention", self.attention.drain())
        self.writer.flush(self.step - 1)

    # ------------------------------------------------------------------ online spike detection

    def _watch_spikes(self, grad_l2: list[float]) -> bool:
        """Feed this step's per-layer grad_l2 (fetched with the step's one host sync) to the
        online detector; log the events that start here; with
        on_spike=checkpoint keep the state before this update when a spike episode begins.
        True when any layer is flagged at this step. Every rank runs it on the same
        all-reduced gradients, so all ranks agree on on_spike=skip."""
        was_spiking = bool(self.spikes.flagged.any())
        started = self.spikes.update(self.step, grad_l2)
        if started:
            self._log_spikes(started)
            if self.cfg.on_spike == "checkpoint" and not was_spiking and self._last_good is not None:
                self._spike_state = self._pre_update_state()
        return bool(self.spikes.flagged.any())

    def _log_spikes(self, started: list[dict]) -> None:
        now = datetime.now(timezone.utc)
        self.writer.append("events", {
            "step": [e["step"] for e in started], "kind": ["spike"] * len(started),
            "detail": [f"{e['layer']} {e['ratio']:.3g}x its running median" for e in started],
            "time": [now] * len(started), "layer": [e["layer"] for e in started],
            "ratio": [e["ratio"] for e in started]})
        if self.is_main and self.cfg.log.progress:
            tqdm.write(f"spike at step {self.step}: " + ", ".join(
                f"{e['layer']} {e['ratio']:.1f}x" for e in started) + f" its running median ({self.spikes.rule})")

    def _skip_spiking_update(self) -> None:
        """on_spike=skip: this update is dropped (like OLMo-core's skip-step), logged and counted."""
        self.spike_skips += 1
        self.spike_skips_in_a_row += 1
        layers = ", ".join(np.asarray(self.spikes.layers)[self.spikes.flagged])
        self.writer.event(self.step, "skipped_step", f"on_spike=skip: {layers} spiking; update skipped")
        self.writer.update_meta(spike_skips=self.spike_skips)

    @torch.no_grad()
    def _remember_last_good_state(self) -> None:
        """on_spike=checkpoint, after every step: copy into memory what the next step changes
        before its update -- the momentum encoder and buffers (its forward), the RNG, the
        detector and the lr -- so that a spike found after that step's backward can be checkpointed as
        the state before it. The trained weights, optimizer, scaler and kNN queue are still
        untouched at that point, so they need no copy."""
        if self._last_good is None:
            trained = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            sources = {name: t for name, t in self.model.state_dict(keep_vars=True).items()
                       if id(t) not in trained}
            self._last_good = {"sources": sources,
                               "tensors": {name: t.detach().clone() for name, t in sources.items()}}
        else:
            torch._foreach_copy_(list(self._last_good["tensors"].values()),
                                 [t.detach() for t in self._last_good["sources"].values()])
        self._last_good.update(step=self.step, rng=_rng_state(),
                               lrs=[group["lr"] for group in self.optimizer.param_groups],
                               spike_detector=self.spikes.state_dict() if self.spikes else None)

    def _pre_update_state(self) -> dict:
        """A checkpoint state equal to the one a save() after the previous step would write."""
        state = copy.deepcopy(self.state_dict())
        good = self._last_good
        state["model"].update({name: t.clone() for name, t in good["tensors"].items()})
        state.update(step=good["step"], rng=good["rng"], spike_detector=good["spike_detector"])
        for group, lr in zip(state["optimizer"]["param_groups"], good["lrs"]):
            group["lr"] = lr  # train_step set this step's lr already
        return state

    def _after_step_spike_policy(self) -> None:
        """Between steps: stop after too many skipped updates in a row, write a pending
        pre-spike checkpoint, and remember the state the next step starts from."""
        cfg = self.cfg
        if self.spike_skips_in_a_row >= cfg.max_spike_skips:
            self.save()
            raise UserError(f"{self.spike_skips_in_a_row} spiking updates skipped in a row at step "
                            f"{self.step - 1} (on_spike=skip): the gradients did not come back to their "
                            f"baseline; checkpoint saved (use on_spike=log, raise max_spike_skips, or "
                            f"lower optim.base_lr)")
        if self._spike_state is not None:
            state, self._spike_state = self._spike_state, None
            self._flush_logs()  # a checkpoint at step S promises every row up to S is on disk
            saved = save_checkpoint(state, self.run_dir / SPIKE_CHECKPOINTS, state["step"] - 1,
                                    keep=cfg.checkpoint.keep_spikes)
            self.writer.event(state["step"] - 1, "spike_checkpoint",
                              f"{SPIKE_CHECKPOINTS}/checkpoints/{saved.path.name}: the state before "
                              f"step {state['step']}'s update")
            self.writer.flush(self.step - 1)
        if cfg.on_spike == "checkpoint" and self.is_main:
            self._remember_last_good_state()

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
        with self._autocast(), self._probing_attention():
            loss, features = self.forward(x1, x2, self.momentum)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)

        log_layers = cfg.log.every > 0 and self.step % cfg.log.every == 0
        grad_norm = self.probe.record(self.step) if log_layers else self.probe.total_grad_norm()
        loss_mean = dist_utils.all_reduce_mean(loss.detach().float())
        watch = log_layers and self.spikes is not None
        fetched = [loss_mean.reshape(1), grad_norm.float().reshape(1)]
        if self.clip_params:  # the norm before clipping, capped at the limit: what the step applied
            clip = cfg.model.patch_proj_clip
            fetched.append(torch.nn.utils.clip_grad_norm_(self.clip_params, clip).float().clamp(max=clip).reshape(1))
        if watch:  # the online spike detector's per-layer norms come back with them
            fetched.append(self.probe.last_grad_l2())
        values = torch.cat(fetched).tolist()  # the one host sync
        loss_value, grad_value = values[:2]
        clipped = values[2] if self.clip_params else None
        finite = math.isfinite(loss_value) and math.isfinite(grad_value)
        spiking = self._watch_spikes(values[-len(self.probe.layer_names):]) if watch else False
        skip = finite and spiking and cfg.on_spike == "skip"
        if log_layers:
            self.probe.snapshot_params()
            if self.optim_probe is not None:
                self.optim_probe.before_step(self.step)
        if skip:
            self._skip_spiking_update()
            self.nonfinite_in_a_row = 0
        elif finite:
            self.scaler.step(self.optimizer)
            self.nonfinite_in_a_row = self.spike_skips_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.writer.event(self.step, "nan_loss" if not math.isfinite(loss_value) else "skipped_step",
                              f"loss={loss_value:.4g} grad_norm={grad_value:.4g}; update skipped")
        self.scaler.update()
        if log_layers:
            self.probe.record_update()  # a skipped step logs update_l2 = 0
            if self.optim_probe is not None:
                self.optim_probe.after_step()
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
            "skipped": not finite or skip, "time": datetime.now(timezone.utc),
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

    def _stop_at_step_boundary(self) -> dict:
        """Make SIGINT (Ctrl-C) and SIGTERM (what schedulers send first) ask the loop to stop
        after the current step, so that no flush or checkpoint is cut in half; a second one
        interrupts at once. Returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}  # signals reach the main thread only

        def request_stop(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _stop_now(self) -> bool:
        """Whether any rank was asked to stop (all ranks stop at the same step)."""
        if self.world == 1:
            return self.stop_requested
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        return bool(dist_utils.all_reduce_mean(flag) > 0)

    def _flush_denormals_while_training(self) -> bool | None:
        """On a CPU with `flush_denormal`, compute subnormal floats as 0 until fit() ends: some
        x86 cores multiply them far slower (a collapsed run's step 7.6x on an Intel Xeon, none on
        an AMD Zen 4; docs/benchmarks.md); only values below 1.2e-38 (fp32) change. The setting
        is the calling thread's floating-point state (numpy's too), so fit() puts back what it
        found. Returns that, None if untouched."""
        if self.device.type != "cpu" or not self.cfg.flush_denormal:
            return None
        was_on = _flushing_denormals()
        return was_on if torch.set_flush_denormal(True) else None

    def fit(self) -> None:
        """Train from self.step to total_steps (Ctrl-C / SIGTERM: stop after the step, with a checkpoint)."""
        flush_was = self._flush_denormals_while_training()
        try:
            self._fit()
        finally:
            if flush_was is not None:
                torch.set_flush_denormal(flush_was)

    def _fit(self) -> None:
        cfg = self.cfg
        self.writer.update_meta(device=str(self.device) if self.device.type == "cpu"
                                else torch.cuda.get_device_name(self.device),
                                world_size=self.world, precision=self.precision,
                                threads=torch.get_num_threads(),  # float sums depend on it
                                flush_denormal=_flushing_denormals(),
                                total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                                source=self.source,
                                first_layer=self.probe.grouping.first_layer,
                                last_block=self.probe.grouping.last_block)
        full_every = self._full_knn_every()
        if full_every and self.is_main and self.step == 0:
            self.evaluate_full_knn()  # the untrained network: the curve's baseline, at step -1
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (cfg.log.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        previous_handlers = self._stop_at_step_boundary()
        if cfg.on_spike == "checkpoint" and self.is_main:
            self._remember_last_good_state()
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
                        saved = self.save() or latest_checkpoint(self.run_dir)
                        raise UserError(f"{self.nonfinite_in_a_row} non-finite steps in a row at step "
                                        f"{self.step - 1}: the run diverged (lower optim.base_lr, or "
                                        f"use precision=fp32/bf16); newest finite checkpoint: "
                                        f"{saved.path.name if saved else 'none'}")
                    self._after_step_spike_policy()
                    if self.knn is not None and self.is_main and self.step % cfg.knn.every == 0:
                        self.evaluate_queue_knn()
                    if full_every and self.step % full_every == 0 and self.is_main:
                        self.evaluate_full_knn()
                    if self.probes_full or self.writer.should_flush(self.step - 1):
                        self._flush_logs()
                    if self.step % cfg.checkpoint.every_steps == 0 and self.step < self.total_steps:
                        self.save()
                    bar.set_postfix(loss=f"{row['loss']:.3f}", knn=f"{self.last_top1:.1%}",
                                    img_s=f"{row['images_per_sec']:.0f}", refresh=False)
                    bar.update(1)
                    if self._stop_now():
                        raise KeyboardInterrupt
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
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            bar.close()


def train(cfg: TrainConfig, *, run_dir, writer=None) -> Trainer:
    """Train the configured method (MoCo v3 by default) from step 0, logging to `writer`.
    (Resuming is `Trainer.resume` + `Trainer.log_to` + `Trainer.fit`, as
    `stabilitylab train --resume` does.)"""
    trainer = Trainer(cfg, run_dir, writer)
    try:
        trainer.fit()
    finally:
        dist_utils.teardown()
    return trainer
