"""The training loop end to end on a tiny synthetic model: tables written, NaN handling,
patch-projection clipping, resume equivalence and DDP (gloo x2) equivalence."""

import json
import platform

import numpy as np
import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab.cli import main
from stabilitylab.config import load_config
from stabilitylab.rundir import RunWriter, write_meta
from trainer import Trainer, train

TINY = [
    "data.dataset=synthetic", "data.synthetic_size=96", "data.num_workers=0", "model.img_size=16", "model.patch_size=4",
    "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.head_hidden_dim=64",
    "model.head_out_dim=32", "optim.batch_size=16", "optim.epochs=2", "optim.warmup_epochs=0.5",
    "knn.every=2", "knn.val_size=48", "threads=1", "log.progress=false",
]
# columns that must agree between runs that did the same arithmetic (timing columns differ)
SAME = ["step", "epoch", "lr", "momentum", "loss", "grad_norm", "skipped"]


def config(*overrides):
    return load_config(None, TINY + list(overrides))


def run_tiny(tmp_path, *overrides, name="run"):
    cfg = config(*overrides)
    run_dir = tmp_path / name
    write_meta(run_dir, {"status": "running"})
    writer = RunWriter(run_dir)
    trainer = train(cfg, run_dir=run_dir, writer=writer)
    writer.close()
    return trainer, sl.load_run(run_dir)


def test_a_run_writes_every_table(tmp_path):
    trainer, run = run_tiny(tmp_path)
    n = trainer.total_steps
    assert n == 2 * (96 // 16)
    assert run.steps["step"].tolist() == list(range(n))
    assert run.steps["loss"].notna().all() and not run.steps["skipped"].any()
    assert run.meta["threads"] == trainer.cfg.threads == 1  # the thread count the float sums ran on
    layers = list(run.layers["layer"].cat.categories)
    assert layers == ["patch_embed", "cls_token", "blocks.0", "blocks.1", "norm", "projector", "predictor"]
    assert len(run.layers) == n * len(layers)
    queue = run.knn[run.knn["source"] == "queue"]
    assert queue["step"].tolist() == list(range(1, n, 2))
    assert (queue["n_queries"] == 48).all() and queue["top1"].between(0, 1).all()
    val = run.knn[run.knn["source"] == "val"]
    assert val["step"].tolist() == [-1, 5, 11]  # the untrained network, then once per epoch
    assert val["epoch"].tolist() == [0.0, 1.0, 2.0]
    assert "checkpoint" in set(run.events["kind"])


def test_fresh_bank_knn_on_fixed_subsets_every_few_steps(tmp_path):
    trainer, run = run_tiny(tmp_path, "knn.full_every_steps=5", "knn.bank_size=40", "knn.full_queries=30",
                            "optim.schedule=constant", "optim.warmup_steps=3")
    val = run.knn[run.knn["source"] == "val"]
    assert val["step"].tolist() == [-1, 4, 9, 11]  # before training, every 5 steps, at the end (12 steps)
    assert (val["bank_size"] == 40).all() and (val["n_queries"] == 30).all()
    lr = run.steps["lr"].to_numpy()
    peak = trainer.peak_lr
    np.testing.assert_allclose(lr, [0, peak / 3, 2 * peak / 3] + [peak] * 9)


def test_queue_knn_beats_chance_on_structured_data(tmp_path):
    _, run = run_tiny(tmp_path)
    assert run.knn[run.knn["source"] == "val"]["top1"].iloc[-1] > 0.3  # 10 classes: chance 0.1


def test_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch):
    cfg = config("optim.max_steps=4", "knn.enabled=false")
    run_dir = tmp_path / "nan"
    writer = RunWriter(run_dir)
    trainer = Trainer(cfg, run_dir, writer)
    forward = trainer.forward

    def poisoned(x1, x2, m):
        loss, feats = forward(x1, x2, m)
        return (loss * float("nan") if trainer.step == 2 else loss), feats

    trainer.forward = poisoned
    trainer.fit()
    writer.close()
    write_meta(run_dir, {"status": "finished"})
    run = sl.load_run(run_dir)
    assert run.steps["skipped"].tolist() == [False, False, True, False]
    assert run.events[run.events["kind"] == "nan_loss"]["step"].tolist() == [2]
    at_2 = run.layers[run.layers["step"] == 2]
    assert (at_2["update_l2"] == 0).all()  # the update was really skipped


def test_consecutive_non_finite_steps_stop_the_run_with_a_checkpoint(tmp_path):
    cfg = config("max_nonfinite_steps=3", "knn.enabled=false")
    run_dir = tmp_path / "diverged"
    trainer = Trainer(cfg, run_dir, RunWriter(run_dir))
    forward = trainer.forward
    trainer.forward = lambda x1, x2, m: (lambda out: (out[0] * float("inf"), out[1]))(forward(x1, x2, m))
    from trainer import UserError
    with pytest.raises(UserError, match="3 non-finite steps in a row"):
        trainer.fit()
    assert any((run_dir / "checkpoints").glob("step-*.pt"))


