"""The trainer's configuration schema: one dataclass per concern, defaults = the CPU preset.

The caller (the `stabilitylab` CLI, a test, a notebook) builds a `TrainConfig`, usually
through OmegaConf (YAML file + dotted overrides), and hands it to `trainer.train`.
`resolve()` fills the fields a model preset decides (width, depth, head sizes) so that the
`config.yaml` written next to a run is enough to rerun it exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional

# image and patch size, width, depth, heads, projector/predictor hidden dim, output dim
MODEL_PRESETS = {
    # CPU-sized: 32 px images in 8 px patches (16 tokens) keep a step well under a second
    "tiny": dict(img_size=32, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                 head_hidden_dim=512, head_out_dim=128),
    "vit_small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12,
                      head_hidden_dim=4096, head_out_dim=256),
    "vit_base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                     head_hidden_dim=4096, head_out_dim=256),
    "vit_large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
                      head_hidden_dim=4096, head_out_dim=256),
}


# allowed values of the string options, checked by resolve()
METHODS = ("mocov3", "simclr", "byol")
POS_EMBEDS = ("sincos", "learned", "none")
POOLS = ("token", "avg", "avg_nonorm")
PATCH_PROJS = ("learned", "frozen", "batchnorm", "weightnorm", "clip")
CHOICES = {
    "method": METHODS,
    "model.pos_embed": POS_EMBEDS,
    "model.pool": POOLS,
    "model.patch_proj": PATCH_PROJS,
    "optim.name": ("adamw", "lamb", "lars"),
    "optim.schedule": ("cosine", "constant"),
    "data.dataset": ("imagefolder", "cifar10", "cifar100", "synthetic"),
    "data.augment": ("mocov3", "none"),
    "data.pipeline": ("device", "workers"),
    "knn.backend": ("auto", "faiss", "torch"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "on_spike": ("log", "checkpoint", "skip"),
}
DEVICES = r"auto|cpu|cuda(:\d+)?"  # the device option, checked by resolve()


@dataclass(frozen=True)
class Interval:
    """The allowed values of a numeric option: low..high, each end open or closed."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:  # NaN and +-inf are in none
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open or math.isinf(self.high) else value <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Interval(0, low_open=True), Interval(0), Interval(1)
FRACTION, UNIT = Interval(0, 1, low_open=True), Interval(0, 1)
# allowed range of every numeric option (each element of a list), checked by resolve();
# None stays allowed where the field is Optional
RANGES = {
    "seed": NON_NEGATIVE, "max_nonfinite_steps": AT_LEAST_ONE, "threads": AT_LEAST_ONE,
    **{f"model.{key}": AT_LEAST_ONE for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                                 "head_hidden_dim", "head_out_dim")},
    "model.mlp_ratio": POSITIVE, "model.patch_proj_clip": POSITIVE,
    "moco.m": UNIT, "moco.temperature": POSITIVE,
    "optim.base_lr": POSITIVE, "optim.weight_decay": NON_NEGATIVE, "optim.betas": Interval(0, 1, high_open=True),
    "optim.eps": NON_NEGATIVE, "optim.momentum": Interval(0, 1, high_open=True), "optim.batch_size": AT_LEAST_ONE,
    "optim.epochs": POSITIVE, "optim.warmup_epochs": NON_NEGATIVE, "optim.warmup_steps": NON_NEGATIVE,
    "optim.max_steps": AT_LEAST_ONE,
    "data.crop_min": FRACTION, "data.num_workers": NON_NEGATIVE, "data.synthetic_size": AT_LEAST_ONE,
    "data.synthetic_classes": AT_LEAST_ONE,
    "knn.every": AT_LEAST_ONE, "knn.k": AT_LEAST_ONE, "knn.temperature": POSITIVE, "knn.queue_fraction": FRACTION,
    "knn.val_size": AT_LEAST_ONE, "knn.full_every_epochs": NON_NEGATIVE, "knn.full_every_steps": AT_LEAST_ONE,
    "knn.bank_size": AT_LEAST_ONE, "knn.full_queries": AT_LEAST_ONE,
    "log.every": NON_NEGATIVE, "log.flush_every_steps": AT_LEAST_ONE, "log.flush_every_s": POSITIVE,
    "log.attention_every": NON_NEGATIVE, "log.attention_samples": AT_LEAST_ONE, "max_spike_skips": AT_LEAST_ONE,
    "checkpoint.every_steps": AT_LEAST_ONE, "checkpoint.keep": NON_NEGATIVE,  # 0 keeps all
    "checkpoint.keep_spikes": NON_NEGATIVE,
}


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | vit_small | vit_base | vit_large
    img_size: Optional[int] = None  # None: from preset
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: float = 4.0
    pos_embed: str = "sincos"  # sincos (fixed, MoCo v3 layout) | learned | none
    pool: str = "token"  # token | avg (keeps final LayerNorm) | avg_nonorm
    patch_proj: str = "learned"  # learned | frozen | batchnorm | weightnorm | clip
    patch_proj_clip: float = 1.0  # max L2 norm of the projection's gradient for patch_proj=clip
    qk_norm: bool = False  # LayerNorm on each head's q and k (ViT-22B): bounds the attention logits
    head_hidden_dim: Optional[int] = None  # projector & predictor hidden width
    head_out_dim: Optional[int] = None
    head_bn: bool = True  # BatchNorm in projector/predictor (paper ablation)
    predictor: bool = True  # predictor on/off (paper ablation)


