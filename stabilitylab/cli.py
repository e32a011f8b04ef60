"""`stabilitylab` command line: train | report | analyze | compare | sweep | import | linprobe | replay.

User errors (exceptions whose class says `user_error = True`, and missing / existing paths)
print one line to stderr and exit 2 (set STABILITYLAB_DEBUG=1 for a traceback).
`report`, `analyze` and `compare` never import torch.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import sys
import textwrap
import warnings
from pathlib import Path

EXIT_USAGE = 2
LENIENT_HELP = ("read damaged runs anyway: skip corrupt Parquet parts and unreadable "
                "config.yaml / meta.json / segments.json with a warning")


class UsageError(Exception):
    """A mistake in what the user asked for; printed as one line, exit 2."""

    user_error = True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stabilitylab",
        description="Training-stability diagnostics for self-supervised ViTs (MoCo v3).",
        epilog="examples:\n  stabilitylab train\n  stabilitylab analyze runs/my_run\n"
               "  stabilitylab report runs/my_run\n  stabilitylab COMMAND --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train MoCo v3 with full instrumentation into a run directory",
        description=("Train MoCo v3 on a timm ViT, logging per-step loss, per-layer gradient norms "
                    "and a dense kNN curve to a run directory. With no arguments: the CPU preset "
                    "on the sample images in data_samples/ (a few minutes on 2 cores)."),
        epilog="examples:\n  stabilitylab train\n  stabilitylab train model.patch_proj=frozen "
               "optim.base_lr=3e-3\n  stabilitylab train --config vit_small_imagenet "
               "data.path=/data/imagenet\n  torchrun --nproc_per_node=8 -m stabilitylab train "
               "--config vit_base_imagenet")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides, e.g. model.patch_proj=frozen optim.base_lr=3e-3")
    train.add_argument("--config", metavar="FILE", help="YAML config file or preset name from configs/")
    train.add_argument("--out", metavar="DIR", help="run directory (default: runs/<time>-<model>-<patch_proj>)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run from its latest checkpoint (one without a checkpoint starts "
                            "over from step 0; a finished one is left as it is)")
    train.add_argument("--force", action="store_true",
                       help="overwrite an existing run directory at --out (never a folder that is not one)")

    report = sub.add_parser(
        "report", help="write a self-contained HTML report for runs",
        description=("One offline HTML page for one run or a comparison of runs: verdict, kNN curves "
                    "and dips, gradient norms and spikes, the lead-lag test, and for several runs the "
                    "comparison table. Opens in any browser without a network."),
        epilog="examples:\n  stabilitylab report runs/my_run                  # writes runs/my_run/report.html\n"
               "  stabilitylab report runs/sweep -o sweep.html --figures figs/\n"
               "  stabilitylab report runs/a runs/b --spike-rule ratio:10")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, globs, sweep folders "
                        "or folders of sweeps")
    report.add_argument("-o", "--output", metavar="FILE", help="HTML path (default: RUN_DIR/report.html "
                        "for one run, report.html otherwise)")
    report.add_argument("--figures", metavar="DIR", help="also write PNG and PDF figures here")
    _add_reading_options(report)

    analyze = sub.add_parser(
        "analyze", help="print dips, gradient spikes and the lead-lag verdict of a run",
        description=("Summarize one run: final and best kNN top-1, kNN dips in units of the "
                    "evaluation noise, gradient spike events per layer under a spike rule, and "
                    "whether the first layer's spikes lead the last transformer block's."),
        epilog="examples:\n  stabilitylab analyze runs/my_run\n  stabilitylab analyze runs/my_run --json\n"
               "  stabilitylab analyze runs/my_run --spike-rule ratio:10          # paper-style >= 10x only\n"
               "  stabilitylab analyze runs/b512 --spike-rule 'ratio:10,warmup=13'")
    analyze.add_argument("run", metavar="RUN_DIR")
    analyze.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_reading_options(analyze)

    compare = sub.add_parser(
        "compare", help="print a comparison table of runs",
        description=("One row per run (or per setting with --over-seeds): the config keys that differ "
                    "between the runs (keys of how a run ran, such as threads or log.progress, aside: "
                    "--by names one to show it) and each run's kNN, dip and spike metrics. Top-1, dip depth and "
                    "roughness are in percentage points, dip area in points x epochs, spike counts are "
                    "events under the spike rule (n_spikes: in any layer)."),
        epilog="examples:\n  stabilitylab compare runs/sweep\n"
               "  stabilitylab compare runs/findings --over-seeds --by model.patch_proj,optim.base_lr\n"
               "  stabilitylab compare runs/a runs/b --csv > table.csv\n"
               "  stabilitylab compare runs/sweep --spike-rule 'ratio:10,warmup=13' --json")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, globs, sweep folders "
                         "or folders of sweeps")
    compare.add_argument("--by", metavar="KEYS",
                         help="config key(s) that name the variant, comma-separated, always shown "
                              "(default: model.patch_proj when the runs have it)")
    compare.add_argument("--over-seeds", action="store_true",
                         help="one row per setting: mean and standard deviation over its seeds")
    _add_reading_options(compare)
    fmt = compare.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV instead of a text table")
    fmt.add_argument("--json", action="store_true", help="JSON records instead of a text table")

    from stabilitylab.importers import add_import_parser
    from stabilitylab.linprobe import add_linprobe_parser
    from stabilitylab.replay import add_replay_parser
    from stabilitylab.sweep import add_sweep_parser

    for add_command_parser in (add_sweep_parser, add_import_parser, add_linprobe_parser, add_replay_parser):
        add_command_parser(sub)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)  # a bad flag shows its own usage
        command_parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the examples' lines
        command_parser.description = _wrapped(command_parser.description)
    return parser


def _wrapped(text: str) -> str:
    """A --help description filled to 88 columns (the raw formatter would leave it one long line)."""
    return textwrap.fill(text, 88)


def _add_reading_options(parser) -> None:
    """--spike-rule and --lenient, the options of every command that reads runs."""
    parser.add_argument("--spike-rule", metavar="RULE",
                        help="what counts as a gradient spike: tests mad:Z, sigma:Z, ratio:R joined by + "
                             "(and) and | (or), then ,window=W and ,warmup=N, e.g. ratio:10,warmup=13 "
                             "(default: analysis.DEFAULT_RULE, see docs/analysis.md)")
    parser.add_argument("--lenient", action="store_true", help=LENIENT_HELP)


def _spike_rule(text):
    """The SpikeRule of a --spike-rule value (None: the default); a bad one is a UsageError."""
    from analysis import SpikeRule

    try:
        return SpikeRule.parse(text)
    except ValueError as exc:
        raise UsageError(f"--spike-rule: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`sweep --grid a=1,2 --seeds 3 b=4`): argparse
    # fills a positional list only once, so later ones arrive here and join the list
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    handlers = {"train": cmd_train, "report": cmd_report, "analyze": cmd_analyze,
                "compare": cmd_compare, "sweep": _cmd_sweep, "import": _cmd_import,
                "linprobe": _cmd_linprobe, "replay": _cmd_replay}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(
                f"stabilitylab {args.command}: warning: {message}", file=sys.stderr)
            return handlers[args.command](args) or 0
    except Exception as exc:
        if os.environ.get("STABILITYLAB_DEBUG") or not _is_user_error(exc):
            raise
        message = _error_line(exc)
        print(f"stabilitylab {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def _error_line(exc: Exception) -> str:
    """A user error as one line; an OSError from the system as `PATH: reason`, without `[Errno N]`."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _version() -> str:
    from stabilitylab import __version__

    return __version__


