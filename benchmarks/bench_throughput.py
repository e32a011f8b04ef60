"""Figure 6 -- training throughput in images/s (one image = its two views): stabilitylab's step
against an official-style step, end to end against a fixed batch, and the input pipelines.

    python benchmarks/bench_throughput.py --quick       # narrowed tiny model, a few steps (< 1 min)
    python benchmarks/bench_throughput.py               # CPU preset: the figures below (~3 min)
    python benchmarks/bench_throughput.py --device cuda --model vit_small --img 224 \\
        --batch 256 --compile both --pipeline both --jpegs 1024 \\
        --set data.num_workers=6                        # ViT-S/16 on one GPU

Every figure is measured in this one run, its arms alternating in blocks (AB, BA, ...); each
pair of blocks gives one ratio and the script prints the median with its interquartile range.

- ours / reference (goal >= 1.3 on the CPU preset shape, >= 1.5 for ViT-S/16 batch 256 on a
  GPU): one fixed random batch on the device; "ours" is `Trainer.train_step` as a run does it
  by default, instruments included (per-layer norms every step, kNN enqueue), in the
  configured precision (auto: bf16 on GPUs and bf16 CPUs); "reference" is
  benchmarks/reference_step.py (two views in separate calls, Python-loop momentum update,
  plain AdamW, `loss.item()`, no compile; fp16 autocast on CUDA, fp32 on a CPU, as the
  official code runs there) on the same weights. `--compile on|both` adds compiled arms and
  reports the compile warm-up (the first steps) and the number of compiled graphs.
- end to end / fixed batch (goal >= 0.9): the same kind of trainer fed by its real loader
  (`data.pipeline`; the CPU preset's CIFAR sample, or with `--jpegs N` a generated folder of N
  JPEGs of ImageNet-like sizes) against one of those batches held fixed. Each end-to-end block
  first trains, untimed, on twice as many batches as the loader prefetches (2 per worker),
  so it measures the steady state: a worker slower than the step has run dry by then, and a
  faster one has caught up again. On CUDA the figure is wall clock. On a CPU the workers share the
  cores with the step, and on a shared machine with everybody else, so the wall ratio there
  measures the neighbours as much as the pipeline: the figure is the main process's CPU time
  per step (what fetching and finishing batches costs the training thread) with the
  condition that each worker needs no more CPU time per step than the step itself (then, on
  a core of its own, it keeps up); the workers' CPU time (from /proc) and the wall ratio are
  printed next to it.
- pipeline alone: images/s of each pipeline's batches with no training, wall and per
  CPU-second of the main process and workers together.

On a CPU device both clocks are printed: wall (this machine now, other processes included) and
process CPU time (what the benchmark's own threads needed); the ours / reference figure uses
CPU time there, wall on CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_overhead import (add_model_args, build_trainer, config_from_args, describe,  # noqa: E402
                            fixed_batch, machine, quick_model, result, sync, verdict)
from reference_step import ReferenceStep  # noqa: E402


def timed(step, n: int, device) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of each of n calls of `step()` (each ends with a device sync)."""
    wall, cpu = [], []
    for _ in range(n):
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def trainer_step(trainer, batches):
    """One `train_step` on the next batch of `batches`, as Trainer.fit does it."""
    def step():
        x1, x2, labels, _ = next(batches)
        trainer.train_step(x1, x2, labels)
        trainer.step += 1
        if trainer.probe.full:
            trainer.probe.drain()
    return step


def alternate(arms: dict, rounds: int, block: int, device, before_block=None) -> dict:
    """Per-step (wall, cpu) times of each arm over `rounds` rounds of one block per arm, the
    order reversed every other round; `before_block(name)` runs untimed before a block."""
    times = {name: ([], []) for name in arms}
    blocks = {name: [] for name in arms}  # (mean wall, mean cpu) per block
    names = list(arms)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            if before_block:
                before_block(name)
            wall, cpu = timed(arms[name], block, device)
            times[name][0].extend(wall)
            times[name][1].extend(cpu)
            blocks[name].append((statistics.fmean(wall), statistics.fmean(cpu)))
    return {"times": times, "blocks": blocks}


