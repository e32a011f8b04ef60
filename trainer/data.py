"""Data for the MoCo v3 trainer: augmentations, datasets, a resumable sampler and the loader.

Determinism. Every training sample's augmentation draws from its own seed: the sampler yields
`(index, sample_seed)` and `TwoViewDataset` applies the two-view transform under
`torch.random.fork_rng(devices=[])` after seeding the global CPU generator with `sample_seed`
(torchvision v2 transforms draw from it). The seed depends only on (seed, epoch, index), so
the augmented views of a sample are the same whatever the number of workers, the world size or
where a run resumed.

Unreadable images. Loading an image that PIL cannot decode raises `BadImageError` naming the
file. With `data.skip_bad_images=true` the dataset substitutes the next readable index
(index+1, index+2, ... modulo the length) and returns the bad file's path as the last element
of a training sample ('' when the sample was fine), so the training loop, which only sees
collated batches from worker processes, can log one `bad_image` event per path.
"""
from __future__ import annotations

import hashlib
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from tqdm.auto import tqdm

from trainer.config import DataConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_SUBSTITUTES = 64  # consecutive unreadable images tried before giving up in skip mode


# ----------------------------------------------------------------------------- transforms

def blur_params(img_size: int) -> tuple[int, tuple[float, float]]:
    """Gaussian-blur kernel and sigma range scaled to the image size.

    The official recipe blurs 224 px images with sigma in (0.1, 2.0) and (BYOL/SimCLR) a
    kernel of ~10% of the image, 23 px. Here the kernel is the odd integer nearest 10% of
    `img_size` (at least 3) and sigma is scaled by img_size / 224: 23 px and (0.1, 2.0) at
    224, 3 px and (0.014, 0.29) at 32.
    """
    kernel = max(3, round(0.1 * img_size) | 1)
    scale = img_size / 224
    return kernel, (0.1 * scale, 2.0 * scale)


def _to_normalized_tensor() -> list:
    """PIL or uint8 image -> normalized float32 CHW plain tensor."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()]


def mocov3_view(img_size: int, crop_min: float, blur_p: float, solarize_p: float) -> v2.Compose:
    """One branch of the official asymmetric MoCo v3 / BYOL augmentation.

    Like the official code it works on PIL images up to the flip (PIL colour ops are also the
    fastest on small images), so solarization inverts pixels >= 128 as ImageOps.solarize does.
    """
    kernel, sigma = blur_params(img_size)
    ops = [
        v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma)], p=blur_p),
    ]
    if solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + _to_normalized_tensor())


class _EvalResize(torch.nn.Module):
    """Resize the shorter side to img_size*256/224 (standard eval ratio before the centre crop),
    or to img_size for images no larger than img_size so small images keep their whole frame."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, img):
        small = min(v2.functional.get_size(img)) <= self.img_size
        size = self.img_size if small else int(self.img_size * 256 / 224)
        return v2.functional.resize(img, size, antialias=True)


def eval_transform(img_size: int) -> v2.Compose:
    """Deterministic transform for kNN banks and queries."""
    return v2.Compose([_EvalResize(img_size), v2.CenterCrop(img_size),
                       *_to_normalized_tensor()])


def linear_probe_transform(img_size: int) -> v2.Compose:
    """Training images of the official linear probe (main_lincls.py): RandomResizedCrop with
    torchvision's default scale (0.08, 1) and a horizontal flip; nothing else."""
    return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(),
                       *_to_normalized_tensor()])


def plain_transform(img_size: int) -> v2.Compose:
    """Deterministic Resize(img_size) + CenterCrop: both training views with augment=none."""
    return v2.Compose([v2.Resize(img_size, antialias=True), v2.CenterCrop(img_size),
                       *_to_normalized_tensor()])


class TwoViews:
    """Apply two transforms to one image: (view1, view2), the key/query pair of MoCo v3."""

    def __init__(self, first: Callable, second: Callable):
        self.first, self.second = first, second

    def __call__(self, img):
        return self.first(img), self.second(img)


