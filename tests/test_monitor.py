"""stabilitylab.Monitor in plain PyTorch loops: the same numbers as `stabilitylab train`,
independent norm references, resume without duplicates, AMP, torch.compile, frozen
parameters, several param groups, DDP (gloo x2, rank 0 writes) and misuse errors."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

import stabilitylab as sl
from stabilitylab.cli import main
from stabilitylab.config import load_config
from stabilitylab.rundir import RunWriter, write_meta
from trainer import Trainer, train
from trainer.schedules import lr_at, momentum_at

TINY = [
    "data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=0", "model.img_size=16",
    "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.head_hidden_dim=64", "model.head_out_dim=32", "optim.batch_size=16", "optim.epochs=2",
    "optim.warmup_epochs=0.5", "knn.enabled=false", "threads=1", "log.progress=false",
    "model.pos_embed=learned", "precision=fp32",  # the Monitor's plain loop runs fp32 too
]


def vit(**kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                             embed_dim=32, depth=2, num_heads=2, num_classes=3, **kw)


def batch(step, n=8):
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)


def group_norms(model, grouping):
    """Reference per-group gradient L2 norms in float64, from the parameters' .grad."""
    params = dict(model.named_parameters())
    return np.array([torch.linalg.vector_norm(torch.cat([params[n].grad.double().flatten() for n in names])).item()
                     for _, names in grouping.groups])


def plain_loop(model, optimizer, monitor, steps, *, start=0, clip=1.0, references=None):
    for step in range(start, start + steps):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        monitor.after_backward(step, loss=loss)
        if references is not None:
            references[step] = group_norms(model, monitor.probe.grouping)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        monitor.after_step()


def test_monitor_on_the_moco_model_equals_stabilitylab_train(tmp_path):
    """The same MoCo steps, once by `trainer.train` and once by a user loop with the Monitor:
    identical per-group grad, weight and update norms, loss and lr."""
    cfg = load_config(None, TINY + ["optim.max_steps=4"])
    write_meta(tmp_path / "train", {"status": "running"})
    writer = RunWriter(tmp_path / "train")
    train(cfg, run_dir=tmp_path / "train", writer=writer)
    writer.close()

    trainer = Trainer(cfg, tmp_path / "unused", None)  # the same seeded model, optimizer and data
    trainer.sampler.set_epoch(0)
    with sl.Monitor(trainer.model, trainer.optimizer, tmp_path / "monitor") as monitor:
        for step, (x1, x2, _, _) in enumerate(trainer.loader):  # one epoch = 4 steps
            lr = lr_at(step, base_lr=cfg.optim.base_lr, global_batch=cfg.optim.batch_size,
                       steps_per_epoch=trainer.steps_per_epoch, warmup_epochs=cfg.optim.warmup_epochs,
                       epochs=cfg.optim.epochs)
            for group in trainer.optimizer.param_groups:
                group["lr"] = lr
            m = momentum_at(step, m=cfg.moco.m, steps_per_epoch=trainer.steps_per_epoch,
                            epochs=cfg.optim.epochs)
            trainer.momentum.fill_(m)  # m as the trainer passes it: a 0-d tensor (same rounding)
            loss, _ = trainer.model(x1, x2, trainer.momentum)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            monitor.after_backward(step, loss=loss)
            trainer.optimizer.step()
            monitor.after_step(lr=lr)

    trained, monitored = sl.load_run(tmp_path / "train"), sl.load_run(tmp_path / "monitor")
    assert list(monitored.layers["layer"].cat.categories) == [
        "patch_embed", "cls_token", "pos_embed", "blocks.0", "blocks.1", "norm", "projector", "predictor"]
    pd.testing.assert_frame_equal(trained.layers, monitored.layers)
    same = ["step", "lr", "loss", "grad_norm", "skipped"]
    pd.testing.assert_frame_equal(trained.steps[same], monitored.steps[same])
    for run in (trained, monitored):
        assert (run.meta["first_layer"], run.meta["last_block"]) == ("patch_embed", "blocks.1")
    assert (trained.meta["source"], monitored.meta["source"]) == ("stabilitylab train", "Monitor")


