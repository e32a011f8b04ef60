"""Linear probing: the fast fit against scikit-learn, the official protocol's frozen backbone,
`stabilitylab linprobe` end to end (both protocols, --every-checkpoint), its bad-input errors,
and the `linear` table's summary."""
import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import stabilitylab as sl
from analysis import linear_curve, linear_summary
from stabilitylab.cli import main
from stabilitylab.config import load_config
from stabilitylab.rundir import SCHEMAS, compact_run
from trainer.checkpoint import list_checkpoints, save_checkpoint
from trainer.config import ProbeConfig
from trainer.data import build_datasets
from trainer.linprobe import (LinearProbeError, fit_lbfgs, linear_head, load_backbone, probe_official,
                              topk_accuracy)
from trainer.methods import build_method

TINY = [
    "data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=0", "model.img_size=16",
    "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.head_hidden_dim=64", "model.head_out_dim=16", "optim.batch_size=16", "optim.epochs=2",
    "knn.every=4", "knn.val_size=32", "threads=1", "log.progress=false",
    "checkpoint.every_steps=3", "checkpoint.keep=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (8 steps) with checkpoints at steps 2, 5 and 7."""
    run_dir = tmp_path_factory.mktemp("linprobe") / "run"
    assert main(["train", "--out", str(run_dir), *TINY]) == 0
    assert [c.step for c in list_checkpoints(run_dir)] == [2, 5, 7]
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    import shutil

    return shutil.copytree(trained, tmp_path / "run")


# ---------------------------------------------------------------- the fits

def test_fast_fit_is_scikit_learns_l2_logistic_regression():
    """Same objective (mean cross-entropy + l2/2 ||W||^2 <=> C = 1 / (l2 n)) on standardised
    features: the same weights and predictions as sklearn's multinomial L-BFGS."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    l2 = 1e-3
    head, train_loss, iterations = fit_lbfgs(torch.tensor(x), torch.tensor(y), 10, l2=l2)
    z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6)
    reference = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10_000).fit(z, y)
    weight = head[-1].weight.detach().numpy()
    np.testing.assert_allclose(weight, reference.coef_, atol=1e-3 * np.abs(reference.coef_).max())
    with torch.no_grad():
        ours = head(torch.tensor(x)).argmax(1).numpy()
    np.testing.assert_array_equal(ours, reference.predict(z))
    assert 0 < train_loss < 0.2 and 10 < iterations < 1000


def test_fast_fit_normalises_as_batchnorm_on_the_full_batch():
    features = 5 + 3 * torch.randn(200, 6, dtype=torch.float64)
    head, _, _ = fit_lbfgs(features, torch.arange(200) % 3, 3, max_iter=5)
    full_batch = torch.nn.BatchNorm1d(6, affine=False, eps=1e-6).double().train()
    torch.testing.assert_close(head[0](features), full_batch(features))


def test_topk_accuracy():
    logits = torch.tensor([[3., 2, 1, 0, -1, -2], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    assert topk_accuracy(logits, torch.tensor([0, 0, 4])) == (1 / 3, 2 / 3)
    assert topk_accuracy(logits[:, :3], torch.tensor([1, 0, 2])) == (0.0, 1.0)  # 3 classes: top-3


def test_official_protocol_keeps_the_backbone_frozen():
    """main_lincls.py's sanity check: training the head changes no backbone weight and no
    BatchNorm statistic (patch_proj=batchnorm has some), and the head does learn."""
    cfg = load_config(None, TINY + ["model.patch_proj=batchnorm"])
    model = build_method(cfg)
    backbone = load_backbone(cfg.model, {"model": model.state_dict()})
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    data = build_datasets(cfg.data, cfg.model.img_size, cfg.seed)
    row = probe_official(backbone, data, ProbeConfig(protocol="official", epochs=2, batch_size=16),
                         device=torch.device("cpu"))
    assert any(k.endswith("running_mean") for k in before)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert row["protocol"] == "official" and row["epoch"] == 2 and row["n_train"] == row["n_val"] == 64
    assert 0 <= row["top1"] <= row["top5"] <= 1 and np.isfinite(row["train_loss"])


def test_linear_head_has_no_affine_batchnorm():
    head = linear_head(8, 3)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    assert [type(m) for m in linear_head(8, 3, batchnorm=False)] == [torch.nn.Linear]


# ---------------------------------------------------------------- the command

def test_linprobe_fast_on_the_latest_checkpoint(run_copy, capsys):
    segments = json.loads((run_copy / "segments.json").read_text())
    assert main(["linprobe", str(run_copy)]) == 0  # CPU: the fast protocol
    out = capsys.readouterr().out
    assert "step 7: fast linear top-1" in out
    run = sl.load_run(run_copy)
    linear = run.linear
    assert linear[["step", "protocol", "n_train", "n_val"]].values.tolist() == [[7, "fast", 64, 64]]
    assert linear["epoch"].isna().all() and 0.1 < linear["top1"].iloc[0] <= 1  # 10 classes
    assert linear["settings"].iloc[0].startswith("lbfgs l2=0.0001 max_iter=1000 bn=true iters=")  # docs/linear_probe.md
    assert "linprobe" in set(run.events["kind"])
    # the probe superseded nothing: every earlier row is still there
    assert json.loads((run_copy / "segments.json").read_text())[: len(segments)] == segments
    assert len(run.steps) == 8
    # the same probe again gives the same number (features without augmentation, convex fit)
    assert main(["linprobe", str(run_copy)]) == 0
    again = sl.load_run(run_copy).linear
    assert len(again) == 2 and again["top1"].nunique() == 1
    compact_run(run_copy)  # compaction keeps the rows
    assert len(sl.load_run(run_copy).linear) == 2


def test_linprobe_official_every_checkpoint_one_tiny_epoch(run_copy):
    assert main(["linprobe", str(run_copy), "--protocol", "official", "--every-checkpoint",
                 "--epochs", "1", "--batch-size", "16"]) == 0
    linear = sl.load_run(run_copy).linear
    assert linear["step"].tolist() == [2, 5, 7] and set(linear["protocol"]) == {"official"}
    assert (linear["epoch"] == 1).all() and linear["train_loss"].notna().all()
    assert "batch=16 lr=0.1*batch/256" in linear["settings"].iloc[0]
    assert linear_summary(linear)["linear_step"] == 7


def test_linprobe_one_step_with_other_data(run_copy, tmp_path):
    """data.* overrides: the probe data replaces the run's, classes checked (same here)."""
    assert main(["linprobe", str(run_copy), "--step", "5", "data.synthetic_size=32"]) == 0
    linear = sl.load_run(run_copy).linear
    assert linear[["step", "n_train"]].values.tolist() == [[5, 32]]
    assert linear["settings"].iloc[0].endswith(" data.synthetic_size=32")


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stabilitylab linprobe: error: ") and match in err[0], err


def test_a_run_without_checkpoint_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), *TINY, "optim.max_steps=1", "knn.enabled=false"]) == 0
    for checkpoint in list_checkpoints(run_dir):
        checkpoint.path.unlink()
    _one_line_error(capsys, ["linprobe", str(run_dir)], "no checkpoint in")
    assert sl.load_run(run_dir).linear.empty


