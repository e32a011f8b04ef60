"""Figure 6, flush_denormal: a CPU training step with subnormal floats flushed to zero (the
trainer's default) against the same step computing them, on a state that makes them.

    python benchmarks/bench_denormal.py --quick     # planted state, narrowed tiny model (< 1 minute)
    python benchmarks/bench_denormal.py             # planted state, CPU tiny preset, batch 128, 8 rounds
    python benchmarks/bench_denormal.py --checkpoint RUN_DIR --batch 256 --rounds 4 --steps 1
                                                    # the latest checkpoint of a real run
                                                    # (--at STEP: the last one at or before STEP)

A healthy network makes almost no subnormal floats; one whose attention has collapsed does:
the gradients through a saturated softmax fall below 1.2e-38 and x86 cores take far longer on
every multiply with them (in the LAMB run of docs/findings.md R2 the backward matmuls went 25x
slower). `--checkpoint` times the state of a run's latest checkpoint (its config, at
`--batch`); without it the state is planted: the tiny preset with every block's qkv weights
scaled by `--plant` (10), which saturates the softmax from the first step.

One `trainer.Trainer` on one fixed random batch. Flush-to-zero is a switch of the CPU's
floating-point unit (`torch.set_flush_denormal`), so both arms run in this process, in blocks
of `--steps` steps that alternate the order every round, each block starting from the same
state (reloaded); each round gives one ratio of the arms' median step CPU times. One profiled
step per arm names the ops that take the time, and one more step per arm counts the subnormal
floats each op computes: where they arise (an op that makes them from inputs with none) and
where they go.
"""
from __future__ import annotations

import argparse
import collections
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from bench_overhead import (  # noqa: E402
    add_model_args, build_trainer, config_from_args, describe, fixed_batch, machine, quick_model,
    result, summarize, timed_steps,
)


def planted_trainer(args):
    """The benchmark config's trainer (fp32 unless --precision says otherwise) with every
    attention's qkv weights scaled by args.plant."""
    precision = "fp32" if args.precision == "auto" else args.precision
    trainer = build_trainer(config_from_args(args, precision=precision))
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if name.endswith("attn.qkv.weight"):
                param.mul_(args.plant)
    return trainer, copy.deepcopy(trainer.state_dict())


def checkpoint_trainer(args):
    """A trainer in the state of RUN_DIR's latest checkpoint (at or before --at), at --batch,
    without its kNN queue."""
    from stabilitylab.config import config_from_run
    from trainer.checkpoint import list_checkpoints, load_checkpoint

    found = [c for c in list_checkpoints(args.checkpoint) if args.at is None or c.step <= args.at]
    if not found:
        raise SystemExit(f"bench_denormal: no checkpoint in {args.checkpoint}/checkpoints"
                         + (f" at or before step {args.at}" if args.at is not None else ""))
    checkpoint = found[-1]
    overrides = [f"optim.batch_size={args.batch or 256}", "knn.enabled=false", "log.progress=false",
                 "device=cpu", f"threads={args.threads or 1}"]
    if args.precision != "auto":
        overrides.append(f"precision={args.precision}")
    cfg = config_from_run(args.checkpoint, overrides)  # the run's own precision unless given
    trainer = build_trainer(cfg)
    state = load_checkpoint(checkpoint)
    state["knn"] = None
    print(f"state: {checkpoint.path} (step {state['step']})")
    return trainer, state


def profiled_step(trainer, batch, n: int = 3) -> tuple[float, str]:
    """One step's share of self CPU time in aten::mm (the matmuls of the backward pass, where
    the subnormal gradients meet the weights) and its n costliest ops, as 'name share%'."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(*batch)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    mm = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")
    return 100 * mm / total, ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in events[:n])


def subnormal_count(value) -> tuple[int, int]:
    """(subnormal floats, all floats) in `value` if it is a floating-point tensor, else (0, 0)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return 0, 0
    x = value.detach()
    return int(((x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)).sum()), x.numel()


class SubnormalCensus(TorchDispatchMode):
    """Counts, per aten op of the steps run under it, the subnormal floats among the values the
    op computes (`made`, out of `computed`) and reads (`read`, out of `inputs`); `origins`
    counts those an op made from inputs that held none: where they arise. Views and copies
    are skipped, as they only pass values on."""

    PASS_ON = frozenset({"clone", "stack", "cat", "_unsafe_view", "contiguous", "copy_", "_to_copy",
                         "split", "split_with_sizes", "unbind", "detach", "fill_", "zero_"})

    def __init__(self):
        super().__init__()
        self.made, self.computed = collections.Counter(), collections.Counter()
        self.read, self.inputs = collections.Counter(), collections.Counter()
        self.origins = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in self.PASS_ON:
            return out
        made = read = 0
        for value in tree_leaves(out):
            n_sub, n = subnormal_count(value)
            made += n_sub
            self.computed[name] += n
        for value in tree_leaves((args, kwargs)):
            n_sub, n = subnormal_count(value)
            read += n_sub
            self.inputs[name] += n
        self.made[name] += made
        self.read[name] += read
        if made and not read:
            self.origins[name] += made
        return out