@dataclass
class MocoConfig:
    """The Siamese methods' own hyper-parameters (docs/methods.md), shared where they mean the
    same thing: m / m_cos drive the momentum encoder of mocov3 and byol (logged in
    steps.momentum), temperature the softmax of mocov3's InfoNCE and simclr's NT-Xent."""
    m: float = 0.99  # momentum of the key (mocov3) / target (byol) encoder
    m_cos: bool = True  # cosine schedule of m from `m` to 1 over training, per iteration
    temperature: float = 0.2  # mocov3 and simclr


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lamb | lars (timm.optim)
    base_lr: float = 1.5e-3  # lr = base_lr * global_batch / 256
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # LARS only
    exclude_norm_bias_wd: bool = False  # official code decays everything
    batch_size: int = 128  # global batch over all ranks
    epochs: float = 8.0
    warmup_epochs: float = 1.0
    warmup_steps: Optional[int] = None  # warmup length in steps instead of warmup_epochs
    schedule: str = "cosine"  # cosine (official: warmup, then cosine to 0 at `epochs`) | constant (peak held)
    max_steps: Optional[int] = None  # stop after this many steps (total); schedules still span `epochs`


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # imagefolder | cifar10 | cifar100 | synthetic
    path: str = "data_samples/cifar10_small"  # relative paths also tried against the project root
    train_split: str = "train"
    val_split: str = "val"
    augment: str = "mocov3"  # mocov3 | none (deterministic resize: for equivalence tests)
    crop_min: float = 0.2  # RandomResizedCrop scale (crop_min, 1): 0.2 for 32-px images; official 0.08 (224 px)
    # device: decode once (small splits: into memory, cached under cache_dir), draw each sample's
    # parameters in the workers, augment whole batches with kornia on a GPU (in the workers on a CPU);
    # workers: decode + augment image by image with PIL in the DataLoader workers
    pipeline: str = "device"
    cache_dir: str = "~/.cache/stabilitylab"  # decoded small image folders (data.pipeline=device)
    num_workers: int = 1  # one worker overlaps augmentation with compute even on 2 cores
    skip_bad_images: bool = False  # False: an unreadable image stops the run naming the file
    synthetic_size: int = 512  # images per split for dataset=synthetic
    synthetic_classes: int = 10


@dataclass
class KnnConfig:
    enabled: bool = True
    every: int = 20  # iterations between queue-kNN evaluations
    k: int = 20
    temperature: float = 0.07
    queue_fraction: float = 0.1  # queue size as a fraction of the training set
    val_size: int = 5000  # held-out queries per queue evaluation (capped by the split size)
    full_every_epochs: float = 1.0  # full held-out kNN (fresh bank) every this many epochs; 0 = off
    full_every_steps: Optional[int] = None  # the same in steps (overrides full_every_epochs)
    bank_size: Optional[int] = None  # fresh-bank kNN: a fixed seeded subset of the training split; None = all
    full_queries: Optional[int] = None  # fresh-bank kNN: a fixed seeded subset of the held-out split; None = all
    backend: str = "auto"  # auto | faiss | torch


@dataclass
class LogConfig:
    every: int = 1  # per-layer statistics every this many steps; 0 = none
    per_param: bool = False  # one row per parameter instead of per layer group
    update_norms: bool = True  # keep a copy of the weights to log ||theta_t - theta_{t-1}||
    optim_state: bool = True  # optimizer-state columns in `layers` (adam_freshness, ...: trainer/probes_optim.py)
    attention_every: int = 10  # `attention` table rows every this many steps; 0 = none (and with compile)
    attention_samples: int = 8  # images of each probed batch's first view the attention probe looks at
    spike_detect: bool = True  # online spike detector on each logged step's per-layer grad_l2 (needs every > 0)
    spike_rule: Optional[str] = None  # its analysis.SpikeRule text; None = analysis.DEFAULT_RULE
    flush_every_steps: int = 500
    flush_every_s: float = 60.0
    progress: bool = True  # the progress bar and the spike lines above it


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2  # newest checkpoints kept; 0 keeps all
    keep_spikes: int = 5  # on_spike=checkpoint: newest pre-spike checkpoints kept in RUN_DIR/spikes/; 0 keeps all


