"""Figure 1 -- instrumentation overhead: training steps with every per-layer statistic and the
kNN-queue enqueue on, against the same steps with them off, interleaved A/B.

    python benchmarks/bench_overhead.py --quick     # CPU tiny preset, a few pairs (< 1 min)
    python benchmarks/bench_overhead.py             # CPU tiny preset, batch 128, 40 pairs (goal <= 1.03)
    python benchmarks/bench_overhead.py --device cuda --model vit_small --img 224 \\
        --batch 256 --precision bf16                # the GPU figure          (goal <= 1.01)

One `trainer.Trainer`, one model, one fixed random batch already on the device (no data
loading noise). "on" = the product default: `GradientProbe.record` (grad_l2, grad_max_abs per
group), `snapshot_params` + `record_update` (param_l2, update_l2 with `log.update_norms`) every
step, the probe buffer drained (one device->host copy) whenever full, and `KnnMonitor.enqueue`
of the batch features. "off" = `log.every` larger than any step and no kNN monitor: the loop
then only takes the total gradient norm it needs for its finiteness check (and the `steps`
row), which a run cannot switch off. The arms alternate in blocks (AB, BA, AB, ...); each pair
of blocks gives one ratio of mean step times, and the script prints the median ratio with its
interquartile range and a bootstrap 95% CI of the median.

Also the shared helpers of the torch benchmarks (bench_knn.py, bench_throughput.py import
them): configs are built as `trainer.config.TrainConfig` dataclasses directly, so nothing here
needs omegaconf, pandas, pyarrow or plotly (benchmarks/gpu_check.sh relies on that).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.config import TrainConfig, resolve  # noqa: E402

OFF_EVERY = 2**62  # log.every for "off": no step after 0 is a logged step


# ---------------------------------------------------------------------- shared helpers

def add_model_args(parser: argparse.ArgumentParser, batch: int | None = None) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--model", default="tiny", help="model.preset: tiny | vit_small | vit_base")
    parser.add_argument("--img", type=int, help="model.img_size (default: the preset's)")
    parser.add_argument("--patch", type=int, help="model.patch_size (default: the preset's)")
    parser.add_argument("--batch", type=int, default=batch, help="optim.batch_size (default 128)")
    parser.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default 1 on a CPU device: timings stay sane on a "
                             "shared machine; torch's default on CUDA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config field, e.g. --set model.depth=2 (repeatable)")


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def make_config(overrides: dict) -> TrainConfig:
    """A resolved TrainConfig from {"dotted.key": value} (no omegaconf: plain dataclasses)."""
    cfg = TrainConfig()
    for dotted, value in overrides.items():
        *path, key = dotted.split(".")
        node = cfg
        for part in path:
            node = getattr(node, part)
        if not hasattr(node, key):
            raise SystemExit(f"unknown config key {dotted!r}")
        setattr(node, key, value)
    return resolve(cfg)


def config_from_args(args, **extra) -> TrainConfig:
    """The benchmark config: synthetic data (never read here: batches are fixed tensors),
    no progress bar, plus the command-line model options and `extra` overrides."""
    batch = args.batch or 128
    overrides = {
        "seed": 0, "device": args.device, "precision": args.precision,
        "model.preset": args.model, "optim.batch_size": batch,
        # synthetic images are generated lazily, per index: the size only sets the kNN queue
        # (0.1 x train size): 5,000 = the CPU preset's CIFAR sample
        "data.dataset": "synthetic", "data.synthetic_size": max(2 * batch, 5000 if args.model == "tiny" else 512),
        "knn.val_size": 16, "knn.full_every_epochs": 0.0, "log.progress": False,
    }
    if args.img:
        overrides["model.img_size"] = args.img
    if args.patch:
        overrides["model.patch_size"] = args.patch
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        overrides["threads"] = threads
    overrides.update(extra)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _parse_value(value)
    return make_config(overrides)


def build_trainer(cfg: TrainConfig):
    """A Trainer without a writer (nothing is written; the run directory is never created)."""
    from trainer.loop import Trainer

    return Trainer(cfg, Path(tempfile.gettempdir()) / "stabilitylab-bench-unused")


def fixed_batch(trainer, seed: int = 1):
    """Two views + labels of random 'normalised images', already on the training device."""
    cfg = trainer.cfg
    g = torch.Generator().manual_seed(seed)
    shape = (trainer.local_batch, 3, cfg.model.img_size, cfg.model.img_size)
    x1, x2 = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    labels = torch.randint(0, trainer.data.num_classes, (trainer.local_batch,), generator=g)
    return x1.to(trainer.device), x2.to(trainer.device), labels.to(trainer.device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(trainer, batch, n: int) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of each of n `train_step`s (each ends in a host sync).

    The probe buffer is drained when full, inside the timed step, as the loop does at a flush.
    """
    wall, cpu = [], []
    for _ in range(n):
        sync(trainer.device)
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.train_step(*batch)
        trainer.step += 1
        if trainer.probe.full:
            trainer.probe.drain()
        sync(trainer.device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def machine() -> str:
    """One line naming the hardware, torch and the load (the 1-minute load average)."""
    parts = [f"{platform.machine()} {os.cpu_count()} cpus", f"torch {torch.__version__}",
             f"{torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name())
    try:
        parts.append(f"load {os.getloadavg()[0]:.2f}")
    except OSError:
        pass
    return ", ".join(parts)


def describe(cfg: TrainConfig, device) -> str:
    m = cfg.model
    from trainer.loop import pick_precision
    return (f"{m.preset} (dim {m.embed_dim}, depth {m.depth}, {m.img_size}px/{m.patch_size}), "
            f"batch {cfg.optim.batch_size}, {pick_precision(cfg.precision, torch.device(device))}, "
            f"{torch.device(device).type}")


def result(figure: str, value: str, goal: str = "", status: str = "") -> None:
    """The machine-readable figure line (benchmarks/gpu_check.sh tabulates them)."""
    print(f"RESULT | {figure} | {value} | {goal} | {status}", flush=True)


def verdict(ok: bool | None) -> str:
    return "info" if ok is None else ("met" if ok else "NOT met")


def bootstrap_median_ci(values, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(values, size=(n, len(values))), axis=1)
    return tuple(np.quantile(medians, [0.025, 0.975]))


def quick_model(args) -> None:
    """--quick on the CPU tiny preset: narrow the model to smoke-test size (a few seconds)."""
    if args.quick and not args.set and args.model == "tiny" and args.device == "cpu":
        args.set = ["model.depth=2", "model.embed_dim=64", "model.head_hidden_dim=128",
                    "model.head_out_dim=64"]
        args.batch = args.batch or 32


# ---------------------------------------------------------------------- the benchmark

def set_instrumentation(trainer, on: bool, monitor) -> None:
    trainer.cfg.log.every = 1 if on else OFF_EVERY
    trainer.knn = monitor if on else None


def component_times(trainer, batch, repeats: int) -> dict[str, float]:
    """Median seconds of each instrument call alone, on the gradients of one real step."""
    from trainer import distributed as dist_utils

    trainer.train_step(*batch)  # leaves .grad populated
    trainer.step += 1
    probe, monitor = trainer.probe, trainer.knn
    feats = torch.randn(trainer.local_batch, trainer.model.feature_dim, device=trainer.device)
    labels = batch[2]
    calls = {
        "probe.total_grad_norm (also in off)": lambda: probe.total_grad_norm(),
        "probe.record": lambda: probe.record(trainer.step),
        "probe.snapshot_params": probe.snapshot_params,
        "probe.record_update": probe.record_update,
        "knn.enqueue": lambda: monitor.enqueue(dist_utils.concat_all_gather(feats), labels),
    }
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(repeats):
            if probe.full:
                probe.drain()
            sync(trainer.device)
            t0 = time.perf_counter()
            call()
            sync(trainer.device)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    probe.drain()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="few short pairs (< 1 minute)")
    parser.add_argument("--pairs", type=int, help="A/B block pairs (default 40, quick 6)")
    parser.add_argument("--block", type=int, help="steps per block (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 10, quick 3)")
    parser.add_argument("--goal", type=float, help="ratio goal (default 1.03 on CPU, 1.01 on CUDA)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="timing the figure uses: wall clock, or process CPU time (auto: CPU "
                             "time on a CPU device, immune to other processes on a shared machine; "
                             "wall on CUDA). Both are printed.")
    args = parser.parse_args(argv)
    quick_model(args)
    pairs = args.pairs or (6 if args.quick else 40)
    block = args.block or (2 if args.quick else 3)
    warmup = args.warmup or (3 if args.quick else 10)

    cfg = config_from_args(args)
    trainer = build_trainer(cfg)
    device = trainer.device
    goal = args.goal or (1.01 if device.type == "cuda" else 1.03)
    clock = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    batch = fixed_batch(trainer)
    monitor = trainer.knn
    print(f"figure 1: instrumentation overhead -- {describe(cfg, device)}, "
          f"{len(trainer.probe.layer_names)} layer groups, kNN queue {len(monitor.features)}")
    print(f"machine: {machine()}")

    set_instrumentation(trainer, True, monitor)
    timed_steps(trainer, batch, warmup)  # step 0 (always logged) is here, in the "on" arm
    set_instrumentation(trainer, False, monitor)
    timed_steps(trainer, batch, max(1, warmup // 2))

    ratios = {"wall": [], "cpu": []}
    steps = {(on, c): [] for on in (True, False) for c in ratios}
    for i in range(pairs):
        order = (True, False) if i % 2 == 0 else (False, True)
        means = {}
        for on in order:
            set_instrumentation(trainer, on, monitor)
            for c, times in zip(("wall", "cpu"), timed_steps(trainer, batch, block)):
                steps[on, c].extend(times)
                means[on, c] = sum(times) / len(times)
        for c in ratios:
            ratios[c].append(means[True, c] / means[False, c])
    set_instrumentation(trainer, True, monitor)

    print(f"{pairs} pairs x {block} steps per arm, alternating AB/BA")
    summary = {}
    for c in ("wall", "cpu"):
        r = ratios[c]
        median = statistics.median(r)
        q1, q3 = np.quantile(r, [0.25, 0.75])
        lo, hi = bootstrap_median_ci(r)
        summary[c] = (median, q1, q3, lo, hi)
        print(f"{c:4s}: median step on {statistics.median(steps[True, c]) * 1e3:8.2f} ms, "
              f"off {statistics.median(steps[False, c]) * 1e3:8.2f} ms; ratio on/off median "
              f"{median:.4f}, IQR [{q1:.4f}, {q3:.4f}], bootstrap 95% CI [{lo:.4f}, {hi:.4f}]")
    if not args.quick:
        print("each instrument alone (median of 30 calls, wall):")
        for name, seconds in component_times(trainer, batch, 30).items():
            print(f"  {name:38s} {seconds * 1e3:8.3f} ms")
    median, q1, q3, lo, hi = summary[clock]
    result(f"1 overhead ratio on/off ({device.type}, {cfg.model.preset}, b{cfg.optim.batch_size}, {clock} time)",
           f"{median:.3f} (IQR {q1:.3f}-{q3:.3f}, CI {lo:.3f}-{hi:.3f})", f"<= {goal}",
           verdict(None if args.quick else median <= goal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
