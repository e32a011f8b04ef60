"""Figure 1 -- instrumentation overhead: training steps with the instruments on against the
same steps with them off, and each probe of issue 14 alone, interleaved.

    python benchmarks/bench_overhead.py --quick     # CPU tiny preset, a few rounds (< 1 min)
    python benchmarks/bench_overhead.py             # CPU tiny preset, batch 128, 40 rounds (goal <= 1.03)
    python benchmarks/bench_overhead.py --device cuda --model vit_small --img 224 \\
        --batch 256 --precision bf16                # the GPU figure          (goal <= 1.01)

One `trainer.Trainer`, one model, one fixed random batch already on the device (no data
loading noise). Arms, switched on the same trainer between blocks of steps:

- off: `log.every` larger than any step, no kNN monitor, no probe: the loop only takes the
  total gradient norm it needs for its finiteness check (and the `steps` row);
- grad: the instruments before issue 14: `GradientProbe.record`, `snapshot_params`,
  `record_update` every step, the buffers drained when full, `KnnMonitor.enqueue`;
- all: every default-on instrument: grad + the optimizer-state probe + the attention probe
  every `log.attention_every` (10) steps + the online spike detector (`on_spike=log`);
- grad+optim, grad+attention@1 (the attention probe on every step: its per-probe-step cost),
  grad+detector, grad+keep (`on_spike=checkpoint`'s per-step copy of the last good state,
  with the detector): one addition each, for the per-probe table.

The arms run in rounds of one block each, in an order rotated every round; each round gives
one ratio of mean step times per arm (to `off`, and the additions also to `grad`), and the
script prints the median ratio with its interquartile range and a bootstrap 95% CI.

Also the shared helpers of the torch benchmarks (bench_knn.py, bench_throughput.py import
them): configs are built as `trainer.config.TrainConfig` dataclasses directly, so nothing here
needs omegaconf, pyarrow or plotly (benchmarks/gpu_check.sh relies on that; the trainer's
online spike detector imports `analysis`, hence pandas and scipy).
"""
from __future__ import annotations

import argparse
import copy
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

    Each step also runs the loop's between-steps spike policy, and drains a probe buffer
    that is full, inside the timed step, as the loop does at a flush.
    """
    wall, cpu = [], []
    for _ in range(n):
        sync(trainer.device)
        c0, t0 = time.process_time(), time.perf_counter()
        trainer.train_step(*batch)
        trainer.step += 1
        trainer._after_step_spike_policy()
        for probe in (trainer.probe, trainer.optim_probe, trainer.attention):
            if probe is not None and probe.full:
                probe.drain()
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

ARMS = {  # arm -> instruments on (see the module docstring)
    "off": set(),
    "grad": {"grad"},
    "all": {"grad", "optim", "attention", "detector"},
    "grad+optim": {"grad", "optim"},
    "grad+attention@1": {"grad", "attention@1"},
    "grad+detector": {"grad", "detector"},
    "grad+keep": {"grad", "detector", "keep"},
}
ADDITIONS = [arm for arm in ARMS if arm.startswith("grad+")]


def set_instrumentation(trainer, parts: set, saved: dict) -> None:
    """Switch the trainer's instruments to `parts` (saved: the instances built on)."""
    trainer.cfg.log.every = 1 if "grad" in parts else OFF_EVERY
    trainer.knn = saved["knn"] if "grad" in parts else None
    trainer.optim_probe = saved["optim"] if "optim" in parts else None
    trainer.attention = saved["attention"] if parts & {"attention", "attention@1"} else None
    trainer.cfg.log.attention_every = 1 if "attention@1" in parts else saved["attention_every"]
    trainer.spikes = saved["spikes"] if "detector" in parts else None
    trainer.cfg.on_spike = "checkpoint" if "keep" in parts else "log"
    if "keep" not in parts:
        trainer._last_good = None


def component_times(trainer, batch, saved: dict, repeats: int, clock: str = "cpu") -> dict[str, float]:
    """Median seconds (`clock`: process CPU time or wall) of each instrument call, on the
    gradients of one real step.

    The probes of a logged step run in the loop's order, each repeat as a new step (the
    optimizer-state probe shares the gradient probe's weight copy, update and gradient norms,
    so a call repeated on the same step would find its work done): `record_update` finds
    the update already taken by `after_step`, which therefore carries it.
    """
    from trainer import distributed as dist_utils

    set_instrumentation(trainer, ARMS["all"], saved)
    trainer.train_step(*batch)  # leaves .grad populated
    trainer.step += 1
    probe, optim, monitor, spikes = trainer.probe, saved["optim"], saved["knn"], saved["spikes"]
    feats = torch.randn(trainer.local_batch, trainer.model.feature_dim, device=trainer.device)
    labels = batch[2]
    values = probe.last_grad_l2().cpu().numpy() if probe._steps else np.ones(len(probe.layer_names))
    trainer.cfg.on_spike = "checkpoint"

    def logged_step(step):
        return {
            "probe.record": lambda: probe.record(step),
            "probe.snapshot_params": probe.snapshot_params,
            "optim_probe.before_step": lambda: optim.before_step(step),
            "optim_probe.after_step (with the shared update)": optim.after_step,
            "probe.record_update": probe.record_update,
        }

    alone = {
        "probe.total_grad_norm (also in off)": lambda: probe.total_grad_norm(),
        "knn.enqueue": lambda: monitor.enqueue(dist_utils.concat_all_gather(feats), labels),
        "spike detector update": lambda: spikes.update(trainer.step, values),
        "keep last good state (on_spike=checkpoint)": trainer._remember_last_good_state,
        "  vs a deep copy of the whole state": lambda: copy.deepcopy(trainer.state_dict()),
    }
    times: dict[str, list[float]] = {}
    now = time.process_time if clock == "cpu" else time.perf_counter

    def timed(name, call):
        sync(trainer.device)
        c0 = now()
        call()
        sync(trainer.device)
        times.setdefault(name, []).append(now() - c0)

    for i in range(repeats):
        for p in (probe, optim):
            if p.full:
                p.drain()
        c0 = now()
        for name, call in logged_step(trainer.step + i).items():
            timed(name, call)
        times.setdefault("= the probes of one logged step", []).append(now() - c0)
        for name, call in alone.items():
            timed(name, call)
    probe.drain()
    optim.drain()
    set_instrumentation(trainer, ARMS["all"], saved)
    return {name: statistics.median(values) for name, values in times.items()}