@dataclass
class TrainConfig:
    method: str = "mocov3"  # mocov3 | simclr | byol (trainer/methods.py)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU and on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16
    max_nonfinite_steps: int = 20  # consecutive skipped steps before the run stops
    on_spike: str = "log"  # log | checkpoint (the state before the spiking update) | skip (drop that update)
    max_spike_skips: int = 10  # on_spike=skip: consecutive skipped updates before the run stops
    compile: bool = False  # torch.compile the forward (worth it on a GPU; minutes of warm-up on a CPU)
    threads: Optional[int] = None  # torch CPU threads; None: on a CPU the cores data workers leave free
    keep_heap: bool = True  # on a CPU, glibc keeps freed step memory instead of page-faulting it back every step
    flush_denormal: bool = True  # on a CPU, compute subnormal floats as 0 (a collapse makes many: ~7x slower steps on Intel)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


PROBE_PROTOCOLS = ("official", "fast")


@dataclass
class ProbeConfig:
    """A linear probe (`stabilitylab linprobe`, docs/linear_probe.md): its protocol and the
    settings that decide its number; the CLI's defaults are these."""

    protocol: str = "fast"  # official | fast
    batchnorm: bool = True  # BatchNorm1d(affine=False) before the linear layer
    seed: int = 0
    # official protocol (main_lincls.py)
    epochs: int = 90
    batch_size: int = 1024
    base_lr: float = 0.1  # lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    # fast protocol
    l2: float = 1e-4  # penalty (l2 / 2) * ||W||^2 added to the mean cross-entropy
    max_iter: int = 1000  # L-BFGS iterations at most

    def settings(self) -> str:
        """The values that decide the number, for the `settings` column."""
        if self.protocol == "official":
            return (f"epochs={self.epochs} batch={self.batch_size} lr={self.base_lr:g}*batch/256 "
                    f"momentum={self.momentum:g} wd={self.weight_decay:g} cosine "
                    f"bn={str(self.batchnorm).lower()} aug=rrc+flip")
        return f"lbfgs l2={self.l2:g} max_iter={self.max_iter} bn={str(self.batchnorm).lower()}"


def option(cfg: TrainConfig, dotted: str):
    """The value of a dotted option, e.g. option(cfg, "optim.base_lr")."""
    node = cfg
    for key in dotted.split("."):
        node = getattr(node, key)
    return node


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check the string options, fill preset-dependent model fields in place, check every
    numeric option's range (RANGES), return cfg. A bad value raises ValueError naming it."""
    for dotted, allowed in CHOICES.items():
        if (value := option(cfg, dotted)) not in allowed:
            raise ValueError(f"{dotted}={value!r} is not one of: {', '.join(allowed)}")
    if not re.fullmatch(DEVICES, cfg.device):
        raise ValueError(f"device={cfg.device!r} is not one of: auto, cpu, cuda, cuda:N")
    m = cfg.model
    if m.preset not in MODEL_PRESETS:
        raise ValueError(f"model.preset={m.preset!r} is not one of: {', '.join(MODEL_PRESETS)}")
    for key, value in MODEL_PRESETS[m.preset].items():
        if getattr(m, key) is None:
            setattr(m, key, value)
    for dotted, allowed in RANGES.items():
        value = option(cfg, dotted)
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if v not in allowed:
                what = "each value" if isinstance(value, list) else "it"
                raise ValueError(f"{dotted}={value!r} is out of range: {what} must be {allowed}")
    if m.img_size % m.patch_size:
        raise ValueError(f"model.img_size={m.img_size} is not a multiple of model.patch_size={m.patch_size}")
    if m.embed_dim % m.num_heads:
        raise ValueError(f"model.embed_dim={m.embed_dim} is not a multiple of model.num_heads={m.num_heads}")
    if cfg.log.spike_rule is not None:
        from analysis.spikes import SpikeRule  # only when set: reading a config needs no pandas

        try:
            SpikeRule.parse(cfg.log.spike_rule)
        except ValueError as exc:
            raise ValueError(f"log.spike_rule: {exc}") from None
    return cfg


def config_differences(before: dict, after: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, before, after) for every value that differs between two nested dicts."""
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key), after.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_differences(old, new, f"{dotted}.")
        elif old != new:
            changes.append((dotted, old, new))
    return changes