def test_checkpoints_hold_only_tensors_and_plain_values_and_older_ones_still_load(tmp_path):
    """weights_only=True loads what the trainer saves; a checkpoint written before the numpy
    RNG state became a tensor (a numpy array inside) loads too and restores that state."""
    from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    trainer = Trainer(config("knn.enabled=false"), tmp_path, None)
    np.random.seed(123)
    state = trainer.state_dict()
    expected = np.random.rand(3)
    save_checkpoint(state, tmp_path, 0)
    np.random.seed(0)
    trainer.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path)))
    np.testing.assert_array_equal(np.random.rand(3), expected)
    state["rng"]["numpy"] = np.random.get_state()  # the older format
    expected = np.random.rand(3)
    save_checkpoint(state, tmp_path, 1)
    trainer.load_state_dict(load_checkpoint(latest_checkpoint(tmp_path)))
    np.testing.assert_array_equal(np.random.rand(3), expected)


def test_clip_bounds_only_the_patch_projection(tmp_path):
    trainer = Trainer(config("model.patch_proj=clip", "model.patch_proj_clip=1e-4", "knn.enabled=false"),
                      tmp_path / "clip", None)
    x1, x2, labels, _ = next(iter(torch.utils.data.DataLoader(
        trainer.data.train, batch_size=16, sampler=trainer.sampler)))
    trainer.step = 3  # past lr = 0
    params = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    row = trainer.train_step(x1, x2, labels)
    patch = [p.grad for n, p in params.items() if n.startswith("backbone.patch_embed.")]
    clipped_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in patch])).item()
    assert row["grad_norm"] > 1e-3  # logged norm is the one before clipping
    assert clipped_norm == pytest.approx(1e-4, rel=1e-3)
    assert row["patch_proj_grad_norm_clipped"] == pytest.approx(1e-4)
    other = [p.grad for n, p in params.items() if n.startswith("backbone.blocks.0.")]
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in other])).item() > 1e-3


def test_frozen_projection_stays_fixed_and_shared_through_training(tmp_path):
    trainer, _ = run_tiny(tmp_path, "model.patch_proj=frozen", "optim.max_steps=3", "knn.enabled=false")
    fresh = Trainer(config("model.patch_proj=frozen", "knn.enabled=false"), tmp_path / "fresh", None)
    for name in ["proj.weight", "proj.bias"]:
        trained = trainer.model.backbone.patch_embed.state_dict()[name]
        assert torch.equal(trained, fresh.model.backbone.patch_embed.state_dict()[name])
        assert torch.equal(trained, trainer.model.momentum_backbone.patch_embed.state_dict()[name])


