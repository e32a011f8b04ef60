"""Precision (issue 15): a training step in fp32 against bf16 and fp16 autocast, side by side.

    python benchmarks/bench_precision.py --quick      # narrowed tiny model, a few rounds (< 1 min)
    python benchmarks/bench_precision.py --edge       # configs/cpu_edge.yaml's shape: width 64,
                                                      # depth 8, 32px/8, heads 512 -> 128, batch 256
    python benchmarks/bench_precision.py --device cuda --model vit_small --img 224 --batch 256

Whether the R1 runs of docs/findings.md can be repeated in bf16 or fp16 on a CPU depends on
what the CPU does with them: with native bf16 (AVX512-BF16 or AMX) a bf16 step is faster
than fp32, without it torch converts on the fly. One trainer per precision, all from the same
seed (the same weights) on one fixed random batch, instruments on as a run has them; the arms
run in rounds of one block each, their order rotated every round, and each round gives one
ratio of mean step times (CPU time on a CPU, wall on CUDA) to fp32. Prints the median ratio
with its interquartile range and a bootstrap 95% CI, and whether the CPU has native bf16.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import (add_model_args, build_trainer, config_from_args, describe,  # noqa: E402
                            fixed_batch, machine, quick_model, result, summarize, timed_steps)

PRECISIONS = ("fp32", "bf16", "fp16")
EDGE_SHAPE = ["model.embed_dim=64", "model.depth=8", "model.num_heads=4", "model.patch_size=8",
              "model.img_size=32", "model.head_hidden_dim=512", "model.head_out_dim=128"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--edge", action="store_true", help="configs/cpu_edge.yaml's model and batch 256")
    parser.add_argument("--quick", action="store_true", help="narrowed tiny model, few rounds (< 1 minute)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 10, quick 2)")
    parser.add_argument("--block", type=int, help="steps per arm and round (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, help="untimed first steps per arm (default 2, quick 1)")
    args = parser.parse_args(argv)
    if args.edge:
        args.set = EDGE_SHAPE + args.set
        args.batch = args.batch or 256
    quick_model(args)
    rounds = args.rounds or (2 if args.quick else 10)
    block = args.block or (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    import torch

    from trainer.loop import cpu_has_bf16

    clock = 0 if torch.device(args.device).type == "cuda" else 1  # timed_steps: (wall, cpu)
    trainers = {p: build_trainer(config_from_args(args, precision=p)) for p in PRECISIONS}
    batch = fixed_batch(trainers["fp32"])
    print(machine())
    print(describe(trainers["fp32"].cfg, args.device), "| native bf16:",
          "yes" if torch.device(args.device).type == "cuda" or cpu_has_bf16() else "no")
    for trainer in trainers.values():
        timed_steps(trainer, batch, warmup)
    ratios = {p: [] for p in PRECISIONS[1:]}
    seconds = {p: [] for p in PRECISIONS}
    for r in range(rounds):
        order = PRECISIONS[r % 3:] + PRECISIONS[:r % 3]
        mean = {p: statistics.mean(timed_steps(trainers[p], batch, block)[clock]) for p in order}
        for p in PRECISIONS:
            seconds[p].append(mean[p])
        for p in ratios:
            ratios[p].append(mean[p] / mean["fp32"])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{p} {1000 * mean[p]:.0f} ms" for p in PRECISIONS),
              flush=True)
    kind = "wall" if clock == 0 else "cpu time"
    for p, values in ratios.items():
        median, q1, q3, lo, hi = summarize(values)
        result(f"6 precision: step time {p} / fp32 ({kind})",
               f"{median:.2f} (IQR {q1:.2f}-{q3:.2f}, 95% CI {lo:.2f}-{hi:.2f}); "
               f"{1000 * statistics.median(seconds[p]):.0f} vs {1000 * statistics.median(seconds['fp32']):.0f} ms",
               status="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
