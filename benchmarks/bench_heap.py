"""Figure 6, keep_heap: a CPU training step with the trainer's glibc heap setting on (the
default) against glibc's own defaults, each in processes of its own, alternating.

    python benchmarks/bench_heap.py --quick     # narrowed tiny model, 1 round (< 1 minute)
    python benchmarks/bench_heap.py             # CPU preset (tiny, batch 128, bf16 here), 8 rounds

`keep_heap` calls glibc's mallopt, which is process-wide and cannot be undone, so every block
of steps is a fresh process (`--arm on|off`) that builds one `trainer.Trainer` on one fixed
random batch (bench_overhead.py's helpers), trains a few untimed steps, then times `--steps`
steps and counts the minor page faults they take. Rounds alternate the order (on, off / off,
on); each round gives one ratio of the arms' median step times. The figure is process CPU
time (immune to neighbours on a shared machine); wall time is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import (  # noqa: E402
    add_model_args, build_trainer, config_from_args, describe, fixed_batch, machine, quick_model,
    result, summarize, timed_steps,
)


def one_block(args) -> dict:
    """In this process: median step times and page faults per step with keep_heap=args.arm."""
    cfg = config_from_args(args, keep_heap=args.arm == "on")
    trainer = build_trainer(cfg)
    batch = fixed_batch(trainer)
    timed_steps(trainer, batch, args.warmup)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = timed_steps(trainer, batch, args.steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.steps
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu), "faults": faults,
            "describe": describe(cfg, trainer.device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="narrowed model, 1 round (< 1 minute)")
    parser.add_argument("--rounds", type=int, help="alternating rounds, one process per arm each (default 8)")
    parser.add_argument("--steps", type=int, help="timed steps per process (default 20, quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per process first (default 5, quick 2)")
    parser.add_argument("--arm", choices=("on", "off"), help=argparse.SUPPRESS)  # one block, in a child
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("keep_heap is a CPU setting: use --device cpu")
    quick_model(args)
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup or (2 if args.quick else 5)
    if args.arm:
        print(json.dumps(one_block(args)))
        return 0

    rounds = args.rounds or (1 if args.quick else 8)
    child = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]
    blocks = {"on": [], "off": []}
    for i in range(rounds):
        for arm in (("on", "off") if i % 2 == 0 else ("off", "on")):
            out = subprocess.run([*child, "--arm", arm], capture_output=True, text=True, check=True)
            blocks[arm].append(json.loads(out.stdout.splitlines()[-1]))
    print(f"figure 6, keep_heap: {blocks['on'][0]['describe']}")
    print(f"machine: {machine()}")
    print(f"{rounds} rounds, one process per arm each, {args.steps} timed steps after {args.warmup}")
    for arm in ("off", "on"):
        b = blocks[arm]
        print(f"  keep_heap={arm:3s}  CPU {statistics.median(x['cpu'] for x in b) * 1e3:7.1f} ms, "
              f"wall {statistics.median(x['wall'] for x in b) * 1e3:7.1f} ms, "
              f"{statistics.median(x['faults'] for x in b):8.0f} page faults a step")
    ratios = {clock: summarize([off[clock] / on[clock] for on, off in zip(blocks["on"], blocks["off"])])
              for clock in ("wall", "cpu")}
    for clock, (median, q1, q3, lo, hi) in ratios.items():
        print(f"  {clock}: off / on median {median:.3f}, IQR [{q1:.3f}, {q3:.3f}], CI [{lo:.3f}, {hi:.3f}]")
    median, q1, q3, lo, hi = ratios["cpu"]
    result("6 keep_heap: step time off / on (cpu time)", f"{median:.3f} (IQR {q1:.3f}-{q3:.3f}, CI {lo:.3f}-{hi:.3f})",
           status="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