class Counted:
    """An endless iterator over a loader's batches that counts them and reads its DataLoader
    workers' CPU time (user + system, from /proc; 0 without /proc)."""

    def __init__(self, loader):
        self.dataloader = getattr(loader, "loader", loader)  # DeviceViewLoader wraps a DataLoader
        self.batches = self._endless(loader)
        self.count = 0

    @staticmethod
    def _endless(loader):
        while True:
            yield from loader

    def __next__(self):
        self.count += 1
        return next(self.batches)

    def worker_cpu_seconds(self) -> float:
        import os

        iterator = self.dataloader._iterator  # persistent workers live on the iterator (private)
        total = 0
        for worker in getattr(iterator, "_workers", []):
            try:
                fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # stat fields 14, 15: utime, stime
        return total / os.sysconf("SC_CLK_TCK")


def ratio_summary(blocks: dict, numerator: str, denominator: str, clock: int) -> tuple[float, float, float]:
    """Median and IQR of per-round throughput ratios numerator / denominator
    (= denominator's step time / numerator's step time)."""
    ratios = [d[clock] / n[clock] for n, d in zip(blocks[numerator], blocks[denominator])]
    q1, q3 = np.quantile(ratios, [0.25, 0.75])
    return statistics.median(ratios), q1, q3


def images_per_s(times: list[float], batch: int) -> float:
    return batch / statistics.median(times)


# ---------------------------------------------------------------------- ours vs reference

