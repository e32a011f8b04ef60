"""The command line: help texts, one-line user errors with exit 2, no torch for readers."""
import subprocess
import sys

import numpy as np
import pytest

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
    for command in ["train", "report", "analyze", "compare", "sweep"]:
        assert command in result.stdout
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "usage: stabilitylab " + command in sub.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "model.no_such_key=1"], "no_such_key"),
    (["train", "model.patch_proj"], "dotted.key=value"),
    (["train", "--config", "no_such_preset"], "config file not found"),
    (["train", "optim.batch_size=many"], "batch_size"),
    (["analyze", "/no/such/run"], "no such run directory"),
    (["report", "/no/such/run"], "no such run directory"),
    (["compare", "/no/such/run"], "no such run directory"),
])
def test_user_errors_are_one_line_exit_2(args, message, tmp_path):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_refuses_to_overwrite_a_run(tiny_run, capsys):
    before = sorted(p.name for p in tiny_run.rglob("*"))
    assert main(["train", "--out", str(tiny_run), "optim.max_steps=1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_run.rglob("*")) == before  # nothing lost


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
    import json
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


def test_default_yaml_spells_out_the_built_in_defaults():
    """configs/default.yaml is the CPU preset that `stabilitylab train` runs with no arguments:
    every value it lists is the built-in default (so the two cannot drift apart)."""
    from dataclasses import asdict

    from stabilitylab.config import load_config

    assert asdict(load_config("default", [])) == asdict(load_config(None, []))
