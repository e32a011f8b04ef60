"""The fault suite (issue 17): a hostile or clumsy user, a killed process, a full or read-only
disk, concurrent writers, damaged files. Each test names the defect it guards against.

Training processes are forked from a forkserver that imported torch once, so that a dozen
killed-and-resumed runs fit in CI's time.
"""
import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab.cli import main
from stabilitylab.rundir import RunInUseError, RunWriter

pytestmark = pytest.mark.slow

TINY = [
    "data.dataset=synthetic", "data.synthetic_size=96", "data.num_workers=0", "model.img_size=16",
    "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.head_hidden_dim=64", "model.head_out_dim=32", "optim.batch_size=16", "optim.epochs=2",
    "optim.warmup_epochs=0.5", "knn.every=2", "knn.val_size=48", "threads=1", "log.progress=false",
]
# 48 steps, a checkpoint every 2 (the newest two kept) and a flush every 3: rows ahead of the
# newest checkpoint are on disk at most moments, so a resume supersedes some
LONG = [*TINY, "optim.epochs=8", "checkpoint.every_steps=2", "log.flush_every_steps=3"]
# the SIGKILL test's run: 384 steps, so that 11 kill-and-resume rounds (each a checkpoint and
# up to 0.1 s of steps, ~10 ms a step here) cannot reach its end on a fast idle machine either
KILLED = [*LONG, "optim.epochs=64"]
SAME = ["step", "epoch", "lr", "momentum", "loss", "grad_norm", "skipped"]  # not timing columns


# ---------------------------------------------------------------- helpers

def _cli_child(argv, log):
    """Forked from the forkserver: `stabilitylab <argv>` with stdout and stderr in `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from stabilitylab.cli import main as cli_main

    sys.exit(cli_main(argv))


_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(["torch", "timm", "stabilitylab.cli", "trainer.loop"])


def start_cli(argv, log):
    process = _FORKSERVER.Process(target=_cli_child, args=([str(a) for a in argv], str(log)))
    process.start()
    return process


def run_cli(argv, log, timeout=120):
    process = start_cli(argv, log)
    process.join(timeout)
    assert process.exitcode is not None, f"stabilitylab {argv[0]} did not end in {timeout} s"
    return process.exitcode, Path(log).read_text()


def one_line_error(text):
    """The text is one error line, no traceback."""
    lines = [line for line in text.strip().splitlines() if line]
    assert "Traceback" not in text and len(lines) == 1, text
    return lines[0]


def tree_digest(path: Path) -> dict:
    """Every file's content hash (the lock file excepted): what `nothing changed` means."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def assert_same_rows(run, reference):
    pd.testing.assert_frame_equal(run.steps[SAME], reference.steps[SAME])
    pd.testing.assert_frame_equal(run.layers, reference.layers)
    pd.testing.assert_frame_equal(run.knn, reference.knn)