def _is_user_error(exc: Exception) -> bool:
    """Errors that mark themselves `user_error = True` (in every package: the trainer and
    analysis cannot import a base class from here) and the system's path mistakes."""
    return getattr(exc, "user_error", False) or isinstance(
        exc, (FileNotFoundError, FileExistsError, NotADirectoryError))


# ---------------------------------------------------------------- train

def _default_run_dir(cfg) -> Path:
    from datetime import datetime

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.preset}-{cfg.model.patch_proj}"


def _prepare_new_run_dir(path: Path, force: bool) -> None:
    """Make `path` (locked by the caller) ready for a new run, refusing to lose anything.

    A run directory holding nothing worth keeping (a run that failed or was killed before
    its first step: no step, no checkpoint) is reused; other contents need --force, which
    only ever deletes a run directory.
    """
    from stabilitylab.rundir import (CHECKPOINT_DIR, LOCK_FILE, META_FILE, RUN_ENTRIES, is_run_dir,
                                     read_meta, read_table)

    entries = [p for p in path.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return
    ours = is_run_dir(path) or all(p.name in RUN_ENTRIES for p in entries)
    if force and not ours:
        raise UsageError(f"{path} exists and is not a run directory; refusing to overwrite it")
    if not force:
        meta = read_meta(path) if (path / META_FILE).exists() else {}
        if not ours or meta.get("status") == "finished" or any((path / CHECKPOINT_DIR).glob("step-*.pt")):
            raise UsageError(f"{path} already exists; pick another --out, continue it with "
                             f"--resume {path}, or overwrite it with --force")
        n_steps = len(read_table(path, "steps", columns=["step"], as_arrow=True))
        if n_steps:
            raise UsageError(f"{path} holds {n_steps} logged steps of a run stopped before its first "
                             f"checkpoint; start it over from step 0 with --resume {path} (those rows "
                             f"are superseded), pick another --out, or overwrite it with --force")
        print(f"reusing {path}: its run stopped before its first step", file=sys.stderr)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


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
    from stabilitylab.config import config_from_run, load_config
    from stabilitylab.rundir import RunLock

    rank = int(os.environ.get("RANK", 0))
    lock = None
    if args.resume:
        from stabilitylab.run import Run

        if args.config or args.out:
            raise UsageError("--resume continues a run with its own config.yaml; drop --config/--out")
        run_dir = Run(args.resume).path
        if rank == 0:
            lock = RunLock(run_dir)  # before reading anything: a second --resume stops here
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.out) if args.out else _default_run_dir(cfg)
        if rank == 0:
            lock = RunLock(run_dir)  # creates the folder; a second `train --out` stops here
    try:
        if args.resume:
            cfg = config_from_run(run_dir, args.overrides)
        elif rank == 0:
            _prepare_new_run_dir(run_dir, args.force)
        return _train(args, cfg, run_dir, lock, rank)
    finally:
        if lock is not None:
            lock.release()  # no-op once the run writer has released it


