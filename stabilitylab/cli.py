"""`stabilitylab` command line: train | report | analyze | compare | sweep | replay.

User errors print one line to stderr and exit 2 (set STABILITYLAB_DEBUG=1 for a traceback).
`report`, `analyze` and `compare` never import torch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stabilitylab",
        description="Training-stability diagnostics for self-supervised ViTs (MoCo v3).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train MoCo v3 with full instrumentation into a run directory",
        description="Train MoCo v3 on a timm ViT, logging per-step loss, per-layer gradient norms "
                    "and a dense kNN curve to a run directory. With no arguments: the CPU preset "
                    "on the sample images in data_samples/ (a few minutes on 2 cores).",
        epilog="examples:\n  stabilitylab train\n  stabilitylab train model.patch_proj=frozen "
               "optim.base_lr=3e-3\n  stabilitylab train --config vit_small_imagenet "
               "data.path=/data/imagenet\n  torchrun --nproc_per_node=8 -m stabilitylab train "
               "--config vit_base_imagenet",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. model.patch_proj=frozen optim.base_lr=3e-3")
    train.add_argument("--config", metavar="FILE", help="YAML config file or preset name from configs/")
    train.add_argument("--out", metavar="DIR", help="run directory (default: runs/<time>-<model>-<patch_proj>)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--force", action="store_true", help="overwrite an existing run directory at --out")

    report = sub.add_parser("report", help="write a self-contained HTML report for runs",
                            description="One offline HTML page for one run or a comparison of runs.")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, globs or sweep folders")
    report.add_argument("-o", "--output", metavar="FILE", help="HTML path (default: RUN_DIR/report.html "
                        "for one run, report.html otherwise)")
    report.add_argument("--figures", metavar="DIR", help="also write PNG and PDF figures here")
    report.add_argument("--lenient", action="store_true", help="skip corrupt Parquet parts with a warning")

    analyze = sub.add_parser("analyze", help="print dips, gradient spikes and the lead-lag verdict of a run")
    analyze.add_argument("run", metavar="RUN_DIR")
    analyze.add_argument("--json", action="store_true", help="print the summary as JSON")
    analyze.add_argument("--lenient", action="store_true", help="skip corrupt Parquet parts with a warning")

    compare = sub.add_parser("compare", help="print a comparison table of runs")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, globs or sweep folders")
    compare.add_argument("--by", default="model.patch_proj",
                         help="config key(s) that name the variant, comma-separated (always shown)")
    compare.add_argument("--over-seeds", action="store_true",
                         help="one row per setting: mean and standard deviation over its seeds")
    fmt = compare.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV instead of a text table")
    fmt.add_argument("--json", action="store_true", help="JSON records instead of a text table")

    replay = sub.add_parser(
        "replay", help="rerun the steps around a spike from a checkpoint, unchanged and with mitigations",
        description="Restore the newest checkpoint from which step STEP can be rerun (checkpoints/, or "
                    "spikes/checkpoints/ with on_spike=checkpoint) and train to step STEP+N-1 on the same "
                    "batches and augmentations: once unchanged (bit for bit the original on the CPU) and "
                    "once per --with KEY=VALUE, each into a child run directory RUN_DIR/replays/NAME/. "
                    "Only keys that can change mid-run are accepted; model.patch_proj=frozen freezes the "
                    "projection's current weights.",
        epilog="examples:\n  stabilitylab replay runs/a --at 1200 --steps 200 --with model.patch_proj=frozen\n"
               "  stabilitylab replay runs/a --at 1200 --with \"optim.betas=[0.9,0.95]\" --with optim.base_lr=5e-4\n"
               "  stabilitylab compare runs/a/replays/s1200_n200_*   # the replays side by side",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    replay.add_argument("run", metavar="RUN_DIR")
    replay.add_argument("--at", type=int, required=True, metavar="STEP", help="first step of the window to compare")
    replay.add_argument("--steps", type=int, default=200, metavar="N", help="steps in the window (default 200)")
    replay.add_argument("--with", dest="mitigations", action="append", default=[], metavar="KEY=VALUE",
                        help="one replay with this config change (repeatable)")
    replay.add_argument("--force", action="store_true", help="redo replays that already exist")

    from stabilitylab.sweep import add_sweep_parser

    add_sweep_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`sweep --grid a=1,2 --seeds 3 b=4`): argparse
    # fills a positional list only once, so later ones arrive here and join the list
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    handlers = {"train": cmd_train, "report": cmd_report, "analyze": cmd_analyze,
                "compare": cmd_compare, "sweep": _cmd_sweep, "replay": cmd_replay}
    try:
        return handlers[args.command](args) or 0
    except Exception as exc:
        if os.environ.get("STABILITYLAB_DEBUG") or not _is_user_error(exc):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"stabilitylab {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def _is_user_error(exc: Exception) -> bool:
    from stabilitylab.config import ConfigError
    from stabilitylab.run import RunDirError

    user_errors = (UsageError, ConfigError, RunDirError, FileNotFoundError, FileExistsError)
    return isinstance(exc, user_errors) or getattr(exc, "user_error", False)


# ---------------------------------------------------------------- train

def _default_run_dir(cfg) -> Path:
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.preset}-{cfg.model.patch_proj}"


def _prepare_new_run_dir(path: Path, force: bool) -> None:
    from stabilitylab.run import is_run_dir

    if path.exists() and any(path.iterdir()):
        if not force:
            raise UsageError(f"{path} already exists; pick another --out, continue it with "
                             f"--resume {path}, or overwrite it with --force")
        if not is_run_dir(path):
            raise UsageError(f"{path} exists and is not a run directory; refusing to overwrite it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _environment_meta(cfg) -> dict:
    import platform

    import timm
    import torch

    import stabilitylab

    return {
        "stabilitylab": stabilitylab.__version__, "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "host": socket.gethostname(),
        "world_size": int(os.environ.get("WORLD_SIZE", 1)), "seed": cfg.seed,
    }


def cmd_train(args) -> int:
    from stabilitylab.config import config_from_run, config_to_yaml, load_config
    from stabilitylab.rundir import CONFIG_FILE, RunWriter, atomic_write_text, update_meta, utc_now, write_meta

    rank = int(os.environ.get("RANK", 0))
    resume_from = None
    if args.resume:
        from stabilitylab.run import Run

        run_dir = Run(args.resume).path
        if args.config or args.out:
            raise UsageError("--resume continues a run with its own config.yaml; drop --config/--out")
        cfg = config_from_run(run_dir, args.overrides)
        from trainer.checkpoint import latest_checkpoint

        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise UsageError(f"no checkpoint in {run_dir / 'checkpoints'} to resume from")
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else _default_run_dir(cfg)
        if rank == 0:
            _prepare_new_run_dir(run_dir, args.force)

    from trainer import UserError, train
    from trainer.data import BadImageError

    writer = None
    if rank == 0:
        if resume_from is None:
            atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
            write_meta(run_dir, {**_environment_meta(cfg), "start_time": utc_now().isoformat(),
                                 "end_time": None, "status": "running"})
        else:  # config.yaml keeps describing what runs from now on; meta says what changed
            atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
            update_meta(run_dir, status="running", end_time=None, resumed_at=utc_now().isoformat(),
                        resume_overrides=list(args.overrides))
        writer = RunWriter(run_dir, flush_every_steps=cfg.log.flush_every_steps,
                           flush_every_s=cfg.log.flush_every_s,
                           resume_step=None if resume_from is None else resume_from.step)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # schedulers send SIGTERM first
    status, error = "failed", None
    try:
        train(cfg, run_dir=run_dir, writer=writer, resume_from=resume_from)
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        print(f"\ninterrupted; continue with: stabilitylab train --resume {run_dir}", file=sys.stderr)
        return 130
    except (UserError, BadImageError) as exc:
        error = str(exc)
        print(f"stabilitylab train: error: {error}", file=sys.stderr)
        return 1
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise
    finally:
        if writer is not None:
            writer.close(compact=status == "finished")
            writer.update_meta(status=status, end_time=utc_now().isoformat(), error=error)
    if rank == 0:
        print(f"run directory: {run_dir}")
        print(f"next: stabilitylab report {run_dir}")
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------- report / analyze / compare

def cmd_report(args) -> int:
    from stabilitylab.report import write_figures, write_report
    from stabilitylab.run import load_runs

    runs = load_runs(args.runs, lenient=args.lenient)
    output = Path(args.output) if args.output else (
        runs[0].path / "report.html" if len(runs) == 1 else Path("report.html"))
    if output.exists() and output.is_dir():
        raise UsageError(f"{output} is a directory; give a file name with -o")
    write_report(runs, output)
    print(f"report: {output}")
    if args.figures:
        for path in write_figures(runs, Path(args.figures)):
            print(f"figure: {path}")
    return 0


def cmd_analyze(args) -> int:
    from analysis import format_summary, summarize_run
    from stabilitylab.run import load_run

    summary = summarize_run(load_run(args.run, lenient=args.lenient))
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_compare(args) -> int:
    from analysis import compare_runs, seed_spread
    from stabilitylab.run import load_runs

    table = compare_runs(load_runs(args.runs), by=[k for k in args.by.split(",") if k])
    if args.over_seeds:
        table = seed_spread(table)
    if args.csv:
        print(table.to_csv(index=False), end="")
    elif args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        print(table.to_string(index=False))
    return 0


def cmd_replay(args) -> int:
    from stabilitylab.replay import replay_run

    paths = replay_run(args.run, at=args.at, steps=args.steps, mitigations=args.mitigations, force=args.force)
    for path in paths:
        print(f"replay: {path}")
    print(f"next: stabilitylab report {args.run}")
    return 0


def _cmd_sweep(args) -> int:
    from stabilitylab.sweep import cmd_sweep

    return cmd_sweep(args)