def test_a_checkpoint_of_another_model_config_is_refused(run_copy, capsys):
    other = load_config(None, TINY + ["model.embed_dim=16"])
    save_checkpoint({"step": 9, "model": build_method(other).state_dict(), "config": asdict(other)},
                    run_copy, 8, keep=0)
    segments = (run_copy / "segments.json").read_text()
    _one_line_error(capsys, ["linprobe", str(run_copy)], "another model config: model.embed_dim=16")
    assert (run_copy / "segments.json").read_text() == segments  # nothing written
    # a checkpoint whose config matches but whose weights do not fit
    cfg = load_config(None, TINY)
    state = {"step": 10, "model": build_method(other).state_dict(), "config": asdict(cfg)}
    save_checkpoint(state, run_copy, 9, keep=0)
    _one_line_error(capsys, ["linprobe", str(run_copy)], "does not fit the run's model config")
    with pytest.raises(LinearProbeError, match="size mismatch"):
        load_backbone(cfg.model, state)


def test_data_whose_classes_differ_is_refused(run_copy, tmp_path, capsys):
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(folder / split / cls / f"{i}.png")
    _one_line_error(capsys, ["linprobe", str(run_copy), "data.dataset=imagefolder", f"data.path={folder}"],
                    "differ from those the run trained on (2 vs 10; new: ['cat', 'dog']")
    assert sl.load_run(run_copy).linear.empty


