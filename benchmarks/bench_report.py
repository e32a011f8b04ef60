"""Figure 4 -- `stabilitylab report` on a synthetic run: HTML size and build time; and the
size of a single-run report of a committed run.

    python benchmarks/bench_report.py            # 375,000 steps x 15 layers (target: <= 10 MB, <= 30 s)
    python benchmarks/bench_report.py --quick    # 20,000 steps, under a minute in all

Each figure ends with a `RESULT | figure | measured | goal | status` line. The build time is
wall clock and process CPU time (the machine may be shared: CPU time is the steadier one).

The synthetic run is written with `RunWriter` like a real one: loss, lr and momentum
schedules, per-layer gradient norms with spikes that start in the patch projection and reach
later layers a few steps later, a queue kNN curve every 20 steps with dips after some spikes,
and a val kNN point per epoch. `write_synthetic_run` is also used by the report tests.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stabilitylab.rundir import RunWriter, write_meta  # noqa: E402

STEPS_PER_EPOCH = 1250
CHUNK_STEPS = 25_000
ROOT = Path(__file__).resolve().parents[1]
COMMITTED_RUN = ROOT / "data_samples" / "runs" / "findings" / "batch512_long_lr1e-1" / "batch_size=512_seed0"


def result(figure: str, value: str, goal: str = "", status: str = "") -> None:
    print(f"RESULT | {figure} | {value} | {goal} | {status}", flush=True)


def layer_names(n_layers: int) -> list[str]:
    """patch_embed, blocks.0 ... blocks.{n-4}, norm, projector: n layers in model order."""
    return ["patch_embed"] + [f"blocks.{i}" for i in range(n_layers - 3)] + ["norm", "projector"]


def spike_steps(n_steps: int, seed: int = 0) -> np.ndarray:
    """Steps where the first layer spikes: about one per 10,000 steps, at least 2."""
    rng = np.random.default_rng(seed)
    count = max(2, n_steps // 10_000)
    margin = max(n_steps // 20, 50)
    return np.sort(rng.choice(np.arange(margin, n_steps - margin), count, replace=False))


def _steps_table(step, total, spikes, rng):
    epoch = (step + 1) / STEPS_PER_EPOCH
    warm = max(total // 10, 1)
    lr = np.where(step < warm, 1.5e-4 * (step + 1) / warm,
                  1.5e-4 * 0.5 * (1 + np.cos(np.pi * (step - warm) / max(total - warm, 1))))
    momentum = 1 - 0.01 * 0.5 * (1 + np.cos(np.pi * step / total))
    loss = 2.0 + 2.0 * np.exp(-step / (total / 5)) + 0.05 * rng.standard_normal(len(step))
    for s in spikes:
        after = step >= s
        loss[after] += 0.3 * np.exp(-(step[after] - s) / 300)
    return {"step": step, "epoch": epoch, "lr": lr, "momentum": momentum,
            "loss": loss.astype(np.float32), "grad_norm": np.ones(len(step), np.float32),
            "skipped": np.zeros(len(step), bool)}


def _grad_norms(step, n_layers, spikes, rng):
    """(steps, layers) gradient norms: lognormal noise around a per-layer scale, spikes
    in the first layer at each spike step and in layer i a few steps later."""
    scale = np.logspace(-1, -3, n_layers)
    norms = scale * np.exp(0.15 * rng.standard_normal((len(step), n_layers)))
    lags = np.round(np.linspace(0, 4, n_layers)).astype(int)
    for s in spikes:
        for i, lag in enumerate(lags):
            row = s + lag - step[0]
            if 0 <= row < len(step):
                norms[row, i] *= 60 if i == 0 else 12
    return norms


def _knn_tables(n_steps, spikes, every, rng):
    step = np.arange(every - 1, n_steps, every)
    base = 0.15 + 0.6 * (1 - np.exp(-step / (n_steps / 4)))
    for s in spikes[::2]:  # every other spike makes the accuracy dip
        after = step > s
        base[after] -= 0.08 * np.exp(-(step[after] - s) / max(n_steps / 100, 200))
    queue = base + np.sqrt(base * (1 - base) / 5000) * rng.standard_normal(len(step))
    val_step = np.arange(STEPS_PER_EPOCH - 1, n_steps, STEPS_PER_EPOCH)
    val = np.interp(val_step, step, base) + 0.002 * rng.standard_normal(len(val_step))
    return ({"step": step, "epoch": (step + 1) / STEPS_PER_EPOCH, "source": ["queue"] * len(step),
             "k": np.full(len(step), 20), "top1": queue, "top5": np.minimum(queue + 0.15, 1),
             "bank_size": np.full(len(step), 65536), "n_queries": np.full(len(step), 5000)},
            {"step": val_step, "epoch": (val_step + 1) / STEPS_PER_EPOCH,
             "source": ["val"] * len(val_step), "k": np.full(len(val_step), 20), "top1": val,
             "top5": np.minimum(val + 0.15, 1), "bank_size": np.full(len(val_step), 1_281_167),
             "n_queries": np.full(len(val_step), 50_000)})


def synthetic_config(patch_proj="learned", base_lr=1.5e-4, dataset="imagenet",
                     path="/data/imagenet", preset="vit_base") -> dict:
    return {"model": {"preset": preset, "patch_proj": patch_proj},
            "optim": {"name": "adamw", "base_lr": base_lr, "batch_size": 4096},
            "data": {"dataset": dataset, "path": path}}


def write_synthetic_run(run_dir, n_steps: int, n_layers: int = 15, *, seed: int = 0,
                        status: str = "finished", knn_every: int = 20, config=None) -> Path:
    """Write a synthetic run directory of `n_steps` steps; returns its path."""
    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed)
    write_meta(run_dir, {"status": status, "device": "synthetic", "world_size": 1, "seed": seed,
                         "start_time": "2024-01-01T00:00:00+00:00",
                         **({"end_time": "2024-01-03T06:30:00+00:00"} if status == "finished" else {})})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config or synthetic_config()))
    writer = RunWriter(run_dir)
    spikes = spike_steps(n_steps, seed) if n_steps else np.array([], int)
    names = np.array(layer_names(n_layers))
    for start in range(0, n_steps, CHUNK_STEPS):
        step = np.arange(start, min(start + CHUNK_STEPS, n_steps))
        writer.append("steps", _steps_table(step, n_steps, spikes, rng))
        norms = _grad_norms(step, n_layers, spikes, rng)
        writer.append("layers", {"step": np.repeat(step, n_layers),
                                 "layer": np.tile(names, len(step)),
                                 "grad_l2": norms.ravel().astype(np.float32)})
        writer.flush(step[-1])
    for table in _knn_tables(n_steps, spikes, knn_every, rng) if n_steps else ():
        writer.append("knn", table)
    for s in spikes:
        writer.event(int(s), "spike", "synthetic patch_embed spike")
    writer.close(compact=status == "finished")
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 steps instead of 375,000")
    parser.add_argument("--steps", type=int, help="number of steps (overrides --quick)")
    parser.add_argument("--layers", type=int, default=15)
    parser.add_argument("--keep", metavar="DIR", help="write the run and report here instead of a temp dir")
    args = parser.parse_args(argv)
    n_steps = args.steps or (20_000 if args.quick else 375_000)

    from stabilitylab.report import write_report
    from stabilitylab.run import load_run

    try:
        load = f", load {os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    print(f"figure 4: HTML report -- {platform.processor() or platform.machine()}, {os.cpu_count()} cpus{load}")
    full = not args.quick and not args.steps
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        t0 = time.perf_counter()
        run_dir = write_synthetic_run(root / "synthetic_run", n_steps, args.layers)
        t1, c1 = time.perf_counter(), time.process_time()
        out = write_report([load_run(run_dir)], root / "report.html")
        t2, c2 = time.perf_counter(), time.process_time()
        size_mb = out.stat().st_size / 1e6
        print(f"synthetic run: {n_steps:,} steps x {args.layers} layers, written in {t1 - t0:.1f} s")
        print(f"report: {size_mb:.2f} MB, built in {t2 - t1:.1f} s wall, {c2 - c1:.1f} s CPU "
              "(load + analysis + HTML)")
        figure = f"4 report {n_steps} steps x {args.layers} layers"
        size_ok, time_ok = size_mb <= 10, t2 - t1 <= 30
        result(f"{figure}, size", f"{size_mb:.2f} MB", "<= 10 MB", ("met" if size_ok else "NOT met") if full else "info")
        result(f"{figure}, build time", f"{t2 - t1:.1f} s wall ({c2 - c1:.1f} s CPU)", "<= 30 s",
               ("met" if time_ok else "NOT met") if full else "info")
        single = write_report([load_run(COMMITTED_RUN)], root / "single.html").stat().st_size / 1e6
        result(f"4 single-run report size ({COMMITTED_RUN.parent.name}/{COMMITTED_RUN.name})", f"{single:.2f} MB",
               "<= 2.5 MB", "met" if single <= 2.5 else "NOT met")
        if full:
            return 0 if size_ok and time_ok and single <= 2.5 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