def two_view_transform(augment: str, img_size: int, crop_min: float) -> TwoViews:
    """augment=mocov3: view1 always blurred, never solarized; view2 blurred with p=0.1,
    solarized with p=0.2 (official augmentation1/augmentation2). augment=none: both views are
    the deterministic `plain_transform`."""
    if augment == "mocov3":
        return TwoViews(mocov3_view(img_size, crop_min, blur_p=1.0, solarize_p=0.0),
                        mocov3_view(img_size, crop_min, blur_p=0.1, solarize_p=0.2))
    if augment == "none":
        plain = plain_transform(img_size)
        return TwoViews(plain, plain)
    raise ValueError(f"data.augment={augment!r} is not one of ['mocov3', 'none']")


# ----------------------------------------------------------------------------- sampler

def _seed63(*entropy: int) -> int:
    """A 63-bit seed derived from non-negative integers with numpy's SeedSequence."""
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_seeds(seed: int, epoch: int, n: int) -> np.ndarray:
    """Augmentation seeds of indices 0..n-1 in `epoch`: the first n raw outputs of a PCG64
    stream seeded by SeedSequence([seed, epoch, 1]), shifted to 63 bits. Entry i depends only
    on (seed, epoch, i)."""
    return np.random.PCG64(np.random.SeedSequence([seed, epoch, 1])).random_raw(n) >> np.uint64(1)


