"""`stabilitylab sweep`: grid expansion, skipping finished runs, resuming interrupted ones,
the slurm script, and a sweep that loads as one set of runs."""
import json
import subprocess
import sys

import pytest

import stabilitylab as sl
from stabilitylab.cli import main
from stabilitylab.sweep import expand, parse_grid

TINY = ["data.dataset=synthetic", "data.synthetic_size=48", "data.num_workers=0", "model.img_size=16", "model.patch_size=4",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.head_hidden_dim=32",
        "model.head_out_dim=16", "optim.batch_size=16", "optim.epochs=1", "knn.every=1",
        "knn.val_size=16"]


def test_grid_expands_to_readable_names(tmp_path):
    grid = parse_grid(["model.patch_proj=learned,frozen", "optim.base_lr=1e-3,3e-3"])
    runs = expand(grid, seeds=2, out=tmp_path)
    assert len(runs) == 8
    assert runs[0].name == "patch_proj=learned_base_lr=1e-3_seed0"
    assert runs[0].overrides == ["model.patch_proj=learned", "optim.base_lr=1e-3", "seed=0"]
    assert len({r.path for r in runs}) == 8
    optimizers = expand(parse_grid(["optim.name=adamw,lamb"]), seeds=1, out=tmp_path)
    assert [r.name for r in optimizers] == ["optim=adamw_seed0", "optim=lamb_seed0"]


@pytest.mark.parametrize("grid, message", [
    ("model.patch_proj", "dotted.key=value1,value2"),
    ("model.nope=1,2", "nope"),
    ("model.patch_proj=learned,wobbly", "wobbly"),
])
def test_bad_grids_are_one_line_errors_before_anything_runs(tmp_path, grid, message):
    result = subprocess.run([sys.executable, "-m", "stabilitylab", "sweep", "--grid", grid,
                             "--out", str(tmp_path / "s"), *TINY], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_slurm_launcher_writes_an_array_script(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--grid", "model.patch_proj=learned,frozen,clip", "--launcher", "slurm",
                 "--out", str(out), *TINY]) == 0
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script
    assert script.count("torchrun") == 3 and "model.patch_proj=clip" in script
    assert json.loads((out / "sweep.json").read_text())["grid"]["model.patch_proj"] == ["learned", "frozen", "clip"]


def test_a_dry_run_leaves_an_existing_sweep_as_it_was(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--grid", "model.patch_proj=learned,frozen", "--launcher", "slurm",
                 "--out", str(out), *TINY]) == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    capsys.readouterr()
    for launcher in ("slurm", "local"):
        assert main(["sweep", "--grid", "optim.base_lr=1e-3,1e-2,1e-1", "--launcher", launcher,
                     "--dry-run", "--out", str(out), *TINY]) == 0
        assert {p.name: p.read_text() for p in out.iterdir()} == before
    printed = capsys.readouterr().out
    assert "#SBATCH --array=0-2" in printed and printed.count("optim.base_lr=") >= 6


def test_overrides_may_follow_options(tmp_path, capsys):
    assert main(["sweep", "--grid", "model.patch_proj=learned,frozen", "optim.base_lr=1e-1", "--seeds", "1",
                 "--dry-run", "--out", str(tmp_path / "s"), "optim.epochs=8", *TINY]) == 0
    commands = capsys.readouterr().out.splitlines()[1:]
    assert len(commands) == 2 and all("optim.base_lr=1e-1" in c and "optim.epochs=8" in c for c in commands)
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
    with pytest.raises(SystemExit):
        main(["sweep", "--grid", "model.patch_proj=learned", "--out", str(tmp_path / "t"), "--nope", *TINY])
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path, capsys):
    out = tmp_path / "sweep"
    # threads=3: the sweep's own share would be cores // jobs (1 on 2 cores), never over a given value
    args = ["sweep", "--grid", "model.patch_proj=learned,frozen", "--jobs", "2", "--out", str(out), *TINY, "threads=3"]
    assert main(args) == 0
    runs = sl.load_runs(out)
    assert sorted(r.config_value("model.patch_proj") for r in runs) == ["frozen", "learned"]
    assert [r.config_value("threads") for r in runs] == [3, 3]
    assert all(r.meta["status"] == "finished" for r in runs)
    printed = capsys.readouterr().out
    assert "patch_proj=frozen_seed0" in printed and "final_top1" in printed  # comparison table

    # mark one run interrupted: the next invocation resumes it and leaves the other alone
    frozen = out / "patch_proj=frozen_seed0"
    meta = json.loads((frozen / "meta.json").read_text())
    (frozen / "meta.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    learned_mtime = (out / "patch_proj=learned_seed0" / "meta.json").stat().st_mtime
    assert main(args) == 0
    assert "1 finished, 1 to run" in capsys.readouterr().out
    assert (out / "patch_proj=learned_seed0" / "meta.json").stat().st_mtime == learned_mtime
    assert "resumed" in set(sl.load_run(frozen).events["kind"])
    assert sl.load_run(frozen).meta["status"] == "finished"


def test_comparison_adds_the_seed_spread_when_there_are_seeds(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from stabilitylab.sweep import SweepRun, _print_comparison

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_report.py"
    spec = importlib.util.spec_from_file_location("bench_report", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = [SweepRun(f"s{seed}", [], bench.write_synthetic_run(
        tmp_path / f"s{seed}", 3000, 3, seed=seed, config={**bench.synthetic_config(), "seed": seed}))
        for seed in range(3)]
    _print_comparison(runs)
    out = capsys.readouterr().out
    assert "mean and standard deviation over seeds" in out
    spread = out.split("over seeds:")[1].splitlines()
    assert "n_seeds" in spread[1] and spread[2].split()[1] == "3"


@pytest.mark.slow
def test_a_stopped_sweep_stops_its_runs_with_a_checkpoint_and_calls_them_interrupted(tmp_path):
    import signal
    import time

    out = tmp_path / "sweep"
    long = [*TINY, "optim.epochs=2000", "log.flush_every_steps=1", "knn.every=1000"]
    sweep = subprocess.Popen([sys.executable, "-m", "stabilitylab", "sweep", "--grid", "model.patch_proj=learned",
                              "--out", str(out), *long], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "patch_proj=learned_seed0"
    deadline = time.monotonic() + 120
    while not list((run / "steps").glob("**/*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)  # training has begun once a step row is on disk
    sweep.send_signal(signal.SIGTERM)  # what a scheduler sends; it reaches the sweep alone
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, stderr
    assert "1 run(s) interrupted: patch_proj=learned_seed0; rerun the same command to resume them" in stderr
    assert "failed" not in stderr and "stopped patch_proj=learned_seed0" in stdout
    loaded = sl.load_run(run)
    assert loaded.meta["status"] == "interrupted" and list((run / "checkpoints").glob("step-*.pt"))
    assert 0 < len(loaded.steps) < 2000 * 3
