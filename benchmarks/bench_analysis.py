"""Figure 3 -- analysis at scale: time and peak memory of load_run + grad_norms + find_spikes +
spike_lead_lag + find_dips on synthetic run directories written with the project's RunWriter.

    python benchmarks/bench_analysis.py --quick    # 10,000 steps x 15 groups and x 150 parameters
    python benchmarks/bench_analysis.py            # 375,000 steps x 15 groups  (goal <= 10 s)
                                                   #   and x 150 parameters     (goal <= 60 s),
                                                   #   peak memory <= 4 GB for both

375,000 steps is 300 epochs of ImageNet at batch 1024 (1,250 steps per epoch). Each case is
written as a finished run: steps, layers (all four statistics, lognormal noise around a slow
per-layer trend, a spike about every 10,000 steps that starts in the first layer and reaches
later layers up to 4 steps later), queue kNN every 20 steps with dips after some spikes, val
kNN once per epoch; `RunWriter.close()` compacts the tables as a finished run's are.
The 150-column case names layers as `log.per_param=true` does (full parameter names).

Then each case is analysed in a fresh subprocess, which reports each stage's wall time and its
peak resident memory (so everything counts: Arrow, pandas, numpy buffers and the
interpreter with its imports, which are reported separately and are not in the time).
Peak memory is VmHWM from /proc/self/status (ru_maxrss elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

STEPS_PER_EPOCH = 1250
KNN_EVERY = 20


def result(figure: str, value: str, goal: str = "", status: str = "") -> None:
    print(f"RESULT | {figure} | {value} | {goal} | {status}", flush=True)


def column_names(n: int) -> list[str]:
    """Layer groups for n <= 20, else per-parameter names (log.per_param=true)."""
    if n <= 20:
        return (["patch_embed", "cls_token"] + [f"blocks.{i}" for i in range(n - 5)]
                + ["norm", "projector", "predictor"])
    suffixes = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias"]
    names = ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias", "backbone.cls_token"]
    block = 0
    while len(names) < n - 4:
        names += [f"backbone.blocks.{block}.{s}" for s in suffixes]
        block += 1
    names = names[:n - 4]
    return names + ["backbone.norm.weight", "backbone.norm.bias", "projector.0.weight", "predictor.0.weight"]


def write_run(run_dir: Path, n_steps: int, n_layers: int, seed: int = 0, chunk: int = 25_000) -> float:
    """Write a finished synthetic run; returns the seconds it took."""
    from stabilitylab.rundir import RunWriter, write_meta

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    names = np.asarray(column_names(n_layers), dtype=object)
    write_meta(run_dir, {"status": "finished", "device": "synthetic", "world_size": 1, "seed": seed})
    (run_dir / "config.yaml").write_text("model:\n  preset: vit_small\nlog:\n  per_param: "
                                         f"{'true' if n_layers > 20 else 'false'}\n")
    n_spikes = max(2, n_steps // 10_000)
    margin = max(n_steps // 20, 200)
    spikes = np.sort(rng.choice(np.arange(margin, n_steps - margin), n_spikes, replace=False))
    lags = np.round(np.linspace(0, 4, n_layers)).astype(int)
    scale = np.logspace(-1, -3, n_layers)
    writer = RunWriter(run_dir, flush_every_steps=chunk)
    for start in range(0, n_steps, chunk):
        step = np.arange(start, min(start + chunk, n_steps))
        n = len(step)
        trend = np.exp(-step / n_steps)[:, None]
        grad = scale * (0.5 + trend) * np.exp(0.2 * rng.standard_normal((n, n_layers)))
        for s in spikes:
            rows = s + lags - start
            inside = (rows >= 0) & (rows < n)
            grad[rows[inside], np.flatnonzero(inside)] *= np.where(np.flatnonzero(inside) == 0, 60, 12)
        cols = {"step": np.repeat(step, n_layers), "layer": np.tile(names, n),
                "grad_l2": grad.astype(np.float32).ravel(),
                "grad_max_abs": (grad * 0.05 * np.exp(0.3 * rng.standard_normal(grad.shape))).astype(np.float32).ravel(),
                "param_l2": np.broadcast_to((10 + step[:, None] * 1e-5) * (1 + np.arange(n_layers)), (n, n_layers))
                .astype(np.float32).ravel(),
                "update_l2": (grad * 1e-2).astype(np.float32).ravel()}
        writer.append("layers", cols)
        loss = 2 + 2 * np.exp(-step / (n_steps / 5)) + 0.05 * rng.standard_normal(n)
        writer.append("steps", {"step": step, "epoch": (step + 1) / STEPS_PER_EPOCH,
                                "lr": np.full(n, 1e-4), "momentum": np.full(n, 0.99),
                                "loss": loss.astype(np.float32), "grad_norm": grad.sum(1).astype(np.float32),
                                "images_per_sec": np.full(n, 3000, np.float32),
                                "step_time_s": np.full(n, 0.3, np.float32), "skipped": np.zeros(n, bool)})
        writer.flush(int(step[-1]))
    knn_step = np.arange(KNN_EVERY - 1, n_steps, KNN_EVERY)
    top1 = 0.15 + 0.6 * (1 - np.exp(-knn_step / (n_steps / 4)))
    for s in spikes[::2]:
        after = knn_step > s
        top1[after] -= 0.08 * np.exp(-(knn_step[after] - s) / max(n_steps / 100, 200))
    top1 += np.sqrt(top1 * (1 - top1) / 5000) * rng.standard_normal(len(knn_step))
    val_step = np.arange(STEPS_PER_EPOCH - 1, n_steps, STEPS_PER_EPOCH)
    for source, st, y, nq in (("queue", knn_step, top1, 5000),
                              ("val", val_step, np.interp(val_step, knn_step, top1), 50_000)):
        writer.append("knn", {"step": st, "epoch": (st + 1) / STEPS_PER_EPOCH, "source": [source] * len(st),
                              "k": np.full(len(st), 20), "top1": y, "top5": np.minimum(y + 0.15, 1),
                              "bank_size": np.full(len(st), 128_116), "n_queries": np.full(len(st), nq)})
    for s in spikes:
        writer.event(int(s), "spike", "synthetic")
    writer.close()
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM (Linux; it starts afresh at exec, while
    ru_maxrss keeps the parent's peak from before the fork), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def child(run_dir: str) -> None:
    """Analyse one run; print one JSON line: stage seconds, peak RSS in MB, result sizes."""
    t0 = time.perf_counter()
    import stabilitylab as sl
    from analysis import find_dips, find_spikes, spike_lead_lag
    imports_s = time.perf_counter() - t0
    rss_imports = peak_rss_mb()
    stages, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        stages[name] = now - t
        t = now

    run = sl.load_run(run_dir)
    lap("load_run")
    grad = run.grad_norms()
    lap("grad_norms")
    spikes = find_spikes(grad)
    lap("find_spikes")
    lead = spike_lead_lag(grad, first=grad.columns[0])
    lap("spike_lead_lag")
    queue = run.knn[run.knn["source"] == "queue"].set_index("step")
    dips = find_dips(queue["top1"], n_queries=queue["n_queries"])
    lap("find_dips (+ knn table)")
    print(json.dumps({"stages": stages, "imports_s": imports_s, "rss_imports_mb": rss_imports,
                      "peak_rss_mb": peak_rss_mb(),
                      "shape": list(grad.shape), "n_spikes": len(spikes), "n_dips": len(dips),
                      "verdict": lead.verdict}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 steps instead of 375,000")
    parser.add_argument("--steps", type=int, help="steps per run (overrides --quick)")
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 150], help="columns per case")
    parser.add_argument("--keep", metavar="DIR", help="write the runs here (kept) instead of a temp dir")
    parser.add_argument("--child", metavar="RUN_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    n_steps = args.steps or (10_000 if args.quick else 375_000)
    goals = {15: 10.0, 150: 60.0}
    try:
        load = f", load {os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    print(f"figure 3: analysis at scale -- {n_steps:,} steps; {os.cpu_count()} cpus{load}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for n_layers in args.layers:
            run_dir = root / f"run_{n_steps}x{n_layers}"
            written = write_run(run_dir, n_steps, n_layers)
            size = sum(p.stat().st_size for p in run_dir.rglob("*.parquet")) / 1e6
            proc = subprocess.run([sys.executable, __file__, "--child", str(run_dir)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout + proc.stderr)
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            total = sum(r["stages"].values())
            print(f"{n_steps:,} steps x {n_layers} = {n_steps * n_layers:,} layer rows "
                  f"({size:.0f} MB of Parquet, written in {written:.1f} s): grad_norms {r['shape'][0]:,} x "
                  f"{r['shape'][1]}, {r['n_spikes']} spike events, {r['n_dips']} dips, lead-lag: {r['verdict']}")
            print("  " + ", ".join(f"{k} {v:.2f} s" for k, v in r["stages"].items())
                  + f"; total {total:.2f} s (imports {r['imports_s']:.1f} s not counted)")
            print(f"  peak RSS {r['peak_rss_mb']:,.0f} MB (after imports: {r['rss_imports_mb']:,.0f} MB)")
            goal = goals.get(n_layers)
            status = "info" if (args.quick or args.steps or goal is None) else (
                "met" if total <= goal and r["peak_rss_mb"] <= 4096 else "NOT met")
            result(f"3 analysis {n_steps} steps x {n_layers} (time, peak RSS)",
                   f"{total:.1f} s, {r['peak_rss_mb'] / 1024:.2f} GB",
                   f"<= {goal:.0f} s, <= 4 GB" if goal else "", status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