def ours_vs_reference(args, compile_modes: list[bool], rounds: int, block: int, warmup: int) -> None:
    trainers = {}
    warmups = {}
    for compile_ in compile_modes:
        cfg = config_from_args(args, compile=compile_)
        trainer = build_trainer(cfg)
        batch = fixed_batch(trainer)
        batches = itertools.repeat((*batch, None))
        name = "ours compiled" if compile_ else "ours"
        counters_before = _compiled_graphs()
        wall, _ = timed(trainer_step(trainer, batches), warmup, trainer.device)  # compiles here
        warmups[name] = (sum(wall), _compiled_graphs() - counters_before)
        trainers[name] = (trainer, batches)
    first, _ = next(iter(trainers.values()))
    cfg, device, b = first.cfg, first.device, first.local_batch
    reference = ReferenceStep(first.model, lr=first.peak_lr, weight_decay=cfg.optim.weight_decay, device=device)
    x1, x2, _ = fixed_batch(first)
    timed(lambda: reference(x1, x2, cfg.moco.m, first.peak_lr), max(1, warmup // 2), device)

    print(f"figure 6: training throughput -- {describe(cfg, device)}")
    print(f"machine: {machine()}")
    arms = {name: trainer_step(trainer, batches) for name, (trainer, batches) in trainers.items()}
    arms["reference"] = lambda: reference(x1, x2, cfg.moco.m, first.peak_lr)
    measured = alternate(arms, rounds, block, device)
    cuda = device.type == "cuda"
    clock, clock_name = (0, "wall") if cuda else (1, "cpu time")
    print(f"{rounds} rounds x {block} steps per arm, alternating")
    for name, (wall, cpu) in measured["times"].items():
        line = f"  {name:14s}: {images_per_s(wall, b):8,.1f} images/s (wall)"
        if not cuda:
            line += f", {images_per_s(cpu, b):8,.1f} images/s per CPU-second"
        if name in warmups:
            seconds, graphs = warmups[name]
            line += f"; first {warmup} steps {seconds:.1f} s"
            if name == "ours compiled":
                line += f" (compile warm-up), {graphs} compiled graph(s)"
        print(line)
    threads = torch.get_num_threads()
    shape = f"{device.type}, {cfg.model.preset}, b{b}, {first.precision}, {threads} thr, {clock_name}"
    goal = 1.5 if cuda else 1.3
    for name in trainers:
        median, q1, q3 = ratio_summary(measured["blocks"], name, "reference", clock)
        ours = images_per_s(measured["times"][name][clock], b)
        ref = images_per_s(measured["times"]["reference"][clock], b)
        print(f"{name} / reference: x{median:.2f} (IQR {q1:.2f}-{q3:.2f})")
        result(f"6 {name} / reference ({shape})",
               f"x{median:.2f} (IQR {q1:.2f}-{q3:.2f}); {ours:,.0f} vs {ref:,.0f} img/s", f">= {goal}",
               verdict(None if args.quick else median >= goal))
    if "ours compiled" in warmups:
        seconds, graphs = warmups["ours compiled"]
        result(f"6 torch.compile warm-up ({device.type}, {cfg.model.preset}, b{b})",
               f"{seconds:.0f} s for the first {warmup} steps, {graphs} graph(s)", "", "info")
        if "ours" in trainers:
            median, q1, q3 = ratio_summary(measured["blocks"], "ours compiled", "ours", clock)
            result(f"6 torch.compile / eager ({shape})", f"x{median:.2f} (IQR {q1:.2f}-{q3:.2f})", "", "info")


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


# ---------------------------------------------------------------------- end to end

def write_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """n smooth random JPEGs of ImageNet-like sizes (shorter side 300-500 px, aspect 3:4 to 4:3)
    in ImageFolder layout (train/ with 10 classes, val/ with a tenth as many)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(10, n // 10))):
        for i in range(count):
            short = int(rng.integers(300, 501))
            long = int(short * rng.uniform(1.0, 4 / 3))
            h, w = (short, long) if rng.random() < 0.5 else (long, short)
            small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
            folder = root / split / f"class_{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def machine_load() -> float:
    import os

    return os.getloadavg()[0]


def end_to_end(args, pipelines: list[str], rounds: int, block: int, warmup: int, data_path: str | None) -> None:
    from trainer.data import build_train_loader

    extra = {"data.dataset": "imagefolder", "knn.enabled": True}
    if data_path:
        extra["data.path"] = data_path
    else:
        extra["data.path"] = "data_samples/cifar10_small"
    cfg = config_from_args(args, **extra)
    trainer = build_trainer(cfg)
    device, b = trainer.device, trainer.local_batch
    loaders = {}
    for pipeline in pipelines:
        data_cfg = dataclasses.replace(cfg.data, pipeline=pipeline)
        loaders[pipeline] = (trainer.loader if pipeline == cfg.data.pipeline
                             else build_train_loader(trainer.data, data_cfg, trainer.sampler, b, device))
    batches = {p: Counted(loader) for p, loader in loaders.items()}
    x1, x2, labels, _ = next(batches[pipelines[0]])
    fixed = itertools.repeat((x1.to(device), x2.to(device), labels, None))
    arms = {"fixed": trainer_step(trainer, fixed)}
    arms.update({p: trainer_step(trainer, batches[p]) for p in pipelines})
    for arm in arms.values():
        timed(arm, warmup, device)

    prefetched = 2 * max(1, cfg.data.num_workers)  # DataLoader prefetch_factor 2

    def settle(name):
        """Untimed steps on the batches prefetched while the other arm ran, twice their number:
        a worker slower than the step has then run dry, a faster one is ahead again."""
        if name != "fixed":
            timed(arms[name], 2 * prefetched, device)

    before = {p: (c.worker_cpu_seconds(), c.count) for p, c in batches.items()}
    measured = alternate(arms, rounds, block, device, before_block=settle)
    worker_cpu = {p: (c.worker_cpu_seconds() - before[p][0]) / (c.count - before[p][1])
                  for p, c in batches.items()}  # per batch the workers made (untimed ones too)
    source = f"{len(trainer.data.train):,} images from {cfg.data.path}"
    workers = cfg.data.num_workers
    print(f"\nend to end: {describe(cfg, device)}, {source}, {workers} worker(s)")
    print(f"machine: {machine()}")
    for name, (wall, cpu) in measured["times"].items():
        print(f"  {name:8s}: {images_per_s(wall, b):8,.1f} images/s (wall), "
              f"{images_per_s(cpu, b):8,.1f} per main-process CPU-second"
              + (f"; workers {worker_cpu[name] * 1e3:,.0f} CPU-ms per batch" if name in worker_cpu else ""))
    cuda = device.type == "cuda"
    for pipeline in pipelines:
        wall = ratio_summary(measured["blocks"], pipeline, "fixed", clock=0)
        cpu = ratio_summary(measured["blocks"], pipeline, "fixed", clock=1)
        step_cpu = statistics.median(measured["times"][pipeline][1])
        share = worker_cpu[pipeline] / max(1, workers) / step_cpu  # per worker, of the step's CPU time
        keeps_up = share <= 1  # each worker on a core of its own
        print(f"{pipeline} pipeline, end to end / fixed batch: x{wall[0]:.2f} wall (IQR {wall[1]:.2f}-"
              f"{wall[2]:.2f}), x{cpu[0]:.2f} main-process CPU time (IQR {cpu[1]:.2f}-{cpu[2]:.2f}); each "
              f"worker needs {share:.2f} x the step's CPU time per batch")
        e2e = images_per_s(measured["times"][pipeline][0], b)
        if cuda:
            figure, value, ok = "wall", f"x{wall[0]:.2f} (IQR {wall[1]:.2f}-{wall[2]:.2f}); {e2e:,.0f} img/s", wall[0] >= 0.9
        else:  # on a shared CPU the wall ratio measures the neighbours; see the module docstring
            figure = "main-process CPU time, workers on cores of their own"
            value = (f"x{cpu[0]:.2f} (IQR {cpu[1]:.2f}-{cpu[2]:.2f}); a worker needs {share:.2f} x the "
                     f"step's CPU; wall x{wall[0]:.2f} at load {machine_load():.0f}")
            ok = cpu[0] >= 0.9 and keeps_up
        result(f"6 end to end / fixed batch ({device.type}, {cfg.model.preset}, b{b}, {pipeline} pipeline, "
               f"{workers} worker(s), {figure})", value, ">= 0.9", verdict(None if args.quick else ok))

    for pipeline, it in batches.items():
        next(it)
        sync(device)
        c0, w0, t0 = time.process_time(), it.worker_cpu_seconds(), time.perf_counter()
        n = max(3, rounds * block // 2)
        for _ in range(n):
            next(it)
        sync(device)
        rate = n * b / (time.perf_counter() - t0)
        cpu_rate = n * b / max(1e-9, time.process_time() - c0 + it.worker_cpu_seconds() - w0)
        print(f"{pipeline} pipeline alone: {rate:,.0f} images/s (both views, wall), "
              f"{cpu_rate:,.0f} per CPU-second (main process and workers)")
        result(f"6 pipeline alone ({device.type}, {pipeline}, b{b}, {workers} worker(s))",
               f"{rate:,.0f} img/s wall, {cpu_rate:,.0f} per CPU-s", "", "info")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="narrowed tiny model, few steps (< 1 minute)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per figure (default 12, quick 2)")
    parser.add_argument("--block", type=int, help="steps per arm and round (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed first steps per arm (default 3, quick 1; "
                                                   "10 when compiling)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile arms (cfg compile=true): off, on, or both eager and compiled")
    parser.add_argument("--parts", default="step,pipeline",
                        help="figures to measure: step (ours / reference, compile), pipeline (end to "
                             "end / fixed batch, pipeline alone); default both")
    parser.add_argument("--pipeline", choices=("device", "workers", "both"), default="device",
                        help="input pipeline(s) of the end-to-end figures (default device)")
    parser.add_argument("--jpegs", type=int, default=0,
                        help="end to end on N generated JPEGs of ImageNet-like sizes instead of the "
                             "CIFAR sample (use with --img 224)")
    args = parser.parse_args(argv)
    quick_model(args)
    rounds = args.rounds or (2 if args.quick else 12)
    block = args.block or (2 if args.quick else 3)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    warmup = args.warmup or (10 if True in modes else 1 if args.quick else 3)
    parts = set(args.parts.split(","))
    if parts - {"step", "pipeline"}:
        parser.error(f"--parts takes step and/or pipeline, not {args.parts!r}")
    if "step" in parts:
        ours_vs_reference(args, modes, rounds, block, warmup)
    if "pipeline" in parts:
        pipelines = ["device", "workers"] if args.pipeline == "both" else [args.pipeline]
        with tempfile.TemporaryDirectory() as tmp:
            data_path = str(write_jpegs(Path(tmp), args.jpegs)) if args.jpegs else None
            end_to_end(args, pipelines, rounds, block, args.warmup or (1 if args.quick else 3), data_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
