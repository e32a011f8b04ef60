"""The run-directory contract: writer, segment rule, compaction, SIGKILL safety, reader errors."""
import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import stabilitylab as sl
from stabilitylab.rundir import SCHEMAS, RunInUseError, RunLock, RunWriter, compact_run, write_meta

LAYERS = ["patch_embed", "blocks.0", "blocks.1", "norm", "projector", "predictor"]


def write_steps(writer, steps, loss):
    for step in steps:
        writer.append("steps", {"step": [step], "loss": [loss], "skipped": [False]})
        writer.append("layers", {"step": np.full(len(LAYERS), step), "layer": LAYERS,
                                 "grad_l2": np.arange(len(LAYERS), dtype=np.float32) + step})


def new_run(tmp_path, **kwargs):
    write_meta(tmp_path, {"status": "running"})
    return RunWriter(tmp_path, **kwargs)


def test_tables_have_documented_types(tmp_path):
    writer = new_run(tmp_path)
    write_steps(writer, range(3), 1.5)
    writer.event(2, "checkpoint", "step-00000002.pt")
    writer.close()
    run = sl.load_run(tmp_path)
    assert list(run.steps.columns) == SCHEMAS["steps"].names
    assert run.steps["step"].dtype == np.int64 and run.steps["loss"].dtype == np.float32
    assert run.steps["loss_scale"].isna().all()  # null without fp16
    assert str(run.steps["time"].dtype).startswith("datetime64") or run.steps["time"].isna().all()
    assert isinstance(run.layers["layer"].dtype, pd.CategoricalDtype)
    assert list(run.layers["layer"].cat.categories) == LAYERS  # model order, not alphabetical
    assert run.events["kind"].tolist() == ["checkpoint"]
    wide = run.grad_norms()
    assert list(wide.columns) == LAYERS and wide.index.tolist() == [0, 1, 2]
    assert wide.loc[2, "blocks.0"] == pytest.approx(3.0)


def test_flush_writes_complete_parquet_files_and_compaction_merges_them(tmp_path):
    writer = new_run(tmp_path, flush_every_steps=10)
    for step in range(35):
        write_steps(writer, [step], 1.0)
        if writer.should_flush(step):
            writer.flush(step)
    writer.flush()
    assert len(list((tmp_path / "steps").rglob("*.parquet"))) == 4
    writer.close()
    files = list((tmp_path / "steps").rglob("*.parquet"))
    assert len(files) == 1
    assert sl.load_run(tmp_path).steps["step"].tolist() == list(range(35))


def test_resume_supersedes_rows_after_the_checkpoint(tmp_path):
    writer = new_run(tmp_path)
    write_steps(writer, range(50), loss=1.0)  # the first process got to step 49 ...
    writer.close(compact=False)
    resumed = RunWriter(tmp_path, resume_step=29)  # ... but its last checkpoint was step 29
    write_steps(resumed, range(30, 40), loss=2.0)
    resumed.close(compact=False)
    run = sl.load_run(tmp_path)
    assert run.steps["step"].tolist() == list(range(40))  # 40..49 of the dead process are gone
    assert (run.steps["loss"][:30] == 1.0).all() and (run.steps["loss"][30:] == 2.0).all()
    assert not run.layers.duplicated(["step", "layer"]).any()
    compact_run(tmp_path)
    assert sl.load_run(tmp_path).steps["loss"].tolist() == run.steps["loss"].tolist()


def test_an_append_only_generation_supersedes_nothing(tmp_path):
    writer = new_run(tmp_path)
    write_steps(writer, range(50), loss=1.0)
    writer.close(compact=False)
    probe = RunWriter(tmp_path, append=True)  # e.g. a linear probe of the checkpoints at 19 and 39
    probe.event(19, "linprobe", "a")
    probe.event(39, "linprobe", "b")
    probe.close(compact=False)
    run = sl.load_run(tmp_path)
    assert run.steps["step"].tolist() == list(range(50)) and run.events["step"].tolist() == [19, 39]
    resumed = RunWriter(tmp_path, resume_step=29)  # a later resume supersedes what came after 29
    write_steps(resumed, range(30, 35), loss=2.0)
    resumed.close(compact=False)
    run = sl.load_run(tmp_path)
    assert run.steps["step"].tolist() == list(range(35)) and run.events["step"].tolist() == [19]
    with pytest.raises(ValueError):
        RunWriter(tmp_path, append=True, resume_step=3)


