"""The command line: help texts, one-line user errors with exit 2, no torch for readers."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stabilitylab as sl

from stabilitylab.cli import main
from stabilitylab.rundir import RunWriter, write_meta


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "stabilitylab", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


@pytest.fixture
def tiny_run(tmp_path):
    """A small synthetic run directory written with the project's writer."""
    run_dir = tmp_path / "run"
    write_meta(run_dir, {"status": "finished"})
    (run_dir / "config.yaml").write_text("model:\n  patch_proj: learned\noptim:\n  base_lr: 0.001\n")
    writer = RunWriter(run_dir)
    rng = np.random.default_rng(0)
    steps = np.arange(300)
    writer.append("steps", {"step": steps, "loss": 5 - steps / 100, "skipped": np.zeros(300, bool)})
    layers = ["patch_embed", "blocks.0", "blocks.1", "norm", "projector"]
    for layer in layers:
        writer.append("layers", {"step": steps, "layer": [layer] * 300,
                                 "grad_l2": rng.lognormal(0, 0.2, 300)})
    knn_steps = steps[::20]
    writer.append("knn", {"step": knn_steps, "source": ["queue"] * len(knn_steps), "k": [20] * len(knn_steps),
                          "top1": np.linspace(0.2, 0.4, len(knn_steps)), "top5": np.linspace(0.5, 0.8, len(knn_steps)),
                          "bank_size": [500] * len(knn_steps), "n_queries": [1000] * len(knn_steps)})
    writer.close()
    return run_dir


def test_help_lists_every_command():
    result = cli("--help")
    assert result.returncode == 0
    for command in ["train", "report", "analyze", "compare", "sweep", "import", "linprobe", "replay"]:
        assert command in result.stdout
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "usage: stabilitylab " + command in sub.stdout
        description = sub.stdout.split("\n\n")[1]
        assert len(description) > 60 and not description.startswith(("positional", "options"))
        assert max(map(len, description.splitlines())) <= 88, f"{command}: description not wrapped"
        assert "examples:\n  stabilitylab " + command in sub.stdout


def test_version():
    import stabilitylab

    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"stabilitylab {stabilitylab.__version__}"