class ResumableSampler(Sampler):
    """Per-rank sampler over global batches that yields `(index, sample_seed)` and can resume
    mid-epoch.

    Epoch e: a permutation from a torch.Generator seeded by SeedSequence([seed, e, 0]) (or the
    identity with shuffle=False), cut to a whole number of global batches of
    G = batch_size * world_size (drop_last on the global batch). Global batch t is
    kept[t*G:(t+1)*G]; rank r yields kept[r::world_size], so its t-th local batch is
    kept[t*G + r : (t+1)*G : world_size] and the ranks' batches t together are exactly the
    single-process batch t with batch size G.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if dataset_len < batch_size * world_size:
            raise ValueError(f"dataset of {dataset_len} samples is smaller than one global "
                             f"batch of {batch_size * world_size}")
        self.dataset_len, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (= local batches per rank)."""
        return self.dataset_len // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and seeds; also resets the start batch to 0."""
        self.epoch = epoch
        self.start_batch = 0

    def set_start_batch(self, batch: int) -> None:
        """Skip the first `batch` batches of the current epoch (call after `set_epoch`)."""
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"start batch {batch} is not in [0, {self.batches_per_epoch}]")
        self.start_batch = batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.dataset_len
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed63(self.seed, self.epoch, 0))
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        kept = perm[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = kept[self.rank :: self.world_size][self.start_batch * self.batch_size :]
        seeds = sample_seeds(self.seed, self.epoch, n)
        for index in mine.tolist():
            yield index, int(seeds[index])


# ----------------------------------------------------------------------------- datasets

class BadImageError(RuntimeError):
    """An image file that cannot be decoded. `path` names the file.

    With `reason` empty, `path` is taken as the whole message: that is how a DataLoader worker
    re-raises the error in the main process (one string argument), which keeps the type.
    """

    def __init__(self, path: str, reason: str = ""):
        if reason:
            message = (f"cannot read image {path}: {reason}; fix or remove it, or set "
                       f"data.skip_bad_images=true")
        else:  # a worker's re-raise: the original message is the last line of its traceback
            lines = [line for line in path.splitlines() if "cannot read image " in line]
            message = lines[-1].split("BadImageError: ", 1)[-1] if lines else path
            path = message.removeprefix("cannot read image ").split(": ", 1)[0]
        self.path = path
        super().__init__(message)


def load_rgb(path: str) -> Image.Image:
    """ImageFolder loader: decode to RGB now, so a broken file fails here, naming itself."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e


class SyntheticImages(Dataset):
    """Deterministic random images with class structure, generated per index (no storage).

    Label = index % num_classes. Class c has a mean colour with hue c / num_classes and a
    sinusoidal grating of orientation pi*c/num_classes and 2 + c % 3 cycles per image; each
    sample adds a random grating phase and pixel noise. Class means differ, so kNN on raw or
    learned features beats chance. Returns (RGB PIL image, label), like the image datasets.
    """

    def __init__(self, size: int, num_classes: int, img_size: int, seed: int, split: int):
        self.size, self.num_classes, self.img_size = size, num_classes, img_size
        self.seed, self.split = seed, split
        self.classes = [f"class_{c}" for c in range(num_classes)]
        grid = torch.arange(img_size, dtype=torch.float32) / img_size
        self.yy, self.xx = torch.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        label = index % self.num_classes
        g = torch.Generator().manual_seed(_seed63(self.seed, self.split, index))
        hue = 2 * torch.pi * (label / self.num_classes + torch.arange(3) / 3)
        colour = 0.5 + 0.3 * torch.cos(hue)
        angle = torch.pi * label / self.num_classes
        phase = 2 * torch.pi * torch.rand(1, generator=g)
        wave = torch.sin(2 * torch.pi * (2 + label % 3)
                         * (self.xx * np.cos(angle) + self.yy * np.sin(angle)) + phase)
        noise = torch.randn(3, self.img_size, self.img_size, generator=g)
        img = colour[:, None, None] + 0.2 * wave + 0.1 * noise
        pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(pixels), label


def _load(base: Dataset, index: int, skip_bad_images: bool):
    """base[index] as (image, label, bad_path); in skip mode the next readable index stands in."""
    try:
        return (*base[index], "")
    except BadImageError as e:
        if not skip_bad_images:
            raise
        bad = e.path
    for offset in range(1, min(MAX_SUBSTITUTES, len(base))):
        try:
            return (*base[(index + offset) % len(base)], bad)
        except BadImageError:
            continue
    raise BadImageError(bad, f"it and the next {MAX_SUBSTITUTES - 1} images are all unreadable")


class TwoViewDataset(Dataset):
    """Training set: `ds[(index, sample_seed)]` -> (view1, view2, label, bad_path)."""

    def __init__(self, base: Dataset, transform: TwoViews, skip_bad_images: bool = False):
        self.base, self.transform, self.skip_bad_images = base, transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        img, label, bad = _load(self.base, index, self.skip_bad_images)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)  # CPU only: no lazy CUDA seeding
            view1, view2 = self.transform(img)
        return view1, view2, label, bad


class PlainDataset(Dataset):
    """kNN bank / query set: `ds[index]` -> (image, label), deterministic transform.

    A substituted unreadable image (skip mode) is reported with a warning, not in the sample
    (the training loop logs bad training images as `bad_image` events when it meets them).
    """

    def __init__(self, base: Dataset, transform: Callable, skip_bad_images: bool = False):
        self.base, self.transform, self.skip_bad_images = base, transform, skip_bad_images

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        img, label, bad = _load(self.base, index, self.skip_bad_images)
        if bad:
            warnings.warn(f"unreadable image {bad} replaced by a neighbour (data.skip_bad_images)")
        return self.transform(img), label


@dataclass
class Datasets:
    train: TwoViewDataset  # two augmented views, indexed by (index, sample_seed)
    train_plain: PlainDataset  # the training split with the eval transform (full kNN bank)
    val_plain: PlainDataset  # held-out split with the eval transform (kNN queries)
    num_classes: int
    classes: list[str]


def resolve_data_path(path: str, expected: str) -> Path:
    """`path` as given, else (if relative) under the project root; FileNotFoundError if neither."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (PROJECT_ROOT / p).exists():
        return PROJECT_ROOT / p
    where = str(p) if p.is_absolute() else f"{Path.cwd() / p} or {PROJECT_ROOT / p}"
    raise FileNotFoundError(f"data.path {path!r} not found ({where}); expected {expected}")


def _image_folders(cfg: DataConfig):
    expected = (f"an image folder with {cfg.train_split}/<class>/<image> and "
                f"{cfg.val_split}/<class>/<image>")
    root = resolve_data_path(cfg.path, expected)
    for split in (cfg.train_split, cfg.val_split):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} not found; expected {expected}")
    splits = [datasets.ImageFolder(str(root / split), loader=load_rgb)
              for split in (cfg.train_split, cfg.val_split)]
    if splits[0].classes != splits[1].classes:
        raise ValueError(f"class folders differ between {root / cfg.train_split} and "
                         f"{root / cfg.val_split}: {splits[0].classes} vs {splits[1].classes}")
    return splits


