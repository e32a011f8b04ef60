"""`stabilitylab sweep`: expand a config grid into run directories and run them.

Each grid point (x seed) becomes ``OUT/<key=value>_..._seed<N>``. Finished runs are skipped,
interrupted runs with a checkpoint are resumed, so one sweep can be carried on across
several work sessions. Launchers: ``local`` (K runs at a time, CPU threads split between
them), ``torchrun`` (one run at a time on all local GPUs), ``slurm`` (writes an sbatch array
script calling torchrun per run; nothing is submitted).
"""
from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from stabilitylab.config import ConfigError

SWEEP_FILE = "sweep.json"
INTERRUPTED = 130  # the exit status of `stabilitylab train` stopped by SIGINT / SIGTERM


@dataclass
class SweepRun:
    name: str
    overrides: list[str]
    path: Path

    def state(self) -> str:
        """new | finished | resumable | broken (started, no checkpoint to resume from)."""
        meta = self.path / "meta.json"
        if not meta.exists():
            return "new"
        if json.loads(meta.read_text()).get("status") == "finished":
            return "finished"
        return "resumable" if any((self.path / "checkpoints").glob("step-*.pt")) else "broken"


def log_path(run: SweepRun) -> Path:
    """Each run's console output, beside (not inside) its run directory."""
    return run.path.parent / f"{run.name}.log"


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``key=v1,v2`` strings -> {key: [v1, v2]} (in the order given)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r} is not of the form dotted.key=value1,value2")
        grid[key] = [v for v in values.split(",") if v]
    return grid


def _short(key: str) -> str:
    """The last part of a dotted key, or the one before it when the last says nothing
    on its own (`optim.name` -> `optim`)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def expand(grid: dict[str, list[str]], seeds: int, out: Path, fixed: list[str] = ()) -> list[SweepRun]:
    """Every combination of grid values x seeds, with readable directory names."""
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in range(seeds):
            parts = [f"{_short(k)}={v}" for k, v in zip(keys, values)] + [f"seed{seed}"]
            overrides = list(fixed) + [f"{k}={v}" for k, v in zip(keys, values)] + [f"seed={seed}"]
            name = "_".join(parts).replace("/", "-")
            runs.append(SweepRun(name, overrides, out / name))
    return runs


def train_command(run: SweepRun, config: str | None, launcher: str) -> list[str]:
    """The command that starts or resumes one run."""
    if launcher == "local":
        head = [sys.executable, "-m", "stabilitylab", "train"]
    else:
        head = ["torchrun", "--standalone", "--nproc_per_node=gpu", "-m", "stabilitylab", "train"]
    if run.state() == "resumable":
        return head + ["--resume", str(run.path)]
    tail = ["--out", str(run.path), "--force"] + run.overrides
    return head + (["--config", config] if config else []) + tail


def slurm_script(runs: list[SweepRun], config: str | None, out: Path, gpus: int = 8) -> str:
    """An sbatch array script: task i runs (or resumes) run i with torchrun."""
    lines = [f"{shlex.join(train_command(r, config, 'torchrun'))}" for r in runs]
    cases = "\n".join(f"  {i}) {cmd} ;;" for i, cmd in enumerate(lines))
    return (f"#!/bin/bash\n#SBATCH --job-name=stabilitylab-sweep\n#SBATCH --array=0-{len(runs) - 1}\n"
            f"#SBATCH --gpus-per-node={gpus}\n#SBATCH --nodes=1\n#SBATCH --output={out}/slurm-%A_%a.log\n"
            f"set -euo pipefail\ncase $SLURM_ARRAY_TASK_ID in\n{cases}\nesac\n")


def add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="run a grid of training runs (resumable) and print the comparison",
        description="Expand --grid options into run directories under --out and run them. "
                    "Finished runs are skipped and interrupted runs resumed, so rerunning the "
                    "same command carries a sweep on.",
        epilog="examples:\n  stabilitylab sweep --out runs/s4 --grid model.patch_proj=learned,frozen --seeds 3\n"
               "  stabilitylab sweep --out runs/lr --grid optim.base_lr=1e-2,1e-1 --jobs 2 optim.epochs=8\n"
               "  stabilitylab sweep --out runs/big --grid optim.batch_size=512,1024 --launcher slurm\n"
               "  stabilitylab sweep --out runs/s4 --grid model.patch_proj=learned,frozen --dry-run")
    sweep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every run")
    sweep.add_argument("--config", metavar="FILE", help="base config file or preset name")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a config key and its values; repeat for a grid")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point (default 1)")
    sweep.add_argument("--out", required=True, metavar="DIR", help="sweep folder")
    sweep.add_argument("--jobs", type=int, default=1, help="runs at a time with --launcher local")
    sweep.add_argument("--launcher", choices=["local", "torchrun", "slurm"], default="local")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the commands (with --launcher slurm: the script), write and run nothing")


def cmd_sweep(args) -> int:
    from stabilitylab.config import load_config

    grid = parse_grid(args.grid)
    if not grid:
        raise ConfigError("give at least one --grid KEY=V1,V2")
    if args.seeds < 1 or args.jobs < 1:
        raise ConfigError("--seeds and --jobs must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the sweep")
    runs = expand(grid, args.seeds, out, args.overrides)
    for run in runs:  # validate every config before starting anything
        load_config(args.config, run.overrides)
    if args.launcher == "slurm" and args.dry_run:
        print(slurm_script(runs, args.config, out), end="")
        return 0
    if not args.dry_run:  # a dry run writes nothing, not even over an existing sweep's record
        out.mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(
            {"config": args.config, "grid": grid, "seeds": args.seeds, "overrides": args.overrides,
             "runs": [r.name for r in runs]}, indent=2))
    if args.launcher == "slurm":
        script = out / "sweep.sbatch"
        script.write_text(slurm_script(runs, args.config, out))
        print(f"wrote {script} ({len(runs)} array tasks); submit with: sbatch {script}")
        return 0
    todo = [r for r in runs if r.state() != "finished"]
    print(f"sweep {out}: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run")
    if args.dry_run:
        for run in todo:
            print(shlex.join(train_command(run, args.config, args.launcher)))
        return 0
    failed, interrupted = _run_all(todo, args.config, args.launcher, args.jobs)
    _print_comparison(runs)
    if interrupted:
        print(f"{len(interrupted)} run(s) interrupted: {', '.join(r.name for r in interrupted)}; "
              "rerun the same command to resume them", file=sys.stderr)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(r.name for r in failed)} "
              f"(logs: {out}/<run>.log); rerun the same command to retry", file=sys.stderr)
    return 1 if failed else INTERRUPTED if interrupted else 0


def run_threads(run: SweepRun, share: int) -> int:
    """A run's CPU threads: its own `threads=N` override (N >= 1), else `share`."""
    given = [o.split("=", 1)[1] for o in run.overrides if o.startswith("threads=")]
    return int(given[-1]) if given and given[-1].isdigit() and int(given[-1]) > 0 else share


