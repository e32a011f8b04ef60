"""`stabilitylab linprobe RUN_DIR`: linear-probe a run's checkpoints into its `linear` table.

The run's own config.yaml says how to build the backbone and which data to use; KEY=VALUE
overrides may change only the data (data.*), device, precision and threads. The torch side
(protocols, values) is trainer/linprobe.py; docs/linear_probe.md explains both.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from stabilitylab.config import ConfigError
from trainer.config import ProbeConfig

PROBE_OVERRIDES = ("data.", "device=", "precision=", "threads=")


def add_linprobe_parser(sub) -> None:
    p = sub.add_parser(
        "linprobe", help="linear-probe a run's checkpoints (the paper's accuracy yardstick)",
        description="Train a linear classifier on the frozen backbone of a run's checkpoint and "
                    "write its held-out top-1 / top-5 to the run's `linear` table. Protocols: "
                    "official (main_lincls.py: 90 epochs of SGD on augmented images; the default "
                    "on a GPU) and fast (features once, L-BFGS; the default on a CPU: about a "
                    "minute for the CIFAR sample). See docs/linear_probe.md.",
        epilog="examples:\n  stabilitylab linprobe runs/frozen\n"
               "  stabilitylab linprobe runs/frozen --every-checkpoint\n"
               "  stabilitylab linprobe runs/vit_small --protocol official device=cuda data.num_workers=16\n"
               "  stabilitylab linprobe runs/tiny data.path=/data/cifar10 --step 311")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="data.* (e.g. data.path, data.num_workers), device, precision or threads "
                        "instead of the run's own")
    p.add_argument("--protocol", choices=("auto", "official", "fast"), default="auto",
                   help="auto (default): official on a GPU, fast on a CPU")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--every-checkpoint", action="store_true",
                       help="probe every kept checkpoint (a coarse linear curve; train with "
                            "checkpoint.keep=0 to keep them all) instead of the latest")
    which.add_argument("--step", type=int, metavar="N", help="probe the checkpoint of step N")
    p.add_argument("--no-bn", action="store_true",
                   help="no BatchNorm before the linear layer (main_lincls.py exactly; use with "
                        "--lr 3 for its ViT value)")
    defaults = ProbeConfig()  # every protocol setting's default lives there
    official = p.add_argument_group("official protocol")
    official.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    official.add_argument("--batch-size", type=int, default=defaults.batch_size,
                          help=f"default {defaults.batch_size}")
    official.add_argument("--lr", type=float, default=defaults.base_lr, metavar="BASE_LR",
                          help=f"base lr; lr = BASE_LR x batch / 256 (default {defaults.base_lr:g})")
    official.add_argument("--wd", type=float, default=defaults.weight_decay,
                          help=f"weight decay (default {defaults.weight_decay:g})")
    fast = p.add_argument_group("fast protocol")
    fast.add_argument("--l2", type=float, default=defaults.l2,
                      help=f"L2 penalty (l2/2)||W||^2 (default {defaults.l2:g})")
    fast.add_argument("--max-iter", type=int, default=defaults.max_iter,
                      help=f"L-BFGS iterations at most (default {defaults.max_iter})")


def _probe_config(cfg, args, protocol):
    for name, value in [("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--max-iter", args.max_iter)]:
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not (0 < args.lr < math.inf):
        raise ConfigError(f"--lr must be > 0, got {args.lr}")
    for name, value in [("--wd", args.wd), ("--l2", args.l2)]:
        if not (0 <= value < math.inf):
            raise ConfigError(f"{name} must be >= 0, got {value}")
    return ProbeConfig(protocol=protocol, batchnorm=not args.no_bn, seed=cfg.seed, epochs=args.epochs,
                       batch_size=args.batch_size, base_lr=args.lr, weight_decay=args.wd,
                       l2=args.l2, max_iter=args.max_iter)


def _checkpoints(run_dir: Path, args):
    from trainer.checkpoint import latest_checkpoint, list_checkpoints
    from trainer.linprobe import LinearProbeError

    found = list_checkpoints(run_dir)
    if not found:
        raise LinearProbeError(f"no checkpoint in {run_dir / 'checkpoints'}: linprobe probes a checkpoint's "
                               f"backbone (training saves one every checkpoint.every_steps steps and at "
                               f"the end; checkpoint.keep=0 keeps them all)")
    if args.step is not None:
        chosen = [c for c in found if c.step == args.step]
        if not chosen:
            raise LinearProbeError(f"no checkpoint of step {args.step} in {run_dir / 'checkpoints'}; "
                                   f"steps there: {', '.join(str(c.step) for c in found)}")
        return chosen
    return found if args.every_checkpoint else [latest_checkpoint(run_dir)]


def _check_model(state: dict, cfg, checkpoint) -> None:
    """Refuse a checkpoint written with another model config than the run's config.yaml."""
    from trainer.linprobe import LinearProbeError

    saved = (state.get("config") or {}).get("model") if isinstance(state, dict) else None
    if saved is None or "model" not in state:
        raise LinearProbeError(f"{checkpoint.path} is not a stabilitylab training checkpoint "
                               f"(no model weights and config in it)")
    ours = asdict(cfg.model)
    differ = [k for k in ours if saved.get(k) != ours[k]]
    if differ:
        shown = ", ".join(f"model.{k}={saved.get(k)!r} (config.yaml: {ours[k]!r})" for k in differ[:3])
        raise LinearProbeError(f"{checkpoint.path.name} was written by another model config: {shown}; "
                               f"probe it with the config it was trained with")