def test_rows_after_a_compaction_go_to_the_compacted_generation(tmp_path):
    writer = new_run(tmp_path)
    write_steps(writer, range(3), 1.0)
    writer.compact()
    write_steps(writer, range(3, 5), 2.0)
    writer.close(compact=False)
    assert sl.load_run(tmp_path).steps["loss"].tolist() == [1.0] * 3 + [2.0] * 2


def test_new_writer_refuses_a_directory_with_logs(tmp_path):
    new_run(tmp_path).close()
    with pytest.raises(FileExistsError):
        RunWriter(tmp_path)


def test_unlisted_generation_is_ignored(tmp_path):
    """A compaction killed before its commit point leaves an unlisted folder: not read."""
    writer = new_run(tmp_path)
    write_steps(writer, range(5), 1.0)
    writer.close(compact=False)
    stray = tmp_path / "steps" / "gen=7"
    stray.mkdir()
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"step": pa.array([0, 1], pa.int64())}), stray / "part-000000.parquet")
    assert sl.load_run(tmp_path).steps["step"].tolist() == list(range(5))
    assert RunWriter(tmp_path, resume_step=4).gen == 8  # never reuses the stray number


CHILD = textwrap.dedent("""
    import sys, numpy as np
    from stabilitylab.rundir import RunWriter, write_meta
    run_dir = sys.argv[1]
    layers = ["patch_embed", "blocks.0", "norm"]
    write_meta(run_dir, {"status": "running"})
    def log(writer, steps):
        for step in steps:
            writer.append("steps", {"step": [step], "loss": [float(step)], "skipped": [False]})
            writer.append("layers", {"step": np.full(3, step), "layer": layers, "grad_l2": np.ones(3)})
            if writer.should_flush(step):
                writer.flush(step)
                print(step, flush=True)  # committed: every row up to `step` is on disk
    writer = RunWriter(run_dir, flush_every_steps=7)
    log(writer, range(400))
    writer.close()                      # compaction
    for round in range(1000):           # resume from a checkpoint 30 steps back, again and again
        last = 400 + 50 * round
        # the resume supersedes the rows after last - 30 until it rewrites them: from here on
        # only the rows up to last - 30 are promised (said before the writer opens, so the
        # promise holds at every moment a kill can come)
        print(last - 30, flush=True)
        writer = RunWriter(run_dir, flush_every_steps=7, resume_step=last - 30)
        log(writer, range(last - 29, last + 50))
        writer.close(compact=round % 2 == 0)
""")


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_readable_prefix(tmp_path):
    """Every flush the child reported as done is on disk after the kill: a writer that lost
    files, or committed steps without their layers, fails here."""
    rng = random.Random(1234)
    for attempt in range(6):
        run_dir = tmp_path / f"run{attempt}"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # started (imports are slow under load) and flushed once
        time.sleep(rng.uniform(0.0, 3.0))
        child.send_signal(signal.SIGKILL)
        reported = [first] + child.communicate()[0].split()
        run = sl.load_run(run_dir)
        steps = run.steps["step"].to_numpy()
        assert len(steps) >= int(reported[-1]) + 1, "a flush the writer reported done is missing"
        assert steps.tolist() == list(range(len(steps))), "a hole or a duplicate step"
        assert np.array_equal(run.steps["loss"].to_numpy(), steps.astype(np.float32))
        layers = run.layers
        assert not layers.duplicated(["step", "layer"]).any()
        assert sorted(set(layers["step"])) == steps.tolist()