def _train(args, cfg, run_dir: Path, lock, rank: int) -> int:
    """Load the checkpoint to resume (nothing is written before it loaded), open the run
    writer, train, and record how the run ended."""
    from stabilitylab.config import config_to_yaml
    from stabilitylab.rundir import CONFIG_FILE, RunWriter, atomic_write_text, read_meta, utc_now, write_meta
    from trainer import Trainer, UserError
    from trainer import distributed as dist_utils
    from trainer.checkpoint import load_latest_checkpoint
    from trainer.data import BadImageError

    say = print if rank == 0 else (lambda *args, **kwargs: None)
    resume = None
    if args.resume:
        resume = load_latest_checkpoint(run_dir)
        if resume is None and read_meta(run_dir).get("status") == "finished":
            raise UsageError(f"no checkpoint in {run_dir / 'checkpoints'} to resume from")
        for warning in resume[2] if resume else []:
            say(f"stabilitylab train: warning: {warning}", file=sys.stderr)

    def open_writer(resume_step=None):
        return RunWriter(run_dir, flush_every_steps=cfg.log.flush_every_steps,
                         flush_every_s=cfg.log.flush_every_s, resume_step=resume_step, lock=lock)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # schedulers send SIGTERM first
    writer, status, error, code = None, "failed", None, 1
    try:
        if rank == 0 and not args.resume:
            atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(cfg))
            write_meta(run_dir, {**_environment_meta(cfg), "start_time": utc_now().isoformat(),
                                 "end_time": None, "status": "running"})
            writer = open_writer()
        trainer = Trainer(cfg, run_dir, writer)
        if args.resume:
            if resume is not None:
                trainer.resume(resume[0], resume[1])
                if trainer.step >= trainer.total_steps and read_meta(run_dir).get("status") == "finished":
                    say(f"{run_dir} already finished at step {trainer.step - 1} of {trainer.total_steps}; "
                        "nothing to do (raise optim.epochs or optim.max_steps to train longer)")
                    return 0
            else:
                say(f"{run_dir} has no checkpoint: starting it over from step 0 (the rows it "
                    "logged are superseded)", file=sys.stderr)
            if rank == 0:
                writer = open_writer(resume[0].step if resume else -1)
                trainer.log_to(writer)
                _record_resume(writer, cfg, args.overrides, resume)
        if trainer.step < trainer.total_steps:  # a resume after the last step only finishes up
            trainer.fit()
        status, code = "finished", 0
    except KeyboardInterrupt:
        status, code = "interrupted", 130
        say(f"\ninterrupted; continue with: stabilitylab train --resume {run_dir}", file=sys.stderr)
    except (UserError, BadImageError) as exc:
        error = str(exc)
        say(f"stabilitylab train: error: {error}", file=sys.stderr)
    except OSError as exc:
        error = _one_line(exc)
        if exc.errno not in _WRITE_FAILURES:
            raise  # e.g. a missing data folder: a usage error, printed by main()
        say(f"stabilitylab train: error: {error}", file=sys.stderr)
    except Exception as exc:
        error = _one_line(exc)
        raise
    finally:
        dist_utils.teardown()
        if writer is not None:
            status, error, code = _close_run(writer, status, error, code)
    if code == 0:
        say(f"run directory: {run_dir}")
        say(f"next: stabilitylab report {run_dir}")
    return code


