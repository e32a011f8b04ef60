"""Augmentations, per-sample seeding, the resumable sampler, datasets, bad-image handling, and
the device pipeline's loader (decoded cache, streamed folders)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from trainer.config import DataConfig
from trainer.data import (BadImageError, ResumableSampler, build_datasets, build_loader,
                          build_train_loader, decode_split, eval_transform, plain_transform)



def synthetic(**overrides):
    cfg = DataConfig(dataset="synthetic", synthetic_size=200, synthetic_classes=10, **overrides)
    return build_datasets(cfg, img_size=32, seed=0)


def image_folder(root: Path, per_class: int = 3, bad: str | None = None) -> Path:
    """A two-class ImageFolder with train/ and val/; `bad` = relative path of a corrupt .jpg."""
    for split in ("train", "val"):
        for c, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 40), colour).save(root / split / c / f"{i}.jpg")
    if bad:
        (root / bad).write_bytes(b"not a jpeg at all")
    return root


def test_two_view_shapes_and_dtypes():
    ds = synthetic()
    view1, view2, label, bad = ds.train[(3, 123)]
    assert view1.shape == view2.shape == (3, 32, 32)
    assert view1.dtype == view2.dtype == torch.float32
    assert type(view1) is torch.Tensor
    assert isinstance(label, int) and bad == ""
    assert not torch.equal(view1, view2)  # asymmetric random views
    img, label = ds.val_plain[4]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and label == 4


def test_views_depend_only_on_sample_seed():
    ds = synthetic()
    torch.manual_seed(1)
    a = ds.train[(5, 42)]
    rng_after = torch.rand(1)
    torch.manual_seed(1)
    b = ds.train[(5, 42)]
    assert torch.rand(1) == rng_after  # the global RNG is untouched (fork_rng)
    c = ds.train[(5, 43)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_augment_none_is_deterministic():
    ds = synthetic(augment="none")
    v1, v2, _, _ = ds.train[(7, 1)]
    w1, w2, _, _ = ds.train[(7, 2)]
    assert torch.equal(v1, v2) and torch.equal(v1, w1) and torch.equal(v1, w2)
    assert torch.equal(v1, ds.train_plain[7][0])  # same as eval for images at img_size


def test_eval_transform_large_and_small_images():
    big = Image.new("RGB", (64, 48))
    assert eval_transform(32)(big).shape == (3, 32, 32)
    small = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(eval_transform(32)(small), plain_transform(32)(small))  # whole frame kept


def test_sampler_epoch_permutation_deterministic():
    s, t = ResumableSampler(103, 5, seed=3), ResumableSampler(103, 5, seed=3)
    assert s.batches_per_epoch == 20 and len(s) == 100
    e0 = list(s)
    assert e0 == list(t)
    assert len({i for i, _ in e0}) == 100 and all(0 <= i < 103 for i, _ in e0)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in e0]
    assert len({seed for _, seed in e0}) == 100


def test_sampler_start_batch_is_tail_of_epoch():
    s = ResumableSampler(103, 5, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start_batch(7)
    assert len(s) == 65 and list(s) == full[35:]
    s.set_epoch(3)
    assert len(s) == 100  # a new epoch starts from batch 0
    with pytest.raises(ValueError):
        s.set_start_batch(21)


def test_sampler_ranks_cover_single_process_global_batches():
    B, world = 4, 2
    single = ResumableSampler(107, B * world, seed=9)
    ranks = [ResumableSampler(107, B, seed=9, rank=r, world_size=world) for r in range(world)]
    for s in (single, *ranks):
        s.set_epoch(5)
    glob = list(single)
    local = [list(s) for s in ranks]
    assert all(s.batches_per_epoch == single.batches_per_epoch == 13 for s in ranks)
    for t in range(13):
        union = local[0][t * B:(t + 1) * B] + local[1][t * B:(t + 1) * B]
        assert sorted(union) == sorted(glob[t * B * world:(t + 1) * B * world])  # same seeds too


def test_loader_batches_independent_of_workers():
    ds = synthetic()
    batches = []
    for workers in (0, 2):
        sampler = ResumableSampler(len(ds.train), 8, seed=1)
        batches.append(next(iter(build_loader(ds.train, sampler, 8, workers, "cpu"))))
    (a1, a2, ay, abad), (b1, b2, by, bbad) = batches
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and torch.equal(ay, by)
    assert list(abad) == list(bbad) == [""] * 8


def test_synthetic_classes_are_separable():
    ds = synthetic()
    x = torch.stack([ds.val_plain[i][0] for i in range(100)]).flatten(1)
    y = torch.tensor([ds.val_plain[i][1] for i in range(100)])
    bank = torch.stack([ds.train_plain[i][0] for i in range(200)]).flatten(1)
    bank_y = torch.tensor([ds.train_plain[i][1] for i in range(200)])
    nearest = torch.cdist(x, bank).argmin(1)
    assert (bank_y[nearest] == y).float().mean() > 0.5  # chance is 0.1
    assert ds.num_classes == 10 and len(ds.classes) == 10


def test_imagefolder_and_relative_path_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default data.path is resolved against the project root
    ds = build_datasets(DataConfig(), img_size=32, seed=0)
    assert ds.num_classes == 10 and len(ds.train) == 5000 and len(ds.val_plain) == 1000
    assert ds.train[(0, 0)][0].shape == (3, 32, 32)


def test_bad_image_error_names_the_file(tmp_path):
    root = image_folder(tmp_path, bad="train/a/1.jpg")
    ds = build_datasets(DataConfig(path=str(root)), img_size=32, seed=0)
    with pytest.raises(BadImageError, match="skip_bad_images") as err:
        ds.train[(1, 0)]
    assert str(root / "train/a/1.jpg") in str(err.value)
    loader = build_loader(ds.train, ResumableSampler(6, 6, seed=0, shuffle=False), 6, 1, "cpu")
    with pytest.raises(BadImageError, match="1.jpg") as err:  # type and file survive a worker
        next(iter(loader))
    assert "\n" not in str(err.value) and err.value.path == str(root / "train/a/1.jpg")


def test_skip_bad_images_substitutes_next_and_reports(tmp_path):
    root = image_folder(tmp_path, bad="train/a/1.jpg")
    ds = build_datasets(DataConfig(path=str(root), skip_bad_images=True), img_size=32, seed=0)
    v1, _, label, bad = ds.train[(1, 5)]
    assert bad == str(root / "train/a/1.jpg")
    assert torch.equal(v1, ds.train[(2, 5)][0]) and label == 0  # the next index, same seed
    assert ds.train[(0, 5)][3] == ""
    with pytest.warns(UserWarning, match="1.jpg"):
        assert torch.equal(ds.train_plain[1][0], ds.train_plain[2][0])


def test_missing_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*expected an image folder"):
        build_datasets(DataConfig(path=str(missing)), img_size=32, seed=0)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_datasets(DataConfig(dataset="cifar10", path=str(tmp_path)), img_size=32, seed=0)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val"):
        build_datasets(DataConfig(path=str(tmp_path)), img_size=32, seed=0)


# ----------------------------------------------------------------------------- device pipeline

kornia = pytest.importorskip("kornia")


def device_loader(ds, cfg: DataConfig, batch=8, workers=0, start_batch=0, seed=1):
    sampler = ResumableSampler(len(ds.train), batch, seed=seed)
    sampler.set_start_batch(start_batch)
    return build_train_loader(ds, dataclasses.replace(cfg, num_workers=workers), sampler, batch, "cpu")


def test_device_pipeline_batches_are_the_worker_pipelines_samples():
    """Same sampler: the same samples, labels and (to float rounding of PIL vs float kernels)
    the same views as the workers pipeline; independent of the worker count; a resumed epoch
    (start batch) continues with the same batches."""
    cfg = DataConfig(dataset="synthetic", synthetic_size=64)
    ds = build_datasets(cfg, img_size=32, seed=0)
    device = list(device_loader(ds, cfg))
    workers = list(device_loader(ds, dataclasses.replace(cfg, pipeline="workers")))
    assert len(device) == len(workers) == 8
    for (d1, d2, dy, dbad), (w1, w2, wy, _) in zip(device, workers):
        assert d1.shape == d2.shape == (8, 3, 32, 32) and d1.dtype == torch.float32
        assert torch.equal(dy, wy) and list(dbad) == [""] * 8
        assert (d1 - w1).abs().mean() < 0.05 and (d2 - w2).abs().mean() < 0.05  # normalized units
        assert (d1 - w1.roll(1, 0)).abs().mean() > 0.3  # another sample's view is far
    in_a_worker = list(device_loader(ds, cfg, workers=1))
    resumed = list(device_loader(ds, cfg, start_batch=5))
    for a, b in zip(device, in_a_worker):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(device[5:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_cifar_arrays_are_used_as_they_are(monkeypatch):
    class FakeCifar(datasets.CIFAR10):
        def __init__(self):
            self.data = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
            self.targets = list(range(10))

    decoded = decode_split(FakeCifar(), skip_bad_images=False, cache_dir="/nonexistent")
    assert decoded.images.shape == (10, 3, 32, 32) and decoded.labels.tolist() == list(range(10))
    assert torch.equal(decoded.images[3].permute(1, 2, 0), torch.from_numpy(FakeCifar().data[3]))


def test_image_folder_is_decoded_once_into_the_cache(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data", per_class=4)
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"))
    ds = build_datasets(cfg, img_size=32, seed=0)
    first = next(iter(device_loader(ds, cfg)))
    cached = list((tmp_path / "cache").glob("decoded-*.pt"))
    assert len(cached) == 1
    state = torch.load(cached[0], weights_only=True)
    assert state["images"].shape == (8, 3, 40, 40) and state["images"].dtype == torch.uint8
    red = state["images"][state["labels"] == 0].float().mean((0, 2, 3))
    assert red[0] > 150 and red[2] < 80  # class a is red, decoded as RGB

    import trainer.data as data_module
    monkeypatch.setattr(data_module, "_decode_all", lambda *a: pytest.fail("decoded again"))
    again = next(iter(device_loader(build_datasets(cfg, img_size=32, seed=0), cfg)))
    assert torch.equal(first[0], again[0])
    monkeypatch.undo()
    Image.new("RGB", (40, 40), (0, 200, 0)).save(root / "train/a/0.jpg")  # the folder changed
    build_train_loader(build_datasets(cfg, img_size=32, seed=0), cfg, ResumableSampler(8, 8, seed=0), 8, "cpu")
    assert len(list((tmp_path / "cache").glob("decoded-*.pt"))) == 2


def test_folder_of_mixed_sizes_is_streamed_and_decoded_per_batch(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c, size in (("a", (64, 48)), ("b", (37, 90))):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", size, (60 * i, 100, 30)).save(root / split / c / f"{i}.jpg")
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"))
    ds = build_datasets(cfg, img_size=32, seed=0)
    loader = device_loader(ds, cfg)
    assert not list((tmp_path / "cache").glob("*.pt"))
    x1, x2, labels, bad = next(iter(loader))
    assert x1.shape == x2.shape == (8, 3, 32, 32) and sorted(labels.tolist()) == [0] * 4 + [1] * 4
    w1, _, wy, _ = next(iter(device_loader(ds, dataclasses.replace(cfg, pipeline="workers"))))
    assert torch.equal(labels, wy) and (x1 - w1).abs().mean() < 0.05


@pytest.mark.parametrize("same_size", [True, False])
def test_device_pipeline_bad_images(tmp_path, same_size):
    """Decoded (one size, cached) and streamed folders alike: an unreadable file stops the
    loader naming it; with skip_bad_images its neighbour stands in and the path is reported."""
    root = image_folder(tmp_path / "data", bad="train/a/1.jpg")
    if not same_size:
        Image.new("RGB", (50, 30), (10, 10, 10)).save(root / "train/b/0.jpg")
    cfg = DataConfig(path=str(root), cache_dir=str(tmp_path / "cache"))
    sampler = ResumableSampler(6, 6, seed=0, shuffle=False)
    with pytest.raises(BadImageError, match="1.jpg"):
        next(iter(build_train_loader(build_datasets(cfg, 32, 0), cfg, sampler, 6, "cpu")))
    skip = dataclasses.replace(cfg, skip_bad_images=True)
    x1, _, labels, bad = next(iter(build_train_loader(build_datasets(skip, 32, 0), skip, sampler, 6, "cpu")))
    assert list(bad) == ["", str(root / "train/a/1.jpg"), "", "", "", ""]
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_device_pipeline_without_kornia_runs_the_workers_pipeline(monkeypatch):
    import trainer.augment as augment

    monkeypatch.setattr(augment, "kornia", None)
    ds = synthetic()
    with pytest.warns(UserWarning, match="pip install kornia"):
        loader = build_train_loader(ds, DataConfig(dataset="synthetic"), ResumableSampler(200, 8, seed=0), 8, "cpu")
    assert isinstance(loader, torch.utils.data.DataLoader) and loader.dataset is ds.train
