"""`stabilitylab replay`: rerun the steps around a spike from a checkpoint, unchanged and with
mitigations, each into a child run directory `RUN_DIR/replays/NAME/`.

A replay of `--at STEP --steps N` restores the newest checkpoint from which step STEP can be
rerun (a regular one in `checkpoints/` or a pre-spike one in `spikes/checkpoints/`, taken
with `on_spike=checkpoint`) and trains from there to step STEP + N - 1 on the same batches
with the same augmentations (the sampler's per-sample seeds make them a function of the
step). The unchanged replay reproduces the original run bit for bit on the CPU; each
`--with KEY=VALUE` replay changes one config key at the checkpoint. Only keys that can
change mid-run are accepted (`MID_RUN_KEYS`); a different model shape, data order or
optimizer is refused with one line. Replays of a run with `on_spike=checkpoint` only log
their spikes (`--with on_spike=checkpoint` to take checkpoints there too). `model.patch_proj=frozen` freezes the *current* weights
of the patch projection (not a fresh random one as a run started frozen has); the momentum
encoder's copy stays at its own current weights.

Children are complete run directories (their `meta.json` says `source: stabilitylab
replay` and what was replayed); `find_replays(run)` lists them for the report.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stabilitylab.config import config_from_run, config_to_yaml, load_config
from stabilitylab.rundir import (CONFIG_FILE, RunWriter, atomic_write_text, is_run_dir, read_meta, update_meta,
                                 utc_now, write_meta)

if TYPE_CHECKING:  # stabilitylab.run (pandas) is imported where runs are read, not for --help
    from stabilitylab.run import Run
from trainer.config import config_differences
from trainer.schedules import scaled_lr

REPLAYS = "replays"
SOURCE = "stabilitylab replay"
# config keys a replay may change at the checkpoint: they act from the next step on without a
# different model shape, data order or optimizer state
MID_RUN_KEYS = (
    "optim.base_lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.momentum",
    "moco.m", "moco.m_cos", "moco.temperature", "model.patch_proj", "model.patch_proj_clip",
    "on_spike", "max_spike_skips", "max_nonfinite_steps", "log.spike_rule", "log.spike_detect",
    "log.optim_state", "log.attention_every", "log.attention_samples", "knn.every",
)
# patch projection variants a replay can switch between: same parameters, or the same minus
# the frozen projection
PATCH_PROJ_CHANGES = {("learned", "frozen"), ("learned", "clip"), ("clip", "learned"), ("clip", "frozen")}
OPTIMIZER_KEYS = ("betas", "eps", "momentum")


class ReplayError(ValueError):
    """A replay that cannot be done as asked (one line; the CLI exits 2)."""

    user_error = True


@dataclass(frozen=True)
class Replay:
    """One planned child run: its directory, the override (None = unchanged) and its config."""

    path: Path
    mitigation: str | None
    config: object  # trainer.config.TrainConfig


def _slug(mitigation: str | None) -> str:
    if mitigation is None:
        return "unchanged"
    key, _, value = mitigation.partition("=")
    return f"{key}-" + (re.sub(r"[^A-Za-z0-9.+-]+", "_", value).strip("_") or "none")


def choose_checkpoint(run_dir: Path, at: int):
    """The newest checkpoint (regular or pre-spike) from which step `at` can be rerun."""
    from trainer.checkpoint import list_checkpoints
    from trainer.loop import SPIKE_CHECKPOINTS

    found = list_checkpoints(run_dir) + list_checkpoints(run_dir / SPIKE_CHECKPOINTS)
    usable = [c for c in found if c.step < at]
    if not usable:
        have = ", ".join(str(c.step) for c in sorted(found, key=lambda c: c.step)) or "none"
        raise ReplayError(f"no checkpoint before step {at} in {run_dir} (checkpoints after steps: {have}); "
                          f"keep more with checkpoint.keep, or take them with on_spike=checkpoint")
    return max(usable, key=lambda c: c.step)


def plan_replays(run_dir, *, at: int, steps: int, mitigations=(), force: bool = False) -> tuple[object, list[Replay]]:
    """(checkpoint, [Replay]) for `replay_run`; every refusal happens here, before any work."""
    from stabilitylab.run import Run

    run = Run(run_dir)
    if steps < 1:
        raise ReplayError(f"--steps {steps}: replay at least one step")
    last = int(run.steps["step"].max()) if len(run.steps) else -1
    if not 1 <= at <= last:
        raise ReplayError(f"--at {at} is outside the run's steps 1..{last}")
    checkpoint = choose_checkpoint(run.path, at)
    steps = min(steps, last + 1 - at)  # no further than the run went: nothing to compare after
    parent = config_from_run(run.path)
    # a replay stops at the window's end and takes no pre-spike checkpoints of its own unless asked
    own = [f"optim.max_steps={at + steps}"] + (["on_spike=log"] if parent.on_spike == "checkpoint" else [])
    base = asdict(load_config(run.path / CONFIG_FILE, own))
    replays = []
    for mitigation in [None, *mitigations]:
        if mitigation is not None and "=" not in mitigation:
            raise ReplayError(f"--with {mitigation!r} is not of the form KEY=VALUE")
        cfg = load_config(run.path / CONFIG_FILE, own + ([mitigation] if mitigation else []))
        changed = {key for key, _, _ in config_differences(base, asdict(cfg))}
        if mitigation is not None:
            if not changed:
                raise ReplayError(f"--with {mitigation} is the run's own value: that replay is the unchanged one")
            refused = sorted(changed - set(MID_RUN_KEYS))
            if refused:
                raise ReplayError(f"--with {mitigation}: {refused[0]} cannot change mid-run (model shape, data "
                                  f"or optimizer state); a replay can change {', '.join(MID_RUN_KEYS)}")
            old, new = parent.model.patch_proj, cfg.model.patch_proj
            if old != new and (old, new) not in PATCH_PROJ_CHANGES:
                raise ReplayError(f"--with {mitigation}: model.patch_proj cannot change from {old} to {new} "
                                  f"mid-run (other parameters); possible: learned -> frozen or clip, clip -> "
                                  f"learned or frozen")
        replays.append(Replay(run.path / REPLAYS / f"s{at}_n{steps}_{_slug(mitigation)}", mitigation, cfg))
    for replay in replays:
        path = replay.path
        if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
            raise ReplayError(f"{path} exists and is not a run directory; refusing to overwrite it")
        if path.exists() and not force and not _finished(path):
            raise ReplayError(f"{path} exists and is not a finished replay; remove it or pass --force")
    return checkpoint, replays


def _finished(path: Path) -> bool:
    return is_run_dir(path) and read_meta(path).get("status") == "finished"


def apply_mitigation(trainer, cfg, parent) -> None:
    """Make a trainer restored from a checkpoint of the `parent` config train as `cfg` says:
    the optimizer hyper-parameters the checkpoint restored, and a patch projection frozen now."""
    for group in trainer.optimizer.param_groups:
        for key in OPTIMIZER_KEYS:
            if key in group:
                value = getattr(cfg.optim, key)
                group[key] = tuple(float(v) for v in value) if key == "betas" else value
        if group["weight_decay"] == parent.optim.weight_decay:  # groups without decay keep 0
            group["weight_decay"] = cfg.optim.weight_decay
    trainer.cfg = cfg
    trainer.peak_lr = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
    if cfg.model.patch_proj == parent.model.patch_proj:
        return
    from trainer.model import patch_proj_parameters

    if cfg.model.patch_proj == "frozen":
        proj = trainer.model.backbone.patch_embed.proj
        frozen = {id(p) for p in proj.parameters()}
        proj.requires_grad_(False)  # MoCo's momentum update skips it from now on, in both encoders
        for group in trainer.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in frozen]
        for p in proj.parameters():
            trainer.optimizer.state.pop(p, None)
        trainer.build_probes()
        if trainer.spikes is not None:
            trainer.spikes = trainer.spikes.select(trainer.probe.layer_names)
    trainer.clip_params = (patch_proj_parameters(trainer.model.backbone)
                           if cfg.model.patch_proj == "clip" else [])


def run_replay(replay: Replay, checkpoint, parent_dir: Path, *, at: int, steps: int) -> None:
    """Train one planned replay into its child directory."""
    from stabilitylab.cli import _environment_meta
    from trainer import UserError
    from trainer.checkpoint import load_checkpoint
    from trainer.distributed import teardown
    from trainer.loop import Trainer

    if replay.path.exists():
        shutil.rmtree(replay.path)
    cfg = replay.config
    parent = config_from_run(parent_dir, [f"optim.max_steps={cfg.optim.max_steps}", f"on_spike={cfg.on_spike}"])
    # a projection frozen from the start has no optimizer state: build as the checkpoint was
    freezes = cfg.model.patch_proj == "frozen" and parent.model.patch_proj != "frozen"
    build = parent if freezes else cfg
    atomic_write_text(_mkdir(replay.path) / CONFIG_FILE, config_to_yaml(cfg))
    write_meta(replay.path, {
        **_environment_meta(cfg), "source": SOURCE, "start_time": utc_now().isoformat(), "end_time": None,
        "status": "running",
        "replay": {"parent": os.path.relpath(parent_dir, replay.path), "at": at, "steps": steps,
                   "checkpoint": os.path.relpath(checkpoint.path, parent_dir), "from_step": checkpoint.step,
                   "mitigation": replay.mitigation}})
    writer = RunWriter(replay.path, flush_every_steps=cfg.log.flush_every_steps,
                       flush_every_s=cfg.log.flush_every_s, resume_step=checkpoint.step)
    status, error = "failed", None
    try:
        trainer = Trainer(build, replay.path, writer, source=SOURCE)
        trainer.load_state_dict(load_checkpoint(checkpoint, map_location=trainer.device))
        apply_mitigation(trainer, cfg, parent)
        writer.event(checkpoint.step, "replay", f"from {os.path.relpath(checkpoint.path, parent_dir)}: "
                                                f"{replay.mitigation or 'unchanged'}")
        trainer.fit()
        status = "finished"
    except UserError as exc:  # a replay that diverges is a result: keep it, go on with the next
        error = str(exc)
        print(f"replay {replay.path.name}: stopped: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        writer.close(compact=status == "finished")
        update_meta(replay.path, status=status, end_time=utc_now().isoformat(), error=error)
        teardown()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def replay_run(run_dir, *, at: int, steps: int = 200, mitigations=(), force: bool = False) -> list[Path]:
    """Replay steps `at`..`at + steps - 1` of a run unchanged and once per mitigation
    ("KEY=VALUE"); returns the child run directories (finished ones are kept unless `force`)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ReplayError("replay runs in one process; start it without torchrun")
    checkpoint, replays = plan_replays(run_dir, at=at, steps=steps, mitigations=mitigations, force=force)
    parent_dir = Path(run_dir)
    first, last = checkpoint.step + 1, replays[0].config.optim.max_steps - 1
    for i, replay in enumerate(replays, start=1):
        what = replay.mitigation or "unchanged"
        if replay.path.exists() and not force:
            print(f"replay {i}/{len(replays)} {what}: kept {replay.path} (--force to redo)")
            continue
        print(f"replay {i}/{len(replays)} {what}: steps {first}-{last} from "
              f"{os.path.relpath(checkpoint.path, parent_dir)} -> {replay.path}", flush=True)
        run_replay(replay, checkpoint, parent_dir, at=at, steps=last + 1 - at)
    return [r.path for r in replays]