def _cifar(cfg: DataConfig):
    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    archive = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
    expected = f"the torchvision {cfg.dataset} folder {archive}/ inside it"
    root = resolve_data_path(cfg.path, expected)
    try:
        return [cls(str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"{cfg.dataset} not found in {root}: expected {expected} "
                                f"(torchvision.datasets.{cls.__name__}(root, download=True) "
                                f"fetches it)") from e


def build_datasets(data_cfg: DataConfig, img_size: int, seed: int) -> Datasets:
    """Training (two-view) and kNN (plain) datasets for `data_cfg.dataset`.

    imagefolder: `path/train_split` and `path/val_split`. cifar10 / cifar100: torchvision's
    datasets at root `path` (train / test sets; the split names are not used). synthetic:
    `SyntheticImages` of `synthetic_size` images per split, seeded by `seed`.
    """
    if data_cfg.dataset == "imagefolder":
        train, val = _image_folders(data_cfg)
    elif data_cfg.dataset in ("cifar10", "cifar100"):
        train, val = _cifar(data_cfg)
    elif data_cfg.dataset == "synthetic":
        train, val = (SyntheticImages(data_cfg.synthetic_size, data_cfg.synthetic_classes,
                                      img_size, seed, split) for split in (0, 1))
    else:
        raise ValueError(f"data.dataset={data_cfg.dataset!r} is not one of "
                         f"['imagefolder', 'cifar10', 'cifar100', 'synthetic']")
    skip = data_cfg.skip_bad_images
    evaluate = eval_transform(img_size)
    two_views = two_view_transform(data_cfg.augment, img_size, data_cfg.crop_min)
    return Datasets(
        train=TwoViewDataset(train, two_views, skip),
        train_plain=PlainDataset(train, evaluate, skip),
        val_plain=PlainDataset(val, evaluate, skip),
        num_classes=len(train.classes),
        classes=list(train.classes),
    )


def build_loader(dataset: Dataset, sampler: Sampler | None, batch_size: int, num_workers: int,
                 device: str | torch.device) -> DataLoader:
    """DataLoader in `sampler` order (sequential when None), pinned memory for CUDA,
    persistent workers when num_workers > 0. Keeps a last partial batch (a ResumableSampler
    only yields whole batches). Workers ignore Ctrl-C: the training loop stops them."""
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=num_workers > 0, worker_init_fn=_ignore_ctrl_c)