# a disk that is full, read-only, over quota or failing: the run fails with one line
_WRITE_FAILURES = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EFBIG)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and " while writing " in exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _record_resume(writer, cfg, overrides: list[str], resume) -> None:
    """config.yaml describes what runs from now on; meta.json and the events say what
    changed against the checkpoint's config (a hand-edited config.yaml, overrides)."""
    from dataclasses import asdict

    from stabilitylab.config import config_to_yaml
    from stabilitylab.rundir import CONFIG_FILE, atomic_write_text, read_meta, utc_now
    from trainer.config import config_differences

    start = writer.start_step
    changes = config_differences(resume[1].get("config", {}), asdict(cfg)) if resume else []
    atomic_write_text(writer.run_dir / CONFIG_FILE, config_to_yaml(cfg))
    recorded = read_meta(writer.run_dir).get("config_changes", [])
    writer.update_meta(status="running", end_time=None, error=None, resumed_at=utc_now().isoformat(),
                       resume_overrides=list(overrides),
                       config_changes=recorded + [{"step": start, "key": key, "checkpoint": old, "now": new}
                                                  for key, old, new in changes])
    writer.event(start, "resumed", f"from {resume[0].path.name}" if resume else "from step 0: no checkpoint")
    for key, old, new in changes:
        writer.event(start, "config_change", f"{key}: {old!r} -> {new!r} (checkpoint -> config.yaml and overrides)")


def _close_run(writer, status: str, error: str | None, code: int) -> tuple[str, str | None, int]:
    """Flush (and compact a finished run), record the status, then release the lock. A disk
    that refuses these writes makes the run fail with one line, never a second traceback."""
    from stabilitylab.rundir import utc_now

    try:
        if status == "finished":
            writer.compact()
        else:
            writer.flush()
    except OSError as exc:
        if error is None:  # the first failure is the one to report
            status, error, code = "failed", _one_line(exc), 1
            print(f"stabilitylab train: error: {error}", file=sys.stderr)
    try:
        writer.update_meta(status=status, end_time=utc_now().isoformat(), error=error)
    except OSError:
        pass  # the disk refuses even meta.json; the error line above says why
    try:
        writer.close(compact=False)
    except OSError:
        pass  # rows the disk refused stay unwritten; the lock is released all the same
    return status, error, code


# ---------------------------------------------------------------- report / analyze / compare

def cmd_report(args) -> int:
    from stabilitylab.report import write_figures, write_report
    from stabilitylab.run import load_runs

    rule = _spike_rule(args.spike_rule)
    runs = load_runs(args.runs, lenient=args.lenient)
    output = Path(args.output) if args.output else (
        runs[0].path / "report.html" if len(runs) == 1 else Path("report.html"))
    if output.exists() and output.is_dir():
        raise UsageError(f"{output} is a directory; give a file name with -o")
    if output.exists() and output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"{output} exists and is not an HTML file; refusing to overwrite it")
    if args.figures:  # before the report is written: a bad folder refuses the whole command
        if Path(args.figures).exists() and not Path(args.figures).is_dir():
            raise UsageError(f"--figures {args.figures} is a file; give a folder for the figures")
        Path(args.figures).mkdir(parents=True, exist_ok=True)
    write_report(runs, output, rule=rule)
    print(f"report: {output}")
    if args.figures:
        for path in write_figures(runs, Path(args.figures), rule=rule):
            print(f"figure: {path}")
    return 0


def cmd_analyze(args) -> int:
    from analysis import format_summary, summarize_run
    from stabilitylab.run import load_run

    rule = _spike_rule(args.spike_rule)
    summary = summarize_run(load_run(args.run, lenient=args.lenient), rule=rule)
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_compare(args) -> int:
    from analysis import compare_runs, display_table, seed_spread
    from stabilitylab.run import load_runs

    rule = _spike_rule(args.spike_rule)
    by = None if args.by is None else [k for k in args.by.split(",") if k]
    table = compare_runs(load_runs(args.runs, lenient=args.lenient), by=by, rule=rule)
    if args.over_seeds:
        table = seed_spread(table)
    table = display_table(table)
    if args.csv:
        print(table.to_csv(index=False), end="")
    elif args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        print(text_table(table))
    return 0


def text_table(table) -> str:
    """A display table as text wrapped to the terminal's width, numbers without exponents
    or trailing zeros where possible."""
    return table.to_string(index=False, line_width=shutil.get_terminal_size().columns,
                           float_format="{:g}".format)


def _cmd_sweep(args) -> int:
    from stabilitylab.sweep import cmd_sweep

    return cmd_sweep(args)


def _cmd_import(args) -> int:
    from stabilitylab.importers import cmd_import

    return cmd_import(args)


def _cmd_replay(args) -> int:
    from stabilitylab.replay import cmd_replay

    return cmd_replay(args)


def _cmd_linprobe(args) -> int:
    from stabilitylab.linprobe import cmd_linprobe

    return cmd_linprobe(args)