def _data_changes(run_cfg, cfg) -> list[str]:
    """`data.KEY=VALUE` for each data setting of the probe that differs from the run's (the
    data keys of `analysis.RUNTIME_KEYS` aside, the loader workers and the decoded-image cache:
    they do not change the images)."""
    from analysis import RUNTIME_KEYS

    ours, theirs = asdict(cfg.data), asdict(run_cfg.data)
    return [f"data.{k}={v}" for k, v in ours.items() if v != theirs[k] and f"data.{k}" not in RUNTIME_KEYS]


def _check_classes(data, run_cfg, cfg) -> None:
    """Refuse probe data whose classes differ from those of the data the run trained on."""
    from trainer.data import build_datasets
    from trainer.linprobe import LinearProbeError

    if not _data_changes(run_cfg, cfg):
        return
    try:
        trained_on = build_datasets(run_cfg.data, run_cfg.model.img_size, run_cfg.seed).classes
    except (FileNotFoundError, ValueError):
        print(f"stabilitylab linprobe: warning: the run's training data ({run_cfg.data.path}) is not "
              f"here, so the probe data's classes cannot be checked against it", file=sys.stderr)
        return
    if data.classes != trained_on:
        extra = sorted(set(data.classes) - set(trained_on))[:3]
        lacking = sorted(set(trained_on) - set(data.classes))[:3]
        raise LinearProbeError(
            f"the classes of {cfg.data.path} differ from those the run trained on "
            f"({len(data.classes)} vs {len(trained_on)}; new: {extra or 'none'}, missing: "
            f"{lacking or 'none'}{'' if extra or lacking else ', other order'})")


def cmd_linprobe(args) -> int:
    import torch

    from stabilitylab.config import config_from_run
    from stabilitylab.run import Run, read_table
    from stabilitylab.rundir import RunWriter, read_segments
    from trainer.checkpoint import load_checkpoint
    from trainer.data import build_datasets
    from trainer.linprobe import LinearProbeError, load_backbone, probe
    from trainer.loop import UserError, pick_device, pick_precision

    run = Run(args.run)
    bad = [o for o in args.overrides if not o.startswith(PROBE_OVERRIDES)]
    if bad:
        raise ConfigError(f"linprobe takes only data.*, device, precision and threads overrides "
                          f"(the model comes from the checkpoint), not {bad[0]!r}")
    if read_segments(run.path) is None:
        raise LinearProbeError(f"{run.path} has no segments.json (not written by stabilitylab's "
                               f"RunWriter), so a probe cannot add its table safely")
    run_cfg = config_from_run(run.path)
    cfg = config_from_run(run.path, args.overrides)
    checkpoints = _checkpoints(run.path, args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        device = pick_device(cfg.device, 0)
        precision = pick_precision(cfg.precision, device)
    except UserError as exc:
        raise LinearProbeError(str(exc)) from None
    protocol = args.protocol if args.protocol != "auto" else ("official" if device.type == "cuda" else "fast")
    probe_cfg = _probe_config(cfg, args, protocol)
    try:
        data = build_datasets(cfg.data, cfg.model.img_size, cfg.seed)
    except ValueError as exc:  # e.g. class folders that differ between the splits
        raise LinearProbeError(str(exc)) from None
    _check_classes(data, run_cfg, cfg)
    data_note = "".join(f" {change}" for change in _data_changes(run_cfg, cfg))

    def backbone_of(checkpoint):
        state = load_checkpoint(checkpoint)
        _check_model(state, cfg, checkpoint)
        return load_backbone(cfg.model, state).to(device)

    first = backbone_of(checkpoints[0])  # a checkpoint that does not fit fails before any output
    print(f"linprobe {run.path}: {protocol} protocol ({probe_cfg.settings()}{data_note}) on {device}, "
          f"{len(data.train_plain)} train / {len(data.val_plain)} val images, "
          f"{len(checkpoints)} checkpoint(s)", file=sys.stderr)

    writer = None
    try:
        for i, checkpoint in enumerate(checkpoints):
            backbone, first = (first if i == 0 else backbone_of(checkpoint)), None
            row = probe(backbone, data, probe_cfg, device=device, precision=precision,
                        num_workers=cfg.data.num_workers, progress=True)
            row.update(step=checkpoint.step, settings=row["settings"] + data_note,
                       time=datetime.now(timezone.utc))
            if writer is None:  # opened with the first result: a refused probe writes nothing
                writer = RunWriter(run.path, append=True)  # supersedes no row of the run
            writer.append("linear", {key: [value] for key, value in row.items()})
            writer.event(checkpoint.step, "linprobe",
                         f"{protocol}: top-1 {row['top1']:.2%}, top-5 {row['top5']:.2%} "
                         f"({row['n_train']} train / {row['n_val']} val images)")
            writer.flush()
            print(f"step {checkpoint.step}: {protocol} linear top-1 {100 * row['top1']:.1f}%, "
                  f"top-5 {100 * row['top5']:.1f}% ({row['n_val']} val images)")
    finally:
        if writer is not None:
            writer.close(compact=False)
    knn = read_table(run.path, "knn", columns=["source", "top1"])
    val = knn[knn["source"] == "val"]
    if len(val):
        print(f"(fresh-bank kNN top-1 at step {int(val['step'].iloc[-1])}: {100 * val['top1'].iloc[-1]:.1f}%)")
    print(f"written to {run.path / 'linear'}; next: stabilitylab compare {run.path}")
    return 0