def test_flushes_after_flush_every_s_seconds_too(tmp_path):
    writer = new_run(tmp_path, flush_every_steps=1000, flush_every_s=0.2)
    write_steps(writer, [0], 1.0)
    assert not writer.should_flush(0)
    time.sleep(0.25)
    assert writer.should_flush(1)
    writer.flush(1)
    assert not writer.should_flush(2)
    assert sl.load_run(tmp_path).steps["step"].tolist() == [0]  # on disk before close()
    writer.close()


def test_a_writer_holds_the_lock_until_close(tmp_path):
    writer = new_run(tmp_path)
    with pytest.raises(RunInUseError, match="already open for writing in this process"):
        RunWriter(tmp_path, resume_step=0)
    writer.close()
    RunWriter(tmp_path, resume_step=0).close()


def test_a_writer_takes_over_a_lock_its_caller_holds(tmp_path):
    lock = RunLock(tmp_path)
    write_meta(tmp_path, {"status": "running"})
    writer = RunWriter(tmp_path, lock=lock)
    assert lock.held
    writer.close()
    assert not lock.held


def test_a_column_an_older_part_lacks_reads_as_nulls(tmp_path):
    import pyarrow.parquet as pq

    writer = new_run(tmp_path)
    write_steps(writer, range(3), 1.0)
    writer.close()
    part = next((tmp_path / "steps").rglob("part-*.parquet"))
    pq.write_table(pq.read_table(part).drop_columns(["momentum", "time"]), part)  # an old writer
    steps = sl.load_run(tmp_path).steps
    assert list(steps.columns) == SCHEMAS["steps"].names
    assert steps["momentum"].isna().all() and steps["loss"].tolist() == [1.0] * 3


def test_load_run_errors_are_clear(tmp_path):
    with pytest.raises(sl.RunDirError, match="no such run directory"):
        sl.load_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(sl.RunDirError, match="not a run directory"):
        sl.load_run(tmp_path / "plain")
    run_dir = tmp_path / "run"
    writer = new_run(run_dir)
    write_steps(writer, range(4), 1.0)
    writer.close()
    import shutil
    shutil.rmtree(run_dir / "knn")  # as a run written before a table existed
    knn = sl.load_run(run_dir).knn
    assert knn.empty and list(knn.columns) == SCHEMAS["knn"].names


def test_corrupt_part_is_named_and_lenient_mode_skips_it(tmp_path):
    writer = new_run(tmp_path)
    write_steps(writer, range(3), 1.0)
    writer.flush()
    write_steps(writer, range(3, 6), 1.0)
    writer.close(compact=False)
    parts = sorted((tmp_path / "steps").rglob("*.parquet"))
    parts[0].write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(sl.RunDirError, match=parts[0].name):
        sl.load_run(tmp_path).steps
    with pytest.warns(UserWarning, match="skipped"):
        steps = sl.load_run(tmp_path, lenient=True).steps
    assert steps["step"].tolist() == [3, 4, 5]


def test_load_runs_expands_globs_and_sweep_folders(tmp_path):
    for name in ["a", "b"]:
        writer = new_run(tmp_path / "sweep" / name)
        write_steps(writer, range(2), 1.0)
        writer.close()
    assert [r.name for r in sl.load_runs(tmp_path / "sweep")] == ["a", "b"]
    assert [r.name for r in sl.load_runs(str(tmp_path / "sweep" / "*"))] == ["a", "b"]
    with pytest.raises(sl.RunDirError):
        sl.load_runs(str(tmp_path / "nothing*"))


def test_meta_and_config_load(tmp_path):
    writer = new_run(tmp_path)
    writer.update_meta(status="finished", seed=3)
    writer.close()
    (tmp_path / "config.yaml").write_text("model:\n  patch_proj: frozen\n")
    run = sl.load_run(tmp_path)
    assert run.meta["status"] == "finished" and run.meta["seed"] == 3
    assert run.config_value("model.patch_proj") == "frozen"
    assert json.loads((tmp_path / "segments.json").read_text())[0]["start_step"] == 0