@pytest.mark.slow
def test_a_mid_epoch_resume_supersedes_rows_and_reproduces_the_uninterrupted_run(tmp_path):
    """12 steps in one go == a run that logged steps 0-9 but whose newest checkpoint is of
    step 7 (as if killed before checkpointing step 9), resumed mid-epoch (CPU, fp32): the
    resumed process recomputes steps 8-9 and their rows, and the first process's final
    fresh-bank kNN row of step 9, replace the first process's. Random kills: test_faults."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(["train", "--out", str(straight), *TINY, "checkpoint.every_steps=4"]) == 0
    assert main(["train", "--out", str(interrupted), *TINY, "checkpoint.every_steps=4", "optim.max_steps=10"]) == 0
    (interrupted / "checkpoints" / "step-00000009.pt").unlink()
    assert 9 in set(sl.load_run(interrupted).knn.query("source == 'val'")["step"])
    meta = json.loads((interrupted / "meta.json").read_text())
    del meta["threads"], meta["flush_denormal"]  # the resumed process records its own
    (interrupted / "meta.json").write_text(json.dumps(meta))
    assert main(["train", "--resume", str(interrupted), "optim.max_steps=null"]) == 0
    straight, resumed = sl.load_run(straight), sl.load_run(interrupted)
    pd.testing.assert_frame_equal(straight.steps[SAME], resumed.steps[SAME])
    pd.testing.assert_frame_equal(straight.layers, resumed.layers)
    pd.testing.assert_frame_equal(straight.knn, resumed.knn)
    assert resumed.events.query("kind == 'resumed'")["step"].tolist() == [8]
    assert resumed.meta["status"] == "finished"
    assert resumed.meta["threads"] == 1 and resumed.meta["flush_denormal"] is (platform.machine() in ("x86_64", "AMD64"))
    assert resumed.meta["resume_overrides"] == ["optim.max_steps=null"]
    assert [(c["key"], c["checkpoint"], c["now"]) for c in resumed.meta["config_changes"]] == [
        ("optim.max_steps", 10, None)]
    assert resumed.config["optim"]["max_steps"] is None  # config.yaml describes the resumed run


def test_a_checkpoint_at_step_s_finds_every_row_up_to_s_on_disk(tmp_path, monkeypatch):
    import trainer.loop

    on_disk = {}
    save = trainer.loop.save_checkpoint

    def checking_save(state, run_dir, step, keep):
        run = sl.load_run(run_dir)
        on_disk[step] = (run.steps["step"].tolist(), sorted(set(run.layers["step"])))
        return save(state, run_dir, step, keep)

    monkeypatch.setattr(trainer.loop, "save_checkpoint", checking_save)
    run_tiny(tmp_path, "checkpoint.every_steps=3", "log.flush_every_steps=1000", "log.flush_every_s=1000",
             "knn.enabled=false")
    assert sorted(on_disk) == [2, 5, 8, 11]
    for step, (steps, layer_steps) in on_disk.items():
        assert steps == layer_steps == list(range(step + 1))


@pytest.mark.parametrize("keep, kept", [(1, [11]), (3, [5, 8, 11]), (0, [2, 5, 8, 11])])
def test_checkpoint_keep_keeps_the_newest(tmp_path, keep, kept):
    run_tiny(tmp_path, "checkpoint.every_steps=3", f"checkpoint.keep={keep}", "knn.enabled=false")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [f"step-{s:08d}.pt" for s in kept]


@pytest.mark.slow
def test_ddp_gloo_two_processes_equal_one_process(train_one_and_two_processes):
    """Same global batch on 1 and 2 CPU processes: same loss and per-layer gradient norms.
    Heads without BatchNorm: SyncBatchNorm needs CUDA, so on CPU BN statistics stay per rank."""
    one, two = train_one_and_two_processes(TINY + [
        "precision=fp32",  # bf16 autocast (auto on a bf16 CPU) rounds 1 and 2 processes differently
        "data.augment=none", "model.head_bn=false", "optim.max_steps=4", "knn.full_every_epochs=0",
        "knn.queue_fraction=1"])
    np.testing.assert_allclose(two.steps["loss"], one.steps["loss"], rtol=1e-5)
    np.testing.assert_allclose(two.steps["grad_norm"], one.steps["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(two.grad_norms().to_numpy(), one.grad_norms().to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(two.knn["top1"], one.knn["top1"], atol=1e-9)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_log_unscaled_norms(tmp_path, precision):
    """Autocast runs on the CPU too; fp16 logs the GradScaler scale, norms stay unscaled."""
    trainer, run = run_tiny(tmp_path, f"precision={precision}", "optim.max_steps=3", "knn.enabled=false")
    assert trainer.precision == precision
    steps = run.steps
    finite = np.isfinite(steps["grad_norm"])
    assert steps["loss"].notna().all() and (steps["grad_norm"][finite] < 1e3).all()
    assert (steps["skipped"] == ~finite).all()  # an fp16 overflow is a skipped step
    if precision == "fp16":  # the scale (logged after the step) halves after each overflow
        expected = 65536.0 * 0.5 ** np.cumsum(~finite.to_numpy())
        np.testing.assert_array_equal(steps["loss_scale"], expected)
    else:
        assert steps["loss_scale"].isna().all() and finite.all()


def test_layer_statistics_can_be_switched_off(tmp_path):
    _, run = run_tiny(tmp_path, "log.every=0", "optim.max_steps=3", "knn.enabled=false")
    assert len(run.steps) == 3 and run.steps["grad_norm"].notna().all()
    assert run.layers.empty


def test_compiled_step_never_recompiles(tmp_path, monkeypatch):
    """compile=true: lr and m change every step (warm-up, cosine momentum) but reach the
    compiled forward as tensors, so dynamo compiles one graph once. torch.compile runs with
    the aot_eager backend here (same graph capture and guards as inductor, no C++ build)."""
    import functools

    import torch._dynamo

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    counters.clear()
    trainer, run = run_tiny(tmp_path, "compile=true", "optim.max_steps=5", "knn.every=2")
    assert run.steps["lr"].nunique() == 5 and run.steps["momentum"].nunique() == 5
    assert counters["frames"]["ok"] == 1 and counters["stats"]["unique_graphs"] == 1
    assert run.steps["loss"].notna().all()
    torch._dynamo.reset()


def test_workers_pipeline_trains_too(tmp_path):
    """data.pipeline=workers (PIL in the DataLoader workers) against the default device
    pipeline: the same samples and (to float rounding) views, so nearly the same losses."""
    on_device, device = run_tiny(tmp_path, "optim.max_steps=4", "knn.enabled=false", "precision=fp32",
                                 name="device")
    in_workers, workers = run_tiny(tmp_path, "optim.max_steps=4", "knn.enabled=false", "precision=fp32",
                                   "data.pipeline=workers", name="workers")
    assert on_device.cfg.data.pipeline == "device" and in_workers.cfg.data.pipeline == "workers"
    np.testing.assert_allclose(workers.steps["loss"], device.steps["loss"], rtol=2e-2)
