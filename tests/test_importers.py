"""`stabilitylab import tensorboard|csv|wandb`: real files written by the tools' own writers
(torch.utils.tensorboard.SummaryWriter, pandas, wandb offline) become run directories with
the Monitor's layer groups; bad input is one line and exit 2, nothing overwritten."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

import stabilitylab as sl
from stabilitylab.cli import main
from trainer.probes import model_grouping

STEPS = 4


def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                             embed_dim=32, depth=2, num_heads=2, num_classes=3)


def train_and_log(log):
    """A few real steps; `log(step, {tag: value})` gets Lightning-style tags. Returns the
    reference per-group norms {step: {group: norm}} from the concatenated gradients."""
    model = vit()
    grouping = model_grouping(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reference = {}
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16, generator=g)),
                                           torch.randint(0, 3, (4,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        params = dict(model.named_parameters())
        reference[step] = {group: torch.linalg.vector_norm(torch.cat(
            [params[n].grad.flatten() for n in names])).item() for group, names in grouping.groups}
        tags = {f"grad_2.0_norm/{n}": p.grad.norm(2).item() for n, p in model.named_parameters()}
        tags["grad_2.0_norm_total"] = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
        tags.update({"train_loss_step": loss.item(), "lr-AdamW": 1e-3, "epoch": 0.0})
        log(step, tags)
        optimizer.step()
    return grouping, reference


def write_tensorboard(logdir):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(logdir)
    grouping, reference = train_and_log(lambda step, tags: [writer.add_scalar(t, v, step) for t, v in tags.items()])
    writer.add_scalar("val_acc", 0.25, STEPS - 1)
    writer.close()
    return grouping, reference


def test_tensorboard_lightning_tags_import_to_the_monitors_groups(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    grouping, reference = write_tensorboard(tmp_path / "tb")
    assert main(["import", "tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path / "run"),
                 "--map", "knn.top1=^val_(acc)$"]) == 0
    assert "layer groups: patch_embed, cls_token, pos_embed, blocks.0, blocks.1, norm, head" in capsys.readouterr().out
    run = sl.load_run(tmp_path / "run")
    grad = run.grad_norms()
    assert list(grad.columns) == grouping.names
    expected = pd.DataFrame(reference).T.reindex(columns=grouping.names)
    np.testing.assert_allclose(grad.to_numpy(), expected.to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(run.steps["grad_norm"], np.sqrt((expected.to_numpy() ** 2).sum(axis=1)), rtol=1e-5)
    assert run.steps["step"].tolist() == list(range(STEPS)) and run.steps["lr"].tolist() == pytest.approx([1e-3] * STEPS)  # float32 in TB
    assert run.steps["loss"].notna().all() and (run.steps["epoch"] == 0).all()
    assert run.knn[["step", "source", "top1"]].values.tolist() == [[STEPS - 1, "acc", 0.25]]
    assert run.meta["source"] == "tensorboard"
    assert (run.meta["first_layer"], run.meta["last_block"]) == ("patch_embed", "blocks.1")
    assert main(["analyze", str(tmp_path / "run")]) == 0
    assert main(["report", str(tmp_path / "run"), "-o", str(tmp_path / "r.html")]) == 0
    assert "blocks.1" in (tmp_path / "r.html").read_text()


def test_olmo_tags_and_explicit_maps(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "olmo")
    names = [f"model.transformer.blocks.{i}.att_proj.weight" for i in range(3)] + [
        "model.transformer.wte.weight", "model.transformer.ln_f.weight"]
    for step in range(3):
        for i, name in enumerate(names):
            writer.add_scalar(f"grad/{name}.norm", 3.0 + i + step, step)
        writer.add_scalar("optim/total_grad_norm", 9.0, step)
        writer.add_scalar("train/CrossEntropyLoss", 2.0, step)
        writer.add_scalar("optim/learning_rate_group0", 4e-4, step)
        writer.add_scalar("mine/w_norm/head.weight", 1.5, step)
    writer.close()
    out = tmp_path / "run"
    assert main(["import", "tensorboard", str(tmp_path / "olmo"), "--out", str(out),
                 "--map", "steps.loss=^train/CrossEntropyLoss$",
                 "--map", "layers.param_l2=^mine/w_norm/(.+)$"]) == 0
    run = sl.load_run(out)
    grad = run.grad_norms()
    assert list(grad.columns) == ["blocks.0", "blocks.1", "blocks.2", "wte", "ln_f", "head"]
    np.testing.assert_allclose(grad.loc[1, ["blocks.0", "wte"]], [4.0, 7.0])
    assert run.grad_norms("param_l2")["head"].tolist() == [1.5] * 3
    assert (run.steps["grad_norm"] == 9).all() and (run.steps["loss"] == 2).all()
    assert run.steps["lr"].tolist() == pytest.approx([4e-4] * 3)


def test_csv_wide_and_long(tmp_path):
    rows = [{"global_step": s, "train/loss": 1.0 / (s + 1), "grad/blocks.0.mlp.weight.norm": 1.0,
             "grad/blocks.1.mlp.weight.norm": 2.0, "note": "x"} for s in range(5)]
    pd.DataFrame(rows).to_csv(tmp_path / "wide.csv", index=False)
    assert main(["import", "csv", str(tmp_path / "wide.csv"), "--out", str(tmp_path / "wide")]) == 0
    wide = sl.load_run(tmp_path / "wide")
    assert wide.steps["loss"].tolist() == pytest.approx([1.0 / (s + 1) for s in range(5)])
    assert list(wide.grad_norms().columns) == ["blocks.0", "blocks.1"] and wide.meta["source"] == "csv"

    long = pd.DataFrame([(s, tag, v) for s in range(3) for tag, v in
                         [("it", s), ("loss", 0.5), ("grad_2.0_norm/fc.weight", 3.0),
                          ("grad_2.0_norm/fc.bias", 4.0)]], columns=["it", "metric", "val"])
    long = long[long["metric"] != "it"]
    long.to_csv(tmp_path / "long.csv", index=False)
    assert main(["import", "csv", str(tmp_path / "long.csv"), "--out", str(tmp_path / "long"),
                 "--step", "it", "--tag", "metric", "--value", "val"]) == 0
    run = sl.load_run(tmp_path / "long")
    assert run.grad_norms()["fc"].tolist() == [5.0] * 3  # sqrt(3^2 + 4^2)


def test_wandb_offline_folder(tmp_path):
    """An offline run written by the W&B SDK itself, read back without a server."""
    pytest.importorskip("wandb")
    script = (
        "import sys, wandb\n"
        "run = wandb.init(mode='offline', dir=sys.argv[1], project='p', config={'lr': 0.01, 'depth': 2})\n"
        "for s in range(4):\n"
        "    run.log({'train/loss': 1.0 / (s + 1), 'learning_rate': 0.01,\n"
        "             'grad_2.0_norm/layer1.0.conv1.weight': 3.0, 'grad_2.0_norm/layer1.1.conv1.weight': 4.0,\n"
        "             'grad_2.0_norm/layer2.0.conv1.weight': 1.0, 'grad_2.0_norm/conv1.weight': 2.0,\n"
        "             'val/top1': 0.5 + 0.1 * s}, step=s)\n"
        "run.finish()\n")
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=120,
                   capture_output=True)
    [folder] = (tmp_path / "wandb").glob("offline-run-*")
    assert main(["import", "wandb", str(folder), "--out", str(tmp_path / "run"),
                 "--map", "knn.top1=^val/top1$"]) == 0
    run = sl.load_run(tmp_path / "run")
    assert run.config == {"lr": 0.01, "depth": 2}
    # W&B keeps no order of a step's keys (logged here out of forward order): natural name order
    assert list(run.grad_norms().columns) == ["conv1", "layer1", "layer2"]
    assert run.grad_norms()["layer1"].tolist() == [5.0] * 4
    assert run.knn["top1"].tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])
    assert run.meta["source"] == "wandb" and (run.steps["lr"] == 0.01).all()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stabilitylab", "import", *args],
                          capture_output=True, text=True, timeout=120)


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    pytest.importorskip("tensorboard")
    (tmp_path / "events.out.tfevents.bogus").write_bytes(b"not an event file at all")
    (tmp_path / "metrics.csv").write_text("a,b\n1,2\n")
    (tmp_path / "unknown.csv").write_text("step,foo,bar\n0,1,2\n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    write_tensorboard(tmp_path / "tb")
    cases = [
        (["tensorboard", str(tmp_path / "events.out.tfevents.bogus")], "TensorBoard"),
        (["tensorboard", str(tmp_path / "metrics.csv")], "not a TensorBoard event file"),
        (["csv", str(tmp_path / "metrics.csv")], "no step column"),
        (["csv", str(tmp_path / "unknown.csv")], "no known tag"),
        (["wandb", str(tmp_path / "metrics.csv")], "not a W&B run file"),
        (["tensorboard", str(tmp_path / "tb"), "--map", "layers.grad_l2=^x$"], "regex group"),
        (["tensorboard", str(tmp_path / "tb"), "--map", "steps.nope=x"], "TABLE.COLUMN"),
    ]
    for args, message in cases:
        result = run_cli(*args, "--out", str(tmp_path / "new"))
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
        assert not (tmp_path / "new").exists()
    for log in (["tensorboard", str(tmp_path / "tb")], ["csv", str(tmp_path / "metrics.csv")]):
        result = run_cli(*log, "--out", str(existing))  # refused before the log is read
        assert result.returncode == 2 and "already exists" in result.stderr, result.stderr
    assert sorted(p.name for p in existing.iterdir()) == ["keep.txt"]