def _ignore_ctrl_c(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the whole process group; the main process then finishes
    its step and checkpoints (Trainer.fit), and may be waiting for a batch from a worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- device pipeline

DECODED_MAX_BYTES = 4 * 2**30  # decode a training split into memory only if it fits in this


@dataclass
class DecodedImages:
    """A split decoded once: uint8 images (N, 3, H, W) of one size, labels (N,), and the
    unreadable files that a neighbour replaced, {index: path} (data.skip_bad_images)."""
    images: torch.Tensor
    labels: torch.Tensor
    bad: dict[int, str]


def _decode_all(base: Dataset, skip_bad_images: bool, what: str) -> DecodedImages | None:
    """Every image of `base` (PIL images) as one uint8 tensor; None if their sizes differ."""
    images, labels, bad = None, torch.empty(len(base), dtype=torch.long), {}
    for i in tqdm(range(len(base)), desc=f"decoding {what}", unit="img", disable=None, leave=False):
        img, label, bad_path = _load(base, i, skip_bad_images)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        if images is None:
            images = torch.empty((len(base), *pixels.shape), dtype=torch.uint8)
        elif pixels.shape != images.shape[1:]:
            return None
        images[i], labels[i] = pixels, label
        if bad_path:
            bad[i] = bad_path
    return DecodedImages(images, labels, bad)


def _folder_key(folder: datasets.ImageFolder) -> str:
    """Identifies an image folder's content: its path and every file's name, label, size and mtime."""
    digest = hashlib.sha256(str(Path(folder.root).resolve()).encode())
    for path, label in folder.samples:
        stat = Path(path).stat()
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _cached_folder(folder: datasets.ImageFolder, skip_bad_images: bool, cache_dir: str) -> DecodedImages | None:
    """The folder decoded, from `cache_dir` when decoded before (same files, sizes and mtimes);
    None when it is too large to hold in memory, its images differ in size or the first one
    cannot be read (the streamed path then names or skips it)."""
    try:
        with Image.open(folder.samples[0][0]) as first:
            width, height = first.size
    except (IndexError, OSError):
        return None
    if len(folder) * 3 * width * height > DECODED_MAX_BYTES:
        return None
    path = Path(cache_dir).expanduser() / f"decoded-{_folder_key(folder)}.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        decoded = DecodedImages(state["images"], state["labels"], dict(state["bad"]))
    else:
        decoded = _decode_all(folder, skip_bad_images, folder.root)
        if decoded is None:
            return None
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"images": decoded.images, "labels": decoded.labels,
                        "bad": sorted(decoded.bad.items())}, partial)
            os.replace(partial, path)  # atomic: concurrent runs never read half a file
        except OSError as e:  # a cache that cannot be written costs a decode next time, nothing more
            warnings.warn(f"cannot write the decoded images to {path} ({e}); set data.cache_dir "
                          f"to a writable folder to decode them only once")
    if decoded.bad and not skip_bad_images:
        raise BadImageError(next(iter(decoded.bad.values())), "unreadable when the split was decoded")
    return decoded


def decode_split(base: Dataset, skip_bad_images: bool, cache_dir: str) -> DecodedImages | None:
    """A training split as uint8 tensors, or None when it must be streamed (large, mixed sizes).

    torchvision CIFAR: its arrays as they are. An image folder: decoded once and cached in
    `cache_dir`. Other datasets of PIL images (synthetic): decoded into memory.
    """
    if isinstance(base, (datasets.CIFAR10, datasets.CIFAR100)):
        return DecodedImages(torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous(),
                             torch.as_tensor(base.targets, dtype=torch.long), {})
    if isinstance(base, datasets.ImageFolder):
        return _cached_folder(base, skip_bad_images, cache_dir)
    return _decode_all(base, skip_bad_images, "training split")


class EncodedFolder(Dataset):
    """An image folder's files undecoded: `ds[i]` -> ((file bytes, (height, width)), label).

    The size comes from the file header (PIL reads no pixels); a file whose header PIL cannot
    read raises BadImageError, so `_load` substitutes neighbours as for decoded images."""

    def __init__(self, folder: datasets.ImageFolder):
        self.samples, self.classes = folder.samples, folder.classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                width, height = img.size
            data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        except Exception as e:
            raise BadImageError(path, f"{type(e).__name__}: {e}") from e
        return (data, (height, width), path), label


def decode_on(datas: list[torch.Tensor], paths: list[str], device: torch.device) -> list[torch.Tensor]:
    """Encoded images -> uint8 (3, h, w) tensors on `device`: one batched decode_jpeg there
    (nvJPEG on CUDA), else image by image (other formats decode on the CPU)."""
    try:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    images = []
    for data, path in zip(datas, paths):
        try:
            images.append(decode_image(data, mode=ImageReadMode.RGB).to(device))
        except RuntimeError as e:
            raise BadImageError(path, f"cannot decode: {e}") from e
    return images


