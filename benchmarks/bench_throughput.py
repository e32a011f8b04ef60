"""Figure 6 -- training throughput in images/s (one image = its two views), instrumented as a
run is by default (per-layer norms every step, kNN queue enqueue).

    python benchmarks/bench_throughput.py --quick       # narrowed tiny model (< 1 min)
    python benchmarks/bench_throughput.py               # CPU preset (tiny ViT, batch 128) on a
                                                        #   fixed batch, then end to end with
                                                        #   data loading (Trainer.fit, 20 steps)
    python benchmarks/bench_throughput.py --device cuda --model vit_small --img 224 \\
        --batch 256 --precision bf16 --compile both     # ViT-S/16 eager and torch.compile

On a fixed batch already on the device (no data loading) the figure is batch / median step
time. On a CPU device both clocks are printed: wall (what you get on this machine now, other
processes included) and process CPU time (what the benchmark's own threads needed: the
figure an otherwise idle machine would show with the same thread count). `--compile both`
builds two trainers (cfg.compile false / true) and reports the compile warm-up separately.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_overhead import (add_model_args, build_trainer, config_from_args, describe,  # noqa: E402
                            fixed_batch, machine, make_config, quick_model, result, sync, timed_steps)


def fixed_batch_throughput(args, compile_: bool, steps: int, warmup: int) -> dict:
    cfg = config_from_args(args, compile=compile_)
    trainer = build_trainer(cfg)
    batch = fixed_batch(trainer)
    sync(trainer.device)
    t0 = time.perf_counter()
    timed_steps(trainer, batch, warmup)  # includes torch.compile's compilation
    warmup_s = time.perf_counter() - t0
    wall, cpu = timed_steps(trainer, batch, steps)
    b = cfg.optim.batch_size
    out = dict(cfg=cfg, device=trainer.device, batch=b, warmup_s=warmup_s,
               wall=b / statistics.median(wall), cpu=b / statistics.median(cpu))
    if trainer.device.type == "cuda":
        out["max_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
    del trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def end_to_end(steps: int, threads: int) -> dict:
    """The CPU preset as `stabilitylab train` runs it (CIFAR sample, augmentations in the main
    process, kNN every 20 steps), for `steps` steps, timed around Trainer.fit."""
    from trainer.loop import Trainer

    cfg = make_config({"threads": threads, "optim.max_steps": steps, "knn.full_every_epochs": 0.0,
                       "log.progress": False, "checkpoint.every_steps": 10**9})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.fit()  # ends with one checkpoint save into tmp
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = steps * cfg.optim.batch_size
    return dict(wall=n / wall, cpu=n / cpu, steps=steps, batch=cfg.optim.batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="narrowed tiny model, few steps (< 1 minute)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20, quick 4)")
    parser.add_argument("--warmup", type=int,
                        help="untimed first steps (default 3, quick 1; 10 when compiling)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="off",
                        help="torch.compile (cfg compile=true): off, on, or both side by side")
    parser.add_argument("--e2e-steps", type=int,
                        help="CPU only: also time Trainer.fit on the real CPU preset for this many "
                             "steps (default 20 in full CPU mode, 0 = skip)")
    args = parser.parse_args(argv)
    quick_model(args)
    steps = args.steps or (4 if args.quick else 20)
    e2e_steps = args.e2e_steps if args.e2e_steps is not None else (
        20 if args.device == "cpu" and not args.quick else 0)

    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    results = []
    for compile_ in variants:
        # compiled: the first step compiles with m specialised to 0.99, the second recompiles
        # with m dynamic (trainer/moco.py takes m as a Python float); time after both
        warmup = args.warmup or (10 if compile_ else 1 if args.quick else 3)
        r = fixed_batch_throughput(args, compile_, steps, warmup)
        results.append((compile_, r))
        if len(results) == 1:
            print(f"figure 6: training throughput -- {describe(r['cfg'], r['device'])}")
            print(f"machine: {machine()}")
        label = "torch.compile" if compile_ else "eager"
        cuda = r["device"].type == "cuda"
        line = (f"{label:13s}: {r['wall']:,.1f} images/s (wall)"
                + ("" if cuda else f", {r['cpu']:,.1f} images/s per CPU-second")
                + f"; warm-up {r['warmup_s']:.1f} s" + (f", peak GPU memory {r['max_mem_gb']:.1f} GiB" if cuda else ""))
        print(line)
        value = f"{r['wall']:,.0f} img/s" if cuda else f"{r['wall']:,.1f} img/s wall, {r['cpu']:,.1f} img/s per CPU-s"
        result(f"6 throughput, fixed batch ({r['device'].type}, {r['cfg'].model.preset}, b{r['batch']}, "
               f"{'compiled' if compile_ else 'eager'}, {torch.get_num_threads()} thr)",
               value + (f"; warm-up {r['warmup_s']:.0f} s" if compile_ else ""), "", "info")
    if len(results) == 2:
        speedup = results[1][1]["wall"] / results[0][1]["wall"]
        print(f"torch.compile speed-up: x{speedup:.2f}")
        result("6 torch.compile speed-up (wall)", f"x{speedup:.2f}", "", "info")
    if e2e_steps:
        threads = args.threads or 1
        r = end_to_end(e2e_steps, threads)
        print(f"end to end (CPU preset, data loading, kNN every 20, {r['steps']} steps): "
              f"{r['wall']:,.1f} images/s (wall), {r['cpu']:,.1f} images/s per CPU-second")
        result(f"6 throughput, end to end Trainer.fit (cpu, tiny preset, b{r['batch']}, {threads} thr)",
               f"{r['wall']:,.1f} img/s wall, {r['cpu']:,.1f} img/s per CPU-s", "", "info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
