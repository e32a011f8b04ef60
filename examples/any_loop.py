"""stabilitylab's instruments in a plain PyTorch training loop (no stabilitylab trainer).

A small timm ViT learns scikit-learn's 8x8 handwritten digits (shipped with scikit-learn,
nothing is downloaded) for a few epochs on the CPU, in well under a minute; `sl.Monitor`
writes per-layer gradient / weight / update norms and the held-out accuracy curve to a run
directory, which the usual commands read:

    python examples/any_loop.py --out runs/digits
    stabilitylab report runs/digits          # or: stabilitylab analyze runs/digits
"""
from __future__ import annotations

import argparse
import math

import timm
import torch
from sklearn.datasets import load_digits
from torch import nn

import stabilitylab as sl


def digits(seed: int):
    """(train x, train y, val x, val y): 8x8 grey digits as 3-channel images in [-1, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).div(8).sub(1).unsqueeze(1).expand(-1, 3, -1, -1)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = order[300:], order[:300]
    return x[train], y[train], x[val], y[val]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    try:
        return (model(x).argmax(1) == y).float().mean().item()
    finally:
        model.train()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/any_loop", help="run directory (must not exist)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y, val_x, val_y = digits(args.seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2,
                              embed_dim=64, depth=4, num_heads=4, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(y) // args.batch
    total = args.epochs * steps_per_epoch
    warmup = steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, total) / total)))

    with sl.Monitor(model, optimizer, args.out, config=vars(args), batch_size=args.batch) as monitor:
        step = 0
        for epoch in range(args.epochs):
            order = torch.randperm(len(y))
            for i in range(steps_per_epoch):
                batch = order[i * args.batch:(i + 1) * args.batch]
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                monitor.after_backward(step, loss=loss)  # per-group gradient norms, before clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                monitor.after_step(lr=scheduler.get_last_lr()[0], epoch=(step + 1) / steps_per_epoch)
                scheduler.step()
                if step % 5 == 4:  # any accuracy in 0-1 becomes a dip-checked curve
                    monitor.log_knn(step, top1=accuracy(model, val_x, val_y), n_queries=len(val_y),
                                    source="val")
                step += 1
    print(f"{step} steps, held-out accuracy {accuracy(model, val_x, val_y):.1%}")
    print(f"run directory: {args.out}")
    print(f"next: stabilitylab report {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