def test_plain_loop_norms_match_references_and_the_cli_reads_the_run(tmp_path, capsys):
    model = vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    references = {}
    with sl.Monitor(model, optimizer, tmp_path / "run", config={"lr": 1e-3, "arch": "vit"}) as monitor:
        plain_loop(model, optimizer, monitor, 6, references=references)
        monitor.log_knn(5, top1=0.4, n_queries=200, source="val")
    run = sl.load_run(tmp_path / "run")
    assert run.meta["status"] == "finished" and run.config == {"lr": 1e-3, "arch": "vit"}
    assert run.steps["step"].tolist() == list(range(6))
    assert (run.steps["lr"] == 1e-3).all() and run.steps["loss"].notna().all()
    grad = run.grad_norms()
    assert list(grad.columns) == ["patch_embed", "cls_token", "pos_embed", "blocks.0", "blocks.1", "norm", "head"]
    np.testing.assert_allclose(grad.to_numpy(), np.stack([references[s] for s in range(6)]), rtol=1e-5)
    np.testing.assert_allclose(run.steps["grad_norm"], np.sqrt((grad.to_numpy() ** 2).sum(axis=1)), rtol=1e-5)
    assert run.knn[["step", "source", "top1", "n_queries"]].values.tolist() == [[5, "val", 0.4, 200]]
    assert main(["analyze", str(tmp_path / "run"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_steps"] == 6 and summary["final_top1"] == pytest.approx(0.4)
    assert summary["lead_lag"]["first"] == "patch_embed" and summary["lead_lag"]["last"] == "blocks.1"


def test_foreign_model_first_layer_drives_the_analysis(tmp_path):
    """A ResNet's first layer is conv1 and its last block layer4: the summary and the report
    compare those, not a patch_embed the model does not have."""
    import torchvision

    from analysis import summarize_run
    from stabilitylab.report import build_report

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with sl.Monitor(model, optimizer, tmp_path / "resnet", every=2) as monitor:
        for step in range(4):
            x, y = batch(step, n=4)
            loss = nn.functional.cross_entropy(model(nn.functional.interpolate(x, 32)), y)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(step, loss=loss)
            optimizer.step()
            monitor.after_step()
    run = sl.load_run(tmp_path / "resnet")
    assert run.layers["step"].unique().tolist() == [0, 2]  # every=2
    assert run.steps["grad_norm"].isna().tolist() == [False, True, False, True]
    summary = summarize_run(run)
    assert (summary["lead_lag"]["first"], summary["lead_lag"]["last"]) == ("conv1", "layer4")
    assert "conv1 vs layer4" in build_report([run])  # the report's lead-lag uses the same layers


def test_resume_continues_without_duplicates(tmp_path):
    """A process that dies after its last flush, and a resumed one from its checkpoint at step
    5: every step once, the rows from step 6 on are the resumed process's."""
    model = vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = sl.Monitor(model, optimizer, tmp_path / "run", flush_every_steps=4)
    plain_loop(model, optimizer, first, 9)  # flushed through step 7; dies (never closed)
    del first
    assert sl.load_run(tmp_path / "run").steps["step"].max() == 7

    torch.manual_seed(1)
    resumed_model = vit()  # another process: restores its checkpoint of step 5 (here: fresh weights)
    optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    with sl.Monitor(resumed_model, optimizer, tmp_path / "run", resume=True) as monitor:
        references = {}
        plain_loop(resumed_model, optimizer, monitor, 4, start=6, references=references)
    run = sl.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == list(range(10))
    assert run.layers.groupby("step").size().eq(7).all()
    np.testing.assert_allclose(run.grad_norms().loc[6].to_numpy(), references[6], rtol=1e-5)
    assert run.events.query("kind == 'resumed'")["step"].tolist() == [6]
    assert run.meta["status"] == "finished" and "resumed_at" in run.meta


def test_amp_fp16_logs_unscaled_norms_and_the_scale(tmp_path):
    model = vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    references = {}
    with sl.Monitor(model, optimizer, tmp_path / "fp16", scaler=scaler) as monitor:
        for step in range(3):
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            if step == 2:
                with pytest.raises(RuntimeError, match="unscale_"):
                    monitor.after_backward(step, loss=loss)  # forgot to unscale
            scaler.unscale_(optimizer)
            monitor.after_backward(step, loss=loss)
            references[step] = group_norms(model, monitor.probe.grouping)
            scaler.step(optimizer)
            scaler.update()
            monitor.after_step()
    run = sl.load_run(tmp_path / "fp16")
    np.testing.assert_allclose(run.grad_norms().to_numpy(), np.stack(list(references.values())), rtol=1e-5)
    assert (run.grad_norms().to_numpy() < 100).all()  # not x 1024
    assert (run.steps["loss_scale"] == 2.0 ** 10).all() and not run.steps["skipped"].any()


def test_bf16_compiled_frozen_and_several_param_groups(tmp_path):
    model = vit()
    model.patch_embed.requires_grad_(False)  # frozen: left out
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "lr": 2e-3, "weight_decay": 0.1},
                                   {"params": no_decay, "lr": 1e-3, "weight_decay": 0.0}])
    compiled = torch.compile(model, backend="aot_eager")
    references = {}
    with sl.Monitor(compiled, optimizer, tmp_path / "run") as monitor:
        for step in range(3):
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(compiled(x), y)
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(step, loss=loss)
            references[step] = group_norms(model, monitor.probe.grouping)
            optimizer.step()
            monitor.after_step()
    run = sl.load_run(tmp_path / "run")
    assert list(run.grad_norms().columns) == ["cls_token", "pos_embed", "blocks.0", "blocks.1", "norm", "head"]
    assert run.meta["first_layer"] == "patch_embed"  # still the model's first layer, frozen
    np.testing.assert_allclose(run.grad_norms().to_numpy(), np.stack(list(references.values())), rtol=1e-5)
    assert (run.steps["lr"] == 2e-3).all()  # the first param group's
    assert (run.layers["update_l2"] > 0).all()


