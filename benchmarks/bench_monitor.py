"""Figure 7 -- `stabilitylab.Monitor` overhead in a plain PyTorch loop: supervised steps of a
timm ViT (the MoCo preset's backbone) with `after_backward` + `after_step` every step,
against the same steps without them, interleaved A/B.

    python benchmarks/bench_monitor.py --quick    # CPU, narrow model, a few pairs (< 1 min)
    python benchmarks/bench_monitor.py            # CPU tiny preset backbone, batch 128, 40 pairs (goal <= 1.03)
    python benchmarks/bench_monitor.py --device cuda --model vit_small --img 224 --batch 256 \\
        --precision bf16                          # the GPU figure (no goal set)

One model, one AdamW optimizer, one fixed random batch on the device, clip_grad_norm_(1.0)
in both arms. "on" = the Monitor's defaults (every=1, update_norms=True: grad_l2 and
grad_max_abs per group, a snapshot of the weights, param_l2 and update_l2), writing a real
run directory in a temporary folder (its flushes fall inside the timed steps, as in a run).
"off" = the bare loop. The arms alternate in blocks (AB, BA, ...); each pair of blocks gives
one ratio of mean step times; the figure is the median ratio with its IQR and a bootstrap
95% CI, in process CPU time on a CPU device (immune to neighbours on a shared machine) and
wall time on CUDA. Shared helpers come from bench_overhead.py.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench_overhead import add_model_args, bootstrap_median_ci, machine, result, sync, verdict  # noqa: E402
from trainer.config import MODEL_PRESETS  # noqa: E402


def build(args):
    preset = dict(MODEL_PRESETS[args.model])
    img, patch = args.img or preset["img_size"], args.patch or preset["patch_size"]
    dims = dict(embed_dim=preset["embed_dim"], depth=preset["depth"], num_heads=preset["num_heads"])
    if args.quick and args.model == "tiny" and args.device == "cpu":
        dims = dict(embed_dim=64, depth=2, num_heads=4)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch,
                              num_classes=10, **dims).to(args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, img, img, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    return model, x, y, f"ViT (dim {dims['embed_dim']}, depth {dims['depth']}, {img}px/{patch})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, batch=128)
    parser.add_argument("--quick", action="store_true", help="narrow model, few short pairs (< 1 minute)")
    parser.add_argument("--pairs", type=int, help="A/B block pairs (default 40, quick 6)")
    parser.add_argument("--block", type=int, help="steps per block (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 10, quick 3)")
    parser.add_argument("--goal", type=float, default=1.03, help="ratio goal on the CPU (default 1.03)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch = min(args.batch, 32)
    pairs = args.pairs or (6 if args.quick else 40)
    block = args.block or (2 if args.quick else 3)
    warmup = args.warmup or (3 if args.quick else 10)
    device = torch.device(args.device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    clock = "wall" if device.type == "cuda" else "cpu"
    precision = {"auto": "bf16" if device.type == "cuda" else "fp32"}.get(args.precision, args.precision)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    import stabilitylab as sl

    model, x, y, described = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tmp = tempfile.TemporaryDirectory()
    monitor = sl.Monitor(model, optimizer, Path(tmp.name) / "run")
    step = 0

    def steps(on: bool, n: int) -> tuple[list[float], list[float]]:
        nonlocal step
        wall, cpu = [], []
        for _ in range(n):
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            with autocast:
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if on:
                monitor.after_backward(step, loss=loss)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if on:
                monitor.after_step()
            sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            step += 1
        return wall, cpu

    print(f"figure 7: Monitor overhead in a plain loop -- {described}, batch {args.batch}, {precision}, "
          f"{device.type}, {len(monitor.probe.layer_names)} layer groups")
    print(f"machine: {machine()}")
    steps(True, warmup)
    steps(False, max(1, warmup // 2))
    ratios = {"wall": [], "cpu": []}
    times = {(on, c): [] for on in (True, False) for c in ratios}
    for i in range(pairs):
        means = {}
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            for c, measured in zip(("wall", "cpu"), steps(on, block)):
                times[on, c].extend(measured)
                means[on, c] = sum(measured) / len(measured)
        for c in ratios:
            ratios[c].append(means[True, c] / means[False, c])
    monitor.close()
    tmp.cleanup()

    print(f"{pairs} pairs x {block} steps per arm, alternating AB/BA")
    summary = {}
    for c in ("wall", "cpu"):
        r = ratios[c]
        q1, q3 = np.quantile(r, [0.25, 0.75])
        lo, hi = bootstrap_median_ci(r)
        summary[c] = (statistics.median(r), q1, q3, lo, hi)
        print(f"{c:4s}: median step on {statistics.median(times[True, c]) * 1e3:8.2f} ms, off "
              f"{statistics.median(times[False, c]) * 1e3:8.2f} ms; ratio on/off median {summary[c][0]:.4f}, "
              f"IQR [{q1:.4f}, {q3:.4f}], bootstrap 95% CI [{lo:.4f}, {hi:.4f}]")
    median, q1, q3, lo, hi = summary[clock]
    goal = args.goal if device.type == "cpu" else None
    result(f"7 Monitor overhead on/off ({device.type}, {args.model} ViT, b{args.batch}, {clock} time)",
           f"{median:.3f} (IQR {q1:.3f}-{q3:.3f}, CI {lo:.3f}-{hi:.3f})", f"<= {goal}" if goal else "",
           verdict(None if args.quick or goal is None else median <= goal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