def find_replays(run) -> list[Run]:
    """The finished and unfinished replays under a run (`Run` or path), by name."""
    from stabilitylab.run import load_run

    folder = Path(getattr(run, "path", run)) / REPLAYS
    return [load_run(p) for p in sorted(folder.iterdir()) if is_run_dir(p)] if folder.is_dir() else []


def add_replay_parser(sub) -> None:
    """The `stabilitylab replay` subcommand."""
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
               "  stabilitylab compare runs/a/replays/s1200_n200_*   # the replays side by side")
    replay.add_argument("run", metavar="RUN_DIR")
    replay.add_argument("--at", type=int, required=True, metavar="STEP", help="first step of the window to compare")
    replay.add_argument("--steps", type=int, default=200, metavar="N", help="steps in the window (default 200)")
    replay.add_argument("--with", dest="mitigations", action="append", default=[], metavar="KEY=VALUE",
                        help="one replay with this config change (repeatable)")
    replay.add_argument("--force", action="store_true", help="redo replays that already exist")


def cmd_replay(args) -> int:
    paths = replay_run(args.run, at=args.at, steps=args.steps, mitigations=args.mitigations, force=args.force)
    for path in paths:
        print(f"replay: {path}")
    print(f"next: stabilitylab report {args.run}")
    return 0