@pytest.mark.parametrize("argv,match", [
    (["model.depth=3"], "only data.*, device, precision and threads overrides"),
    (["--step", "4"], "no checkpoint of step 4"),
    (["--epochs", "0", "--protocol", "official"], "--epochs must be at least 1"),
    (["--lr", "-0.1", "--protocol", "official"], "--lr must be > 0, got -0.1"),
    (["--wd", "nan", "--protocol", "official"], "--wd must be >= 0, got nan"),
    (["--l2=-1e-4"], "--l2 must be >= 0, got -0.0001"),
])
def test_bad_arguments_are_one_line(run_copy, capsys, argv, match):
    _one_line_error(capsys, ["linprobe", str(run_copy), *argv], match)


# ---------------------------------------------------------------- the table's summary

def _rows(*rows):
    frame = pd.DataFrame(rows, columns=["step", "protocol", "top1", "top5", "n_val", "time"])
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


def test_the_cli_defaults_are_probe_configs():
    """`stabilitylab linprobe` takes every protocol default from ProbeConfig (one place), and
    they are the documented ones (docs/linear_probe.md)."""
    from stabilitylab.cli import _parser

    args = _parser().parse_args(["linprobe", "runs/x"])
    d = ProbeConfig()
    assert (args.epochs, args.batch_size, args.lr, args.wd, args.l2, args.max_iter) == (
        d.epochs, d.batch_size, d.base_lr, d.weight_decay, d.l2, d.max_iter) == (90, 1024, 0.1, 0.0, 1e-4, 1000)


def test_linear_summary_takes_the_last_checkpoint_official_first_latest_probe():
    linear = _rows((100, "fast", 0.30, 0.8, 1000, "2026-01-01"),
                   (200, "fast", 0.35, 0.8, 1000, "2026-01-02"),
                   (200, "official", 0.40, 0.9, 1000, "2026-01-03"),
                   (200, "official", 0.42, 0.9, 1000, "2026-01-04"),   # a re-probe: latest counts
                   (100, "official", 0.50, 0.9, 1000, "2026-01-05"))
    assert linear_summary(linear) == dict(linear_top1=0.42, linear_top5=0.9, linear_protocol="official",
                                          linear_step=200, linear_n_val=1000)
    curve = linear_curve(linear)
    assert curve[["step", "protocol", "top1"]].values.tolist() == [
        [100, "official", 0.50], [100, "fast", 0.30], [200, "official", 0.42], [200, "fast", 0.35]]
    only_fast = linear[linear["protocol"] == "fast"]
    assert linear_summary(only_fast)["linear_top1"] == 0.35


def test_a_run_never_probed_reads_an_empty_linear_table():
    """The committed sample runs predate the table: no linear/ folder, an empty table."""
    from pathlib import Path

    run = sl.load_run(Path(__file__).resolve().parents[1] / "data_samples" / "runs" / "learned_lr1e-2")
    assert not (run.path / "linear").exists()
    assert run.linear.empty and list(run.linear.columns) == SCHEMAS["linear"].names
    assert linear_summary(run.linear)["linear_top1"] is None