def summarize(ratios) -> tuple[float, float, float, float, float]:
    median = statistics.median(ratios)
    q1, q3 = np.quantile(ratios, [0.25, 0.75])
    lo, hi = bootstrap_median_ci(ratios)
    return median, q1, q3, lo, hi


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="few short rounds (< 1 minute)")
    parser.add_argument("--pairs", type=int, help="rounds of one block per arm (default 40, quick 6)")
    parser.add_argument("--block", type=int, help="steps per block (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 10, quick 3)")
    parser.add_argument("--goal", type=float, help="ratio goal (default 1.03 on CPU, 1.01 on CUDA)")
    parser.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                        help="timing the figure uses: wall clock, or process CPU time (auto: CPU "
                             "time on a CPU device, immune to other processes on a shared machine; "
                             "wall on CUDA). Both are printed.")
    args = parser.parse_args(argv)
    quick_model(args)
    rounds = args.pairs or (6 if args.quick else 40)
    block = args.block or (2 if args.quick else 3)
    warmup = args.warmup or (3 if args.quick else 10)

    cfg = config_from_args(args)
    trainer = build_trainer(cfg)
    device = trainer.device
    goal = args.goal or (1.01 if device.type == "cuda" else 1.03)
    clock = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "cpu")
    batch = fixed_batch(trainer)
    saved = {"knn": trainer.knn, "optim": trainer.optim_probe, "attention": trainer.attention,
             "spikes": trainer.spikes, "attention_every": cfg.log.attention_every}
    print(f"figure 1: instrumentation overhead -- {describe(cfg, device)}, "
          f"{len(trainer.probe.layer_names)} layer groups, kNN queue {len(saved['knn'].features)}, "
          f"attention probe on {cfg.log.attention_samples} images every {cfg.log.attention_every} steps")
    print(f"machine: {machine()}")

    for arm in ("all", "off"):  # step 0 (always logged) is in the warm-up
        set_instrumentation(trainer, ARMS[arm], saved)
        timed_steps(trainer, batch, warmup if arm == "all" else max(1, warmup // 2))

    arms = list(ARMS)
    steps = {(arm, c): [] for arm in arms for c in ("wall", "cpu")}
    means = {(arm, c): [] for arm in arms for c in ("wall", "cpu")}
    for i in range(rounds):
        order = arms[i % len(arms):] + arms[:i % len(arms)]
        order = order if i % 2 == 0 else order[::-1]
        for arm in order:
            set_instrumentation(trainer, ARMS[arm], saved)
            for c, times in zip(("wall", "cpu"), timed_steps(trainer, batch, block)):
                steps[arm, c].extend(times)
                means[arm, c].append(sum(times) / len(times))
    set_instrumentation(trainer, ARMS["all"], saved)

    print(f"{rounds} rounds x {block} steps per arm, arm order rotated every round")
    ratio = lambda arm, base, c: [a / b for a, b in zip(means[arm, c], means[base, c])]
    summary = {}
    for c in ("wall", "cpu"):
        print(f"{c}: median step, off {statistics.median(steps['off', c]) * 1e3:.2f} ms")
        for arm in arms[1:]:
            median, q1, q3, lo, hi = summary[arm, c] = summarize(ratio(arm, "off", c))
            extra = ""
            if arm in ADDITIONS:
                summary[arm, c, "grad"] = summarize(ratio(arm, "grad", c))
                extra = f"; / grad {summary[arm, c, 'grad'][0]:.4f} (CI {summary[arm, c, 'grad'][3]:.4f}-" \
                        f"{summary[arm, c, 'grad'][4]:.4f})"
            print(f"  {arm:18s} {statistics.median(steps[arm, c]) * 1e3:9.2f} ms; / off median {median:.4f}, "
                  f"IQR [{q1:.4f}, {q3:.4f}], CI [{lo:.4f}, {hi:.4f}]{extra}")
    if not args.quick:
        print(f"each instrument call (median of 30, {clock} time):")
        for name, seconds in component_times(trainer, batch, saved, 30, clock).items():
            print(f"  {name:44s} {seconds * 1e3:8.3f} ms")
    what = f"{device.type}, {cfg.model.preset}, b{cfg.optim.batch_size}, {clock} time"
    median, q1, q3, lo, hi = summary["all", clock]
    result(f"1 overhead ratio every default-on instrument / off ({what})",
           f"{median:.3f} (IQR {q1:.3f}-{q3:.3f}, CI {lo:.3f}-{hi:.3f})", f"<= {goal}",
           verdict(None if args.quick else median <= goal))
    median, q1, q3, lo, hi = summary["grad", clock]
    result(f"1 overhead ratio gradient probe + kNN enqueue / off ({what})",
           f"{median:.3f} (IQR {q1:.3f}-{q3:.3f}, CI {lo:.3f}-{hi:.3f})")
    for arm in ADDITIONS:
        median, q1, q3, lo, hi = summary[arm, clock, "grad"]
        result(f"1 probe cost {arm} / grad ({what})", f"{median:.4f} (CI {lo:.4f}-{hi:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
