"""Build data_samples/cifar10_small: a small, deterministic CIFAR-10 subset in ImageFolder layout.

Copies JPEG files byte for byte (no re-encoding) from a CIFAR-10 image folder laid out as
`{train,test}/<class>/NNNN.jpg`: the first `--train-per-class` files (sorted by name) of each
class from `train/` into `OUT/train/<class>/`, and the first `--val-per-class` of each class
from `test/` into `OUT/val/<class>/`. Same source -> same output, so the subset can be rebuilt.

    python data_samples/make_cifar10_small.py            # from the repo root or anywhere
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLITS = {"train": "train", "test": "val"}  # source split -> output split


def copy_subset(source: Path, out: Path, per_class: dict[str, int]) -> int:
    """Copy the first `per_class[split]` images of every class; return the number copied."""
    copied = 0
    for src_split, dst_split in SPLITS.items():
        classes = sorted(p for p in (source / src_split).iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {source / src_split}")
        for class_dir in classes:
            n = per_class[dst_split]
            files = sorted(class_dir.glob("*.jpg"))[:n]
            if len(files) < n:
                raise ValueError(f"{class_dir} has {len(files)} images, need {n}")
            dst = out / dst_split / class_dir.name
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, dst / f.name)
            copied += len(files)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared/datasets/cifar10",
                        help="CIFAR-10 image folder with train/ and test/ (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "data_samples/cifar10_small")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=100)
    args = parser.parse_args(argv)
    if not (args.source / "train").is_dir() or not (args.source / "test").is_dir():
        parser.error(f"{args.source} must contain train/<class>/*.jpg and test/<class>/*.jpg")
    if args.out.exists():
        shutil.rmtree(args.out)  # rebuild from scratch so no stale file survives
    n = copy_subset(args.source, args.out,
                    {"train": args.train_per_class, "val": args.val_per_class})
    print(f"copied {n} images to {args.out}")


if __name__ == "__main__":
    main()