def _run_all(runs: list[SweepRun], config: str | None, launcher: str,
             jobs: int) -> tuple[list[SweepRun], list[SweepRun]]:
    """Run `jobs` at a time (1 for torchrun), each with an equal share of the CPU threads
    unless the sweep's overrides set `threads`. Returns the failed and the interrupted runs.

    Each run gets its own session, so a Ctrl-C (or SIGTERM) reaches the sweep alone; the
    sweep then starts nothing new and passes one SIGINT to each active run, which stops
    after its current step with a checkpoint (a second one would stop it at once)."""
    jobs = 1 if launcher == "torchrun" else jobs
    share = max(1, (os.cpu_count() or 1) // jobs)
    pending, active, failed, interrupted = list(runs), [], [], []

    def collect(item) -> None:
        run, proc, log = item
        active.remove(item)
        log.close()
        if proc.returncode == 0:
            print(f"done    {run.name}")
        elif proc.returncode == INTERRUPTED:
            print(f"stopped {run.name}")
            interrupted.append(run)
        else:
            print(f"FAILED  {run.name}")
            failed.append(run)

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while pending or active:
            while pending and len(active) < jobs:
                run = pending.pop(0)
                threads = run_threads(run, share)
                cmd = train_command(run, config, launcher)
                if launcher == "local":
                    cmd += [f"threads={threads}", "log.progress=false"]
                log = open(log_path(run), "a")
                print(f"start   {run.name}")
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                active.append((run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                     start_new_session=True), log))
            time.sleep(0.5)
            for item in [a for a in active if a[1].poll() is not None]:
                collect(item)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(active)} run(s) finish their current step and save a "
              "checkpoint", file=sys.stderr)
        for _, proc, _ in active:
            proc.send_signal(signal.SIGINT)
        for item in list(active):
            item[1].wait()
            collect(item)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return failed, interrupted


def _print_comparison(runs: list[SweepRun]) -> None:
    from analysis import compare_runs, display_table, seed_spread
    from stabilitylab.cli import text_table
    from stabilitylab.run import Run, is_run_dir

    loaded = [Run(r.path) for r in runs if is_run_dir(r.path)]
    if loaded:
        table = compare_runs(loaded)
        print(text_table(display_table(table)))
        if "seed" in table:
            print("\nmean and standard deviation over seeds:")
            print(text_table(display_table(seed_spread(table))))