class TwoViewBatches(Dataset):
    """Device pipeline, what the DataLoader workers do: `ds[[(index, seed), ...]]` -> one batch.

    Each sample's parameters of both views are drawn under its seed (as TwoViewDataset draws
    them, so both pipelines give a sample the same crop, jitter, ...). The batch is a dict:
    index, params1, params2, labels, bad (paths, '' when fine) and, for a streamed folder,
    `encoded` (file bytes and paths). With `augment_here` (a CPU training device) the workers
    also make the views, keeping the main process free for the step: `views` = (x1, x2).
    """

    def __init__(self, source: DecodedImages | EncodedFolder, plan, skip_bad_images: bool,
                 augment_here: bool):
        self.source, self.plan = source, plan
        self.skip_bad_images, self.augment_here = skip_bad_images, augment_here

    def __len__(self) -> int:
        return len(self.source.labels) if isinstance(self.source, DecodedImages) else len(self.source)

    def __getitem__(self, items: list[tuple[int, int]]) -> dict:
        decoded = isinstance(self.source, DecodedImages)
        rows, labels, bad, encoded = [], [], [], []
        for index, sample_seed in items:
            if decoded:
                height, width = self.source.images.shape[-2:]
                labels.append(int(self.source.labels[index]))
                bad.append(self.source.bad.get(index, ""))
            else:
                (data, (height, width), path), label, bad_path = _load(self.source, index, self.skip_bad_images)
                encoded.append((data, path))
                labels.append(label)
                bad.append(bad_path)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed)
                rows.append(self.plan.sample(height, width))
        batch = {"index": torch.tensor([index for index, _ in items]),
                 "params1": torch.stack([r[0] for r in rows]), "params2": torch.stack([r[1] for r in rows]),
                 "labels": torch.tensor(labels), "bad": bad}
        if encoded:
            batch["encoded"] = ([d for d, _ in encoded], [p for _, p in encoded])
        if self.augment_here:
            images = self.source.images if decoded else None
            batch["views"] = make_views(batch, self.plan, images, torch.device("cpu"))
            batch.pop("encoded", None)
        return batch


def make_views(batch: dict, plan, images: torch.Tensor | None, device: torch.device):
    """Both views of a TwoViewBatches batch on `device`, from the decoded split `images` (on
    that device) or from the batch's encoded files."""
    if images is not None:
        source = images[batch["index"].to(images.device, non_blocking=True)]
    else:
        source = decode_on(*batch["encoded"], device)
    return plan.apply(source, batch["params1"], batch["params2"])


class DeviceViewLoader:
    """Iterates (view1, view2, labels, bad_paths) batches like the workers pipeline's DataLoader,
    with the views made on the training device (or already made by the workers on a CPU)."""

    def __init__(self, loader: DataLoader, plan, images: torch.Tensor | None, device: torch.device):
        self.loader, self.plan, self.images, self.device = loader, plan, images, device

    def __iter__(self):
        for batch in self.loader:
            views = batch.get("views") or make_views(batch, self.plan, self.images, self.device)
            yield (*views, batch["labels"], batch["bad"])


def build_train_loader(data: Datasets, data_cfg: DataConfig, sampler: ResumableSampler, batch_size: int,
                       device: str | torch.device):
    """The training batches of `data_cfg.pipeline`: the workers DataLoader (`build_loader`), or
    the device pipeline (`DeviceViewLoader`): decoded once, augmented a batch at a time. The
    device pipeline needs kornia; without it the workers pipeline runs, with a warning."""
    from trainer import augment

    device = torch.device(device)
    if data_cfg.pipeline == "device" and augment.kornia is None:
        warnings.warn("data.pipeline=device needs kornia (pip install kornia); using data.pipeline=workers")
    if data_cfg.pipeline == "workers" or augment.kornia is None:
        return build_loader(data.train, sampler, batch_size, data_cfg.num_workers, device)
    plan = augment.TwoViewPlan(data.train.transform)
    base, skip = data.train.base, data.train.skip_bad_images
    decoded = decode_split(base, skip, data_cfg.cache_dir)
    if decoded is None and not isinstance(base, datasets.ImageFolder):
        raise ValueError("data.pipeline=device: the training images differ in size; use data.pipeline=workers")
    source = decoded if decoded is not None else EncodedFolder(base)
    augment_here = device.type == "cpu"
    batches = TwoViewBatches(source, plan, skip, augment_here)
    loader = DataLoader(batches, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last=False),
                        num_workers=data_cfg.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=data_cfg.num_workers > 0, worker_init_fn=_ignore_ctrl_c)
    images = decoded.images.to(device) if decoded is not None and not augment_here else None
    return DeviceViewLoader(loader, plan, images, device)
