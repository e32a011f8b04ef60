"""Augmentations, per-sample seeding, the resumable sampler, datasets and bad-image handling."""
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import (BadImageError, ResumableSampler, build_datasets, build_loader,
                          eval_transform, plain_transform)



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