def test_misuse_fails_with_one_clear_message(tmp_path):
    model = vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = sl.Monitor(model, optimizer, tmp_path / "run")
    with pytest.raises(RuntimeError, match="without a preceding after_backward"):
        monitor.after_step()
    with pytest.raises(FileExistsError, match="resume=True"):
        sl.Monitor(model, optimizer, tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        sl.Monitor(model, optimizer, tmp_path / "other", resume=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="no trainable parameters"):
        sl.Monitor(nn.Linear(2, 2).requires_grad_(False), None, tmp_path / "frozen")


def test_a_failing_loop_leaves_a_readable_failed_run(tmp_path):
    model = vit()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ZeroDivisionError):
        with sl.Monitor(model, optimizer, tmp_path / "run") as monitor:
            plain_loop(model, optimizer, monitor, 3)
            1 / 0
    run = sl.load_run(tmp_path / "run")
    assert run.meta["status"] == "failed" and run.meta["error"].startswith("ZeroDivisionError")
    assert run.steps["step"].tolist() == [0, 1, 2]


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, timm
    from torch import nn
    import stabilitylab as sl

    out, world = sys.argv[1], int(sys.argv[2])
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2, num_classes=3)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with sl.Monitor(ddp, optimizer, out) as monitor:
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 3, (8,), generator=g)
            share = 8 // world
            loss = nn.functional.cross_entropy(ddp(x[rank * share:(rank + 1) * share]),
                                               y[rank * share:(rank + 1) * share])
            optimizer.zero_grad()
            loss.backward()
            monitor.after_backward(step, loss=loss)
            optimizer.step()
            monitor.after_step()
    if world > 1:
        dist.destroy_process_group()
""")


@pytest.mark.slow
def test_ddp_rank_zero_writes_the_global_gradient_norms(tmp_path):
    script = tmp_path / "ddp_loop.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "1"], env=env, check=True,
                   capture_output=True, timeout=300)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), str(tmp_path / "two"), "2"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = sl.load_run(tmp_path / "one"), sl.load_run(tmp_path / "two")
    assert two.meta["world_size"] == 2 and two.meta["status"] == "finished"
    assert list(two.grad_norms().columns) == list(one.grad_norms().columns)  # no `module.` prefix
    np.testing.assert_allclose(two.grad_norms().to_numpy(), one.grad_norms().to_numpy(), rtol=1e-4)
    assert two.steps["step"].tolist() == [0, 1, 2]  # written once, by rank 0


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_section_runs_as_written(tmp_path):
    """The README's "Use it in your own training loop" code block, then analyze and report."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Use it in your own training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    run = sl.load_run(tmp_path / "runs" / "mine")
    assert run.steps["step"].tolist() == list(range(50)) and len(run.knn) == 5
    assert run.meta["first_layer"] == "patch_embed" and run.config == {"lr": 1e-3}
    assert main(["analyze", str(tmp_path / "runs" / "mine")]) == 0
    assert main(["report", str(tmp_path / "runs" / "mine")]) == 0
    assert (tmp_path / "runs" / "mine" / "report.html").stat().st_size > 100_000


@pytest.mark.slow
def test_example_any_loop(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "any_loop.py"), "--out",
                             str(tmp_path / "digits"), "--epochs", "2"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"next: stabilitylab report {tmp_path / 'digits'}" in result.stdout
    run = sl.load_run(tmp_path / "digits")
    assert run.steps["step"].tolist() == list(range(2 * (1497 // 64)))
    assert run.knn["top1"].iloc[-1] > 0.15  # ten classes: chance 0.1
    assert run.steps["images_per_sec"].notna().sum() == len(run.steps) - 1