def census_step(trainer, batch, flush: bool) -> SubnormalCensus:
    """A SubnormalCensus of one step with flushing on or off."""
    torch.set_flush_denormal(flush)
    with SubnormalCensus() as census:
        trainer.train_step(*batch)
    return census


def census_lines(off: SubnormalCensus, on: SubnormalCensus, n: int = 3) -> list[str]:
    """Report lines: how many subnormal floats a step computes in each arm, and with flushing
    off the ops where they arise and the n that make and read the most of them."""
    def top(counts, totals):
        return ", ".join(f"{op} {count:,} ({100 * count / totals[op]:.2g}%)"
                         for op, count in counts.most_common(n) if count) or "none"

    return [f"subnormal floats computed in one step: {sum(off.made.values()):,} with flush_denormal=off, "
            f"{sum(on.made.values()):,} with it on",
            f"  arise in: {top(off.origins, off.computed)}",
            f"  made most by: {top(off.made, off.computed)}",
            f"  read most by: {top(off.read, off.inputs)}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="narrowed model, 1 round of 1 step (< 1 minute)")
    parser.add_argument("--checkpoint", metavar="RUN_DIR", help="time the state of this run's latest checkpoint")
    parser.add_argument("--at", type=int, metavar="STEP", help="with --checkpoint: its last checkpoint at or before STEP")
    parser.add_argument("--plant", type=float, default=10.0, help="qkv weight scale of the planted state (default 10)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 8, quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per arm and round (default 3, quick 1)")
    args = parser.parse_args(argv)
    if args.at is not None and not args.checkpoint:
        parser.error("--at picks one of a run's checkpoints: give the run with --checkpoint RUN_DIR")
    if args.device != "cpu":
        parser.error("flush_denormal is a CPU setting: use --device cpu")
    if not torch.set_flush_denormal(False):
        parser.error("this CPU cannot flush subnormal floats to zero (torch.set_flush_denormal)")
    quick_model(args)
    rounds = args.rounds or (1 if args.quick else 8)
    steps = args.steps or (1 if args.quick else 3)
    trainer, state = checkpoint_trainer(args) if args.checkpoint else planted_trainer(args)
    batch = fixed_batch(trainer)

    trainer.load_state_dict(state)
    trainer.train_step(*batch)  # untimed: the first step of a process also pays for allocations
    blocks = {"on": [], "off": []}
    for i in range(rounds):
        for arm in (("on", "off") if i % 2 == 0 else ("off", "on")):
            torch.set_flush_denormal(arm == "on")
            trainer.load_state_dict(state)
            blocks[arm].append(statistics.median(timed_steps(trainer, batch, steps)[1]))
    ops = {}
    for arm in ("off", "on"):
        torch.set_flush_denormal(arm == "on")
        trainer.load_state_dict(state)
        ops[arm] = profiled_step(trainer, batch)
    census = {}
    for arm in ("off", "on"):
        trainer.load_state_dict(state)
        census[arm] = census_step(trainer, batch, flush=arm == "on")
    torch.set_flush_denormal(False)

    source = f"checkpoint of {args.checkpoint}" if args.checkpoint else f"planted (qkv x {args.plant:g})"
    print(f"figure 6, flush_denormal: {describe(trainer.cfg, trainer.device)}, state {source}")
    print(f"machine: {machine()}")
    print(f"{rounds} rounds, {steps} timed steps per arm each, from the same state")
    for arm in ("off", "on"):
        print(f"  flush_denormal={arm:3s}  CPU {statistics.median(blocks[arm]) * 1e3:8.1f} ms a step; "
              f"aten::mm {ops[arm][0]:.0f}% of it; most time: {ops[arm][1]}")
    print("\n".join(census_lines(census["off"], census["on"])))
    median, q1, q3, lo, hi = summarize([off / on for on, off in zip(blocks["on"], blocks["off"])])
    print(f"  off / on median {median:.3f}, IQR [{q1:.3f}, {q3:.3f}], CI [{lo:.3f}, {hi:.3f}]")
    result("6 flush_denormal: step time off / on (cpu time)",
           f"{median:.3f} (IQR {q1:.3f}-{q3:.3f}, CI {lo:.3f}-{hi:.3f})", status="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