@pytest.mark.parametrize("command", ["report", "analyze", "compare", "train", "sweep"])
def test_a_bad_flag_shows_the_usage_of_its_subcommand(command, tiny_run, tmp_path):
    result = cli(command, str(tiny_run), "--out", str(tmp_path / "new"), "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: stabilitylab {command} ")
    assert "--no-such-flag" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["train", "model.no_such_key=1"], "no_such_key"),
    (["train", "model.patch_proj"], "dotted.key=value"),
    (["train", "--config", "no_such_preset"], "config file not found"),
    (["train", "optim.batch_size=many"], "batch_size"),
    (["train", "optim.base_lr=-1e-3"], "optim.base_lr=-0.001 is out of range: it must be > 0"),
    (["train", "optim.batch_size=0"], "optim.batch_size=0 is out of range: it must be >= 1"),
    (["train", "optim.max_steps=-5"], "optim.max_steps=-5 is out of range: it must be >= 1"),
    (["train", "optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] is out of range: each value must be in [0, 1)"),
    (["train", "moco.m=nan"], "moco.m=nan is out of range: it must be in [0, 1]"),
    (["train", "--out", "new_run", "knn.queue_fraction=0"], "knn.queue_fraction=0.0 is out of range"),
    (["sweep", "--out", "sweep", "--grid", "optim.base_lr=1e-3,-1"], "optim.base_lr=-1.0 is out of range"),
    (["analyze", "/no/such/run"], "no such run directory"),
    (["report", "/no/such/run"], "no such run directory"),
    (["compare", "/no/such/run"], "no such run directory"),
    (["analyze", "RUN", "--spike-rule", "mad:six"], "--spike-rule: bad spike rule test 'mad:six'"),
    (["compare", "RUN", "--spike-rule", "ratio:10,span=3"], "--spike-rule: bad spike rule option 'span=3'"),
    (["report", "RUN", "--spike-rule", "zscore:6"], "--spike-rule: bad spike rule test 'zscore:6'"),
    (["compare", "RUN", "--by", "optim.lr"], "no run's config has optim.lr (did you mean optim.base_lr?)"),
    (["train", "device=tpu"], "device='tpu' is not one of: auto, cpu, cuda, cuda:N"),
    (["linprobe", "RUN", "device=gpu"], "device='gpu' is not one of: auto, cpu, cuda, cuda:N"),
    (["train", "--out", "FILE/run"], "FILE/run: Not a directory"),
    (["report", "RUN", "--figures", "FILE"], "--figures FILE is a file; give a folder for the figures"),
    (["report", "RUN", "-o", "FILE"], "FILE exists and is not an HTML file; refusing to overwrite it"),
    (["report", "RUN", "--figures", "FILE/figs"], "FILE/figs: Not a directory"),
    (["sweep", "--out", "FILE", "--grid", "optim.base_lr=1e-3,1e-2", "--dry-run"],
     "--out FILE is a file; give a folder for the sweep"),
    (["sweep", "--out", "FILE/sweep", "--grid", "optim.base_lr=1e-3,1e-2"], "FILE/sweep: Not a directory"),
])
def test_user_errors_are_one_line_exit_2(args, message, tmp_path, tiny_run):
    (tmp_path / "FILE").write_text("a file where a folder is expected\n")
    result = cli(*[str(tiny_run) if a == "RUN" else a for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.html")) and not (tiny_run / "report.html").exists()  # nothing written
    assert (tmp_path / "FILE").read_text() == "a file where a folder is expected\n"


def test_every_numeric_train_option_has_a_range():
    import dataclasses
    import typing

    from trainer.config import RANGES, TrainConfig

    def element(kind):  # Optional[int] -> int, List[float] -> float
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return element(args[0]) if args else kind

    def numeric(cls, prefix=""):
        for f in dataclasses.fields(cls):
            kind = element(typing.get_type_hints(cls)[f.name])
            if dataclasses.is_dataclass(kind):
                yield from numeric(kind, f"{prefix}{f.name}.")
            elif kind in (int, float):
                yield prefix + f.name

    assert "optim.betas" in set(numeric(TrainConfig)) and "threads" in set(numeric(TrainConfig))
    assert sorted(numeric(TrainConfig)) == sorted(RANGES)


def test_train_refuses_to_overwrite_a_run(tiny_run, capsys):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    assert main(["train", "--out", str(tiny_run), "optim.max_steps=1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_run.rglob("*")) == before  # nothing lost


def test_force_replaces_a_run_but_never_a_folder_that_is_not_one(tiny_run, tmp_path, capsys):
    tiny = ["data.dataset=synthetic", "data.synthetic_size=32", "data.num_workers=0", "model.img_size=16",
            "model.patch_size=8", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
            "model.head_hidden_dim=16", "model.head_out_dim=8", "optim.batch_size=16", "optim.max_steps=2",
            "knn.enabled=false", "log.progress=false", "threads=1"]
    (tiny_run / "report.html").write_text("an old report")
    assert main(["train", "--out", str(tiny_run), "--force", *tiny]) == 0
    run = sl.load_run(tiny_run)
    assert run.steps["step"].tolist() == [0, 1]  # the 300 old steps are gone
    assert not (tiny_run / "report.html").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["train", "--out", str(notes), "--force", *tiny]) == 2
    assert "is not a run directory; refusing to overwrite it" in capsys.readouterr().err
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]


def test_resume_without_checkpoint_is_a_clear_error(tiny_run, capsys):
    assert main(["train", "--resume", str(tiny_run)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_readers_never_import_torch(tiny_run, tmp_path):
    code = ("import sys; from stabilitylab.cli import main; "
            f"main(['analyze', {str(tiny_run)!r}]); main(['compare', {str(tiny_run)!r}, '--csv']); "
            f"main(['report', {str(tiny_run)!r}, '-o', {str(tmp_path / 'r.html')!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r.html").stat().st_size > 100_000


def test_analyze_and_compare_print_results(tiny_run):
    analyzed = cli("analyze", str(tiny_run))
    assert analyzed.returncode == 0 and "run" in analyzed.stdout
    as_json = cli("analyze", str(tiny_run), "--json")
    assert json.loads(as_json.stdout)["name"] == "run"
    compared = cli("compare", str(tiny_run), "--csv")
    assert compared.returncode == 0 and compared.stdout.count("\n") == 2  # header + one run
    spread = cli("compare", str(tiny_run), "--over-seeds", "--csv")
    header, row = spread.stdout.splitlines()
    assert spread.returncode == 0 and "final_top1_std" in header
    assert row.split(",")[header.split(",").index("n_seeds")] == "1"


def test_unreadable_training_image_is_named_in_one_line(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in [("train", 12), ("val", 4)]:
        for cls in ["a", "b"]:
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    bad = tmp_path / "data" / "train" / "a" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    result = cli("train", "--out", str(tmp_path / "run"), f"data.path={tmp_path / 'data'}",
                 "model.img_size=16", "model.patch_size=8", "model.embed_dim=16", "model.depth=1",
                 "model.num_heads=2", "model.head_hidden_dim=16", "model.head_out_dim=8",
                 "optim.batch_size=8", "knn.val_size=8", "log.progress=false")
    assert result.returncode == 1, result.stderr
    assert "broken.jpg" in result.stderr and "skip_bad_images" in result.stderr
    assert "Traceback" not in result.stderr
    assert '"status": "failed"' in (tmp_path / "run" / "meta.json").read_text()


def test_compare_shows_one_unit_in_text_csv_and_json(tiny_run):
    csv = cli("compare", str(tiny_run), "--csv").stdout
    records = json.loads(cli("compare", str(tiny_run), "--json").stdout)
    text = cli("compare", str(tiny_run), env={**os.environ, "COLUMNS": "80"}).stdout
    row = pd.read_csv(io.StringIO(csv)).iloc[0]
    # the queue kNN rises from 20% to 40% in 15 evaluations: percent, not fractions
    assert row.final_top1 == records[0]["final_top1"] == 40.0
    assert row.best_top1 == 40.0 and row.roughness == 0.0
    assert not re.search(r"\d\.\d{5,}", csv)  # rounded
    assert max(len(line) for line in text.splitlines()) <= 80  # wrapped to the terminal
    assert re.search(r"final_top1.*\n.*\b40\b", text)


def test_compare_over_seeds_keeps_spike_counts(tiny_run):
    header = cli("compare", str(tiny_run), "--over-seeds", "--csv").stdout.splitlines()[0].split(",")
    for metric in ("n_first_layer_spikes", "n_spikes", "final_top1", "roughness"):
        assert f"{metric}_mean" in header and f"{metric}_std" in header


def test_compare_reads_a_folder_of_sweeps(tiny_run, tmp_path):
    for sweep, run in [("sweep_a", "r1"), ("sweep_a", "r2"), ("sweep_b", "r3")]:
        shutil.copytree(tiny_run, tmp_path / "sweeps" / sweep / run)
    result = cli("compare", str(tmp_path / "sweeps"), "--csv")
    assert result.returncode == 0, result.stderr
    assert [line.split(",")[0] for line in result.stdout.splitlines()[1:]] == ["r1", "r2", "r3"]


def test_default_yaml_spells_out_the_built_in_defaults():
    """configs/default.yaml is the CPU preset that `stabilitylab train` runs with no arguments:
    every value it lists is the built-in default (so the two cannot drift apart)."""
    from dataclasses import asdict

    from stabilitylab.config import load_config

    assert asdict(load_config("default", [])) == asdict(load_config(None, []))


def test_every_preset_loads_and_cpu_unstable_is_cpu_edge_at_its_hot_lr():
    """Each configs/*.yaml loads by name; cpu_unstable.yaml (docs/findings.md, "R1, hotter")
    differs from cpu_edge.yaml only in the peak lr and the length."""
    from dataclasses import asdict

    from stabilitylab.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    for preset in sorted(root.glob("*.yaml")):
        load_config(preset.stem, [])
    edge = asdict(load_config("cpu_edge", ["optim.base_lr=1.28e-1", "optim.max_steps=1600"]))
    assert asdict(load_config("cpu_unstable", [])) == edge