def assert_no_duplicates(run):
    assert not run.steps["step"].duplicated().any()
    assert not run.layers.duplicated(["step", "layer"]).any()
    assert not run.knn.duplicated(["step", "source"]).any()
    assert not run.events.duplicated(["step", "kind", "detail"]).any()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished, uninterrupted 48-step run of LONG (checkpoints of steps 45 and 47 kept)."""
    folder = tmp_path_factory.mktemp("faults")
    code, log = run_cli(["train", "--out", folder / "finished", *LONG], folder / "log")
    assert code == 0, log
    return folder / "finished"


@pytest.fixture
def run_copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# ---------------------------------------------------------------- SIGKILL at random moments

def test_random_sigkills_then_resume_equal_an_uninterrupted_run(tmp_path):
    """11 SIGKILLs (one before the first checkpoint, then each at a random moment after a new
    checkpoint), each followed by --resume: after every kill all rows up to the newest
    checkpoint are on disk and steps and layers end at the same step (17.9: a flush is one
    unit); the finished run equals the uninterrupted one, with no row twice (17.3)."""
    run_dir = tmp_path / "killed"
    rng = random.Random(17)
    argv = ["train", "--out", run_dir, *KILLED]
    for kill in range(11):
        before = set((run_dir / "checkpoints").glob("step-*.pt"))
        process = start_cli(argv, tmp_path / "log")
        deadline = time.monotonic() + 120
        while process.exitcode is None and time.monotonic() < deadline:
            if kill == 0:  # writer open, nothing saved yet
                ready = (run_dir / "segments.json").exists()
            else:
                ready = bool(set((run_dir / "checkpoints").glob("step-*.pt")) - before)
            if ready:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        assert process.exitcode is None, "the run ended before it was killed: make it longer"
        process.kill()
        process.join()
        run = sl.load_run(run_dir)
        steps = run.steps["step"].tolist()
        assert steps == list(range(len(steps))), "a hole or a duplicate step"
        assert sorted(set(run.layers["step"])) == steps, "steps and layers disagree"
        newest = max((int(c.stem[5:]) for c in (run_dir / "checkpoints").glob("step-*.pt")), default=-1)
        assert len(steps) >= newest + 1, "a checkpoint at step S promises every row up to S"
        argv = ["train", "--resume", run_dir]
    code, log = run_cli(argv, tmp_path / "log")
    assert code == 0, log[-3000:]
    assert not list(run_dir.rglob("*.tmp"))
    run = sl.load_run(run_dir)
    assert run.meta["status"] == "finished"
    code, log = run_cli(["train", "--out", tmp_path / "uninterrupted", *KILLED], tmp_path / "log")
    assert code == 0, log[-3000:]
    assert_same_rows(run, sl.load_run(tmp_path / "uninterrupted"))
    assert_no_duplicates(run)


def test_sigterm_saves_a_checkpoint_and_marks_the_run_interrupted(finished, tmp_path):
    """What schedulers send before killing: the run checkpoints the step it is at, says
    `interrupted`, and --resume carries it on to the same end as the uninterrupted run."""
    run_dir = tmp_path / "run"
    process = start_cli(["train", "--out", run_dir, *LONG, "checkpoint.every_steps=1000"], tmp_path / "log")
    while not (run_dir / "steps" / "gen=0" / "part-000001.parquet").exists():  # past step 5
        assert process.exitcode is None, (tmp_path / "log").read_text()
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGTERM)
    process.join(60)
    assert process.exitcode == 130
    run = sl.load_run(run_dir)
    last = run.steps["step"].iloc[-1]
    assert run.meta["status"] == "interrupted"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{last:08d}.pt"]
    assert run.events.query("kind == 'stopped'")["step"].tolist() == [last]
    code, log = run_cli(["train", "--resume", run_dir, "checkpoint.every_steps=2"], tmp_path / "log")
    assert code == 0, log
    assert_same_rows(sl.load_run(run_dir), sl.load_run(finished))


def test_a_signal_in_the_middle_of_a_flush_duplicates_no_row(tmp_path, monkeypatch):
    """SIGTERM right after the first steps part is written, before the writer has noted it:
    the flush completes and the run stops after its step, no row and no checkpoint event
    twice (an exception raised in the middle of a flush would write the part again)."""
    import stabilitylab.rundir as rundir

    write, sent = rundir.write_parquet_atomic, []

    def write_then_signal(table, path):
        write(table, path)
        if not sent and path.parent.parent.name == "steps":
            sent.append(path)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(rundir, "write_parquet_atomic", write_then_signal)
    assert main(["train", "--out", str(tmp_path / "run"), *LONG]) == 130
    run = sl.load_run(tmp_path / "run")
    assert sent and run.meta["status"] == "interrupted"
    assert_no_duplicates(run)
    steps = run.steps["step"].tolist()
    assert steps == list(range(len(steps)))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()][-1] == f"step-{steps[-1]:08d}.pt"


# ---------------------------------------------------------------- concurrent writers (17.2)

def test_two_resumes_at_once_one_is_refused_and_the_run_is_complete(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    processes = [start_cli(["train", "--resume", run_dir, "optim.epochs=9"], tmp_path / f"{i}.log")
                 for i in range(2)]
    for process in processes:
        process.join(120)
    codes = sorted(p.exitcode for p in processes)
    assert codes == [0, 2], codes
    loser = next(i for i, p in enumerate(processes) if p.exitcode == 2)
    assert "being written by another process" in one_line_error((tmp_path / f"{loser}.log").read_text())
    run = sl.load_run(run_dir)
    assert run.steps["step"].tolist() == list(range(54)) and run.meta["status"] == "finished"
    assert_no_duplicates(run)


def test_two_new_runs_in_one_folder_at_once_never_mix(tmp_path):
    """The second `train --out D` touches nothing: config.yaml, meta.json and the checkpoint
    describe the same run (before the fix the loser overwrote config.yaml and meta.json)."""
    run_dir = tmp_path / "run"
    variants = [["seed=0", "model.patch_proj=learned"], ["seed=1", "model.patch_proj=frozen"]]
    processes = [start_cli(["train", "--out", run_dir, *TINY, "optim.max_steps=4", *v], tmp_path / f"{i}.log")
                 for i, v in enumerate(variants)]
    for process in processes:
        process.join(120)
    assert sorted(p.exitcode for p in processes) == [0, 2]
    winner = next(i for i, p in enumerate(processes) if p.exitcode == 0)
    loser_line = one_line_error((tmp_path / f"{1 - winner}.log").read_text())
    assert "being written by another process" in loser_line or "already exists" in loser_line
    run = sl.load_run(run_dir)
    state = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    assert run.config["seed"] == run.meta["seed"] == state["config"]["seed"] == winner
    assert run.config["model"]["patch_proj"] == state["config"]["model"]["patch_proj"]
    assert run.steps["step"].tolist() == list(range(4)) and run.meta["status"] == "finished"


HOLDER = textwrap.dedent("""
    import sys, time
    from stabilitylab.rundir import RunWriter, write_meta
    write_meta(sys.argv[1], {"status": "running"})
    writer = RunWriter(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_held_lock_refuses_and_a_killed_holders_lock_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            RunWriter(tmp_path, resume_step=0)
    finally:
        holder.kill()
        holder.wait()
    RunWriter(tmp_path, resume_step=0).close()  # the kernel dropped the dead holder's lock


# ---------------------------------------------------------------- full and read-only disks (17.4)

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                                reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 1.6 MB tmpfs: room for two checkpoints of the tiny model, not three."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@needs_root
def test_disk_full_fails_with_one_line_status_failed_and_no_temporaries(small_disk, tmp_path):
    run_dir = small_disk / "run"
    code, log = run_cli(["train", "--out", run_dir, *TINY, "optim.epochs=20", "checkpoint.every_steps=2",
                         "checkpoint.keep=3", "log.flush_every_steps=1"], tmp_path / "log")
    line = one_line_error(log)
    assert code == 1 and "No space left on device while writing" in line and str(run_dir) in line
    assert not list(run_dir.rglob("*.tmp"))
    run = sl.load_run(run_dir)
    assert run.meta["status"] == "failed" and "No space left on device" in run.meta["error"]
    steps = run.steps["step"].tolist()
    assert steps == list(range(len(steps))) and len(steps) >= 2


def test_a_filesystem_turning_read_only_fails_with_one_line(tmp_path, monkeypatch, capsys):
    """After the first checkpoint every write into the run directory fails with EROFS, as when
    the kernel remounts a failing disk read-only (simulated: a real remount waits for files
    open for writing, and the writer's lock file always is one). Even meta.json cannot say
    so, and the error still is one line."""
    import builtins

    import trainer.loop

    run_dir, read_only = tmp_path / "run", []
    real_open, real_replace, real_save = builtins.open, os.replace, trainer.loop.save_checkpoint

    def refuse(path):
        if read_only and str(path).startswith(str(run_dir)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guarded_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_replace(src, dst, **kwargs):
        refuse(dst)
        return real_replace(src, dst, **kwargs)

    def save_then_turn_read_only(*args, **kwargs):
        checkpoint = real_save(*args, **kwargs)
        read_only.append(True)
        return checkpoint

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "replace", guarded_replace)
    monkeypatch.setattr(trainer.loop, "save_checkpoint", save_then_turn_read_only)
    assert main(["train", "--out", str(run_dir), *LONG]) == 1
    monkeypatch.undo()
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("stabilitylab train: error: Read-only file system while writing " + str(run_dir))
    run = sl.load_run(run_dir)
    assert run.meta["status"] == "running"  # the disk refused even meta.json
    assert run.steps["step"].tolist() == [0, 1]  # flushed for the checkpoint of step 1
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000001.pt"]


# ---------------------------------------------------------------- checkpoints (17.1, 17.5, 17.6)

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_a_malicious_checkpoint_is_refused_without_running_it(run_copy, tmp_path, capsys, writer):
    """17.1: a pickle whose __reduce__ calls os.system, named step-99999999.pt."""
    marker = tmp_path / "code-ran"
    path = run_copy / "checkpoints" / "step-99999999.pt"
    if writer == "torch.save":
        torch.save({"step": 5, "model": _RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsCode(marker)))
    before = tree_digest(run_copy)
    assert main(["train", "--resume", str(run_copy), "optim.epochs=9"]) == 2
    assert not marker.exists(), "the checkpoint ran code"
    line = one_line_error(capsys.readouterr().err)
    assert "refusing" in line and "step-99999999.pt" in line
    assert tree_digest(run_copy) == before


def test_a_truncated_newest_checkpoint_falls_back_to_the_older_one(finished, run_copy, capsys):
    """17.5: a warning names the bad file, the run resumes from step 45 and ends as it did."""
    newest = run_copy / "checkpoints" / "step-00000047.pt"
    newest.write_bytes(newest.read_bytes()[:50_000])
    (run_copy / "meta.json").write_text(json.dumps({**sl.load_run(run_copy).meta, "status": "interrupted"}))
    assert main(["train", "--resume", str(run_copy)]) == 0
    err = capsys.readouterr().err
    assert "step-00000047.pt is damaged" in err and "older step-00000045.pt" in err
    run = sl.load_run(run_copy)
    assert run.meta["status"] == "finished"
    assert_same_rows(run, sl.load_run(finished))
    assert_no_duplicates(run)
    assert run.events.query("kind == 'resumed'")["step"].tolist() == [46]


def test_a_resume_with_no_loadable_checkpoint_changes_nothing(run_copy, capsys):
    """17.5: rows stay visible, a finished run stays finished, one line names the files."""
    for checkpoint in (run_copy / "checkpoints").glob("*.pt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = tree_digest(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "no loadable checkpoint" in line and "step-00000045.pt" in line and "step-00000047.pt" in line
    assert tree_digest(run_copy) == before


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path):
    """17.6: weights turn non-finite at step 3; the checkpoints of steps 3 and 5 (keep=2)
    would both be non-finite and the finite one of step 1 deleted."""
    from stabilitylab.config import load_config
    from trainer import Trainer, UserError

    cfg = load_config(None, [*TINY, "checkpoint.every_steps=2", "checkpoint.keep=2",
                             "max_nonfinite_steps=3", "knn.enabled=false"])
    run_dir = tmp_path / "diverged"
    writer = RunWriter(run_dir)
    trainer = Trainer(cfg, run_dir, writer)
    forward = trainer.forward

    def blow_up_at_step_3(x1, x2, m):
        if trainer.step == 3:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("inf"))
        return forward(x1, x2, m)

    trainer.forward = blow_up_at_step_3
    with pytest.raises(UserError, match="newest finite checkpoint: step-00000001.pt"):
        trainer.fit()
    writer.close(compact=False)
    kept = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    assert [p.name for p in kept] == ["step-00000001.pt"]
    state = torch.load(kept[0], weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert "checkpoint_skipped" in set(sl.load_run(run_dir).events["kind"])


# ---------------------------------------------------------------- damaged run directories (17.7)

def _garbage_segments(run_dir):
    (run_dir / "segments.json").write_bytes(b"\x00\xff not json")


def _loss_as_string(run_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = next((run_dir / "steps").rglob("part-*.parquet"))
    table = pq.read_table(part)
    index = table.schema.get_field_index("loss")
    table = table.set_column(index, "loss", pa.array([f"{v:.3f}" for v in table["loss"].to_pylist()]))
    pq.write_table(table, part)


def _garbage_config(run_dir):
    (run_dir / "config.yaml").write_bytes(b"model: [\x00\x01\xfe")


def _garbage_meta(run_dir):
    (run_dir / "meta.json").write_text("{ not json")


@pytest.mark.parametrize("damage, named", [
    (_garbage_segments, "segments.json"), (_loss_as_string, "column 'loss'"),
    (_garbage_config, "config.yaml"), (_garbage_meta, "meta.json"),
])
@pytest.mark.parametrize("command", ["report", "compare", "analyze"])
def test_damaged_run_directories_one_line_exit_2_and_lenient_reads_them(
        run_copy, tmp_path, capsys, damage, named, command):
    damage(run_copy)
    argv = [command, str(run_copy)] + (["-o", str(tmp_path / "r.html")] if command == "report" else [])
    code = main(argv)
    err = capsys.readouterr().err
    if named == "config.yaml" and command == "analyze":
        assert code == 0  # analyze does not read the config
    else:
        assert code == 2, err
        assert named in one_line_error(err)
    assert main(argv + ["--lenient"]) == 0
    assert "warning" in capsys.readouterr().err or (named == "config.yaml" and command == "analyze")


# ---------------------------------------------------------------- configs on resume (17.8)

@pytest.mark.parametrize("config_text, message", [
    (b"optim: {base_lr: [1e-3\n", "is not valid YAML"),
    (bytes(range(256)), "not a text file"),
    (b"seed: !!python/object/apply:os.system ['touch CODE_RAN']\n", "python/object/apply"),
    (b"- just\n- a list\n", "not a mapping"),
])
def test_a_damaged_config_yaml_refuses_resume_in_one_line(run_copy, capsys, config_text, message, monkeypatch):
    monkeypatch.chdir(run_copy)
    (run_copy / "config.yaml").write_bytes(config_text)
    before = tree_digest(run_copy)
    assert main(["train", "--resume", str(run_copy), "optim.epochs=9"]) == 2
    assert message in one_line_error(capsys.readouterr().err)
    assert tree_digest(run_copy) == before and not (run_copy / "CODE_RAN").exists()


@pytest.mark.parametrize("how", ["override", "edited config.yaml"])
def test_a_changed_architecture_refuses_resume_in_one_line(run_copy, capsys, how):
    overrides = ["optim.epochs=9"]
    if how == "override":
        overrides.append("model.embed_dim=64")
    else:
        path = run_copy / "config.yaml"
        path.write_text(path.read_text().replace("embed_dim: 32", "embed_dim: 64"))
    before = tree_digest(run_copy)
    assert main(["train", "--resume", str(run_copy), *overrides]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "does not fit this run's model" in line and "model.embed_dim" in line
    assert tree_digest(run_copy) == before


def test_a_hand_edited_config_is_recorded_in_meta_and_events(run_copy):
    path = run_copy / "config.yaml"
    path.write_text(path.read_text().replace("base_lr: 0.0015", "base_lr: 0.003"))
    assert main(["train", "--resume", str(run_copy), "optim.epochs=9"]) == 0
    run = sl.load_run(run_copy)
    changes = {c["key"]: (c["checkpoint"], c["now"], c["step"]) for c in run.meta["config_changes"]}
    assert changes == {"optim.base_lr": (0.0015, 0.003, 48), "optim.epochs": (8.0, 9.0, 48)}
    details = run.events.query("kind == 'config_change'")["detail"].tolist()
    assert any(d.startswith("optim.base_lr: 0.0015 -> 0.003") for d in details)


def test_interpolations_in_a_run_config_stay_text(run_copy, tmp_path, monkeypatch):
    """17.8: ${oc.env:VAR} in a downloaded config.yaml is not resolved on resume or in the report."""
    monkeypatch.setenv("STABILITYLAB_SECRET", "hunter2")
    path = run_copy / "config.yaml"
    path.write_text(path.read_text().replace("val_split: val", "val_split: ${oc.env:STABILITYLAB_SECRET}"))
    assert main(["train", "--resume", str(run_copy), "optim.epochs=9"]) == 0
    assert "${oc.env:STABILITYLAB_SECRET}" in path.read_text() and "hunter2" not in path.read_text()
    assert main(["report", str(run_copy), "-o", str(tmp_path / "r.html")]) == 0
    assert "hunter2" not in (tmp_path / "r.html").read_text()


# ---------------------------------------------------------------- resuming finished runs (17.3)

def test_resuming_a_finished_run_is_a_no_op(run_copy, capsys):
    before = tree_digest(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 0
    assert "already finished at step 47 of 48; nothing to do" in capsys.readouterr().out
    assert tree_digest(run_copy) == before


def test_resuming_after_the_final_checkpoint_adds_no_rows(finished, run_copy):
    """Killed after its last checkpoint, before it recorded `finished`: the resume finishes
    it without a second checkpoint event or a second final fresh-bank kNN row."""
    meta = sl.load_run(run_copy).meta
    (run_copy / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    assert main(["train", "--resume", str(run_copy)]) == 0
    run, reference = sl.load_run(run_copy), sl.load_run(finished)
    assert run.meta["status"] == "finished"
    assert_same_rows(run, reference)
    assert_no_duplicates(run)
    checkpoints = lambda r: r.events.query("kind == 'checkpoint'")["step"].tolist()
    assert checkpoints(run) == checkpoints(reference)


# ---------------------------------------------------------------- smaller ones (17.9, 12)

KILLED_MID_FLUSH = textwrap.dedent("""
    import os, sys, numpy as np
    import stabilitylab.rundir as rundir
    from stabilitylab.rundir import RunWriter, write_meta
    write_parquet = rundir.write_parquet_atomic
    def dies_before_the_third_layers_part(table, path):
        if path.parent.parent.name == "layers" and path.name == "part-000002.parquet":
            os._exit(9)
        write_parquet(table, path)
    rundir.write_parquet_atomic = dies_before_the_third_layers_part
    write_meta(sys.argv[1], {"status": "running"})
    writer = RunWriter(sys.argv[1])
    for step in range(30):
        writer.append("steps", {"step": [step], "loss": [1.0]})
        writer.append("layers", {"step": [step, step], "layer": ["patch_embed", "blocks.0"]})
        if step % 10 == 9:
            writer.flush(step)
""")


def test_a_kill_in_the_middle_of_a_flush_leaves_the_tables_in_step(tmp_path):
    """17.9: the steps part of the third flush is on disk, its layers part is not."""
    result = subprocess.run([sys.executable, "-c", KILLED_MID_FLUSH, str(tmp_path)])
    assert result.returncode == 9
    assert (tmp_path / "steps" / "gen=0" / "part-000002.parquet").exists()
    run = sl.load_run(tmp_path)
    assert run.steps["step"].tolist() == list(range(20))
    assert sorted(set(run.layers["step"])) == list(range(20))


def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(tmp_path, capsys):
    """17.9 / 12: --out says exactly what to do, --resume starts over keeping nothing stale."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--out", str(reference), *TINY, "optim.max_steps=6"]) == 0
    assert main(["train", "--out", str(run_dir), *TINY, "optim.max_steps=6", "seed=1"]) == 0
    for checkpoint in (run_dir / "checkpoints").glob("*.pt"):
        checkpoint.unlink()  # as if killed before its first checkpoint, with 6 steps logged
    (run_dir / "meta.json").write_text(json.dumps({**sl.load_run(run_dir).meta, "status": "running"}))
    (run_dir / "config.yaml").write_text((reference / "config.yaml").read_text())  # fix the seed
    capsys.readouterr()
    assert main(["train", "--out", str(run_dir), *TINY]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "holds 6 logged steps" in line and f"--resume {run_dir}" in line
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "starting it over from step 0" in capsys.readouterr().err
    run = sl.load_run(run_dir)
    assert_same_rows(run, sl.load_run(reference))
    assert_no_duplicates(run)
    assert run.events.query("kind == 'resumed'")["detail"].tolist() == ["from step 0: no checkpoint"]


def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_command(tmp_path, capsys):
    run_dir = tmp_path / "run"
    wrong = [o for o in TINY if not o.startswith("data.dataset")] + [f"data.path={tmp_path / 'nowhere'}"]
    assert main(["train", "--out", str(run_dir), *wrong]) == 2
    assert "nowhere" in one_line_error(capsys.readouterr().err)
    assert sl.load_run(run_dir).meta["status"] == "failed"
    assert main(["train", "--out", str(run_dir), *TINY, "optim.max_steps=2"]) == 0
    assert sl.load_run(run_dir).meta["status"] == "finished"


def test_out_naming_an_existing_file_is_one_line_exit_2(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    assert main(["train", "--out", str(target), *TINY]) == 2
    assert "is a file" in one_line_error(capsys.readouterr().err)
    assert target.read_text() == "keep me"


def test_leftovers_of_killed_writes_are_removed_by_the_next_writer(run_copy):
    """17.9: a killed checkpoint write leaves .step-*.pt.PID.tmp; a killed flush a .part tmp."""
    leftovers = [run_copy / "checkpoints" / ".step-00000013.pt.4242.tmp",
                 next((run_copy / "steps").glob("gen=*")) / ".part-000003.parquet.4242.tmp",
                 run_copy / ".meta.json.4242.tmp"]
    for path in leftovers:
        path.write_bytes(b"half written")
    assert main(["train", "--resume", str(run_copy), "optim.epochs=9"]) == 0
    assert not [p for p in leftovers if p.exists()]


def test_commit_points_are_fsynced(tmp_path, monkeypatch):
    """17.9: checkpoint, segments.json and meta.json reach the disk, file and folder, before
    (for the folder: right after) the rename that makes them final."""
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "optim.max_steps=4"]) == 0
    run_dir = str((tmp_path / "run").resolve())
    finals = {re.sub(r"^\.(.+)\.\d+\.tmp$", r"\1", Path(p).name) for p in synced}  # .NAME.PID.tmp
    assert {"segments.json", "meta.json", "step-00000003.pt"} <= finals, synced
    assert run_dir in synced and f"{run_dir}/checkpoints" in synced
