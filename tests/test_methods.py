"""SimCLR and BYOL beside MoCo v3: losses against independent implementations of their
formulas, the shared method interface, and a few real training steps of each on the CPU."""

import numpy as np
import pytest
import torch

import stabilitylab as sl
from stabilitylab.config import ConfigError, load_config
from stabilitylab.rundir import RunWriter, write_meta
from trainer import train
from trainer.byol import regression_loss
from trainer.config import ProbeConfig
from trainer.linprobe import load_backbone, probe
from trainer.methods import build_method
from trainer.moco import MoCo
from trainer.probes import layer_groups
from trainer.simclr import SimCLR, nt_xent_loss

IMG = 16
TINY = [
    "data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=0", "model.img_size=16",
    "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.head_hidden_dim=64", "model.head_out_dim=16", "optim.batch_size=16", "optim.epochs=1",
    "optim.warmup_epochs=0.25", "knn.every=2", "knn.val_size=32", "threads=1", "log.progress=false",
    "precision=fp32",  # exact comparisons (one process against two): not bf16 autocast
]


def method(name, *overrides):
    return build_method(load_config(None, TINY + [f"method={name}", *overrides]))


def views(b=4):
    return torch.randn(b, 3, IMG, IMG), torch.randn(b, 3, IMG, IMG)


# ---------------------------------------------------------------- losses vs their formulas

def reference_nt_xent(z1, z2, temperature, others=None, rank=0):
    """SimCLR's l(i, j) = -log exp(s_ij/T) / sum_{k != i} exp(s_ik/T), averaged over all 2N
    anchors, with explicit loops; `others` are the other ranks' normalised [z1; z2] blocks."""
    def unit(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    mine = unit(np.concatenate([z1, z2]))
    blocks = list(others or [])
    blocks.insert(rank, mine)
    everything = np.concatenate(blocks)
    n2, n = len(mine), len(z1)
    total = 0.
    for i in range(n2):
        me = rank * n2 + i
        partner = rank * n2 + (i + n) % n2
        sims = {k: mine[i] @ everything[k] / temperature for k in range(len(everything)) if k != me}
        total += -(sims[partner] - np.log(sum(np.exp(s) for s in sims.values())))
    return total / n2


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_its_formula(temperature):
    z1, z2 = torch.randn(3, 5, dtype=torch.float64), 2 * torch.randn(3, 5, dtype=torch.float64)
    got = nt_xent_loss(z1, z2, temperature).item()
    np.testing.assert_allclose(got, reference_nt_xent(z1.numpy(), z2.numpy(), temperature), rtol=1e-12)


def test_nt_xent_over_the_views_of_all_ranks():
    """Rank 1 of 3: its anchors sit in the second block; every other rank's view is a negative."""
    z1, z2 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    others = [torch.nn.functional.normalize(torch.randn(4, 4, dtype=torch.float64), dim=1) for _ in range(2)]
    mine = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    got = nt_xent_loss(z1, z2, 0.2, torch.cat([others[0], mine, others[1]]), rank=1).item()
    ref = reference_nt_xent(z1.numpy(), z2.numpy(), 0.2, [o.numpy() for o in others], rank=1)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_nt_xent_exact_values():
    """One image: the only candidate of each view is its partner, so the loss is exactly 0.
    Two images with orthogonal embeddings: each anchor sees its partner at cos 1 and two
    negatives at cos 0, loss = log(1 + 2 exp(-1/T))."""
    z = torch.tensor([[1., 0.]])
    assert nt_xent_loss(z, 3 * z, 0.5).item() == 0.0
    z1 = torch.tensor([[1., 0.], [0., 1.]], dtype=torch.float64)
    np.testing.assert_allclose(nt_xent_loss(z1, 2 * z1, 0.5).item(), np.log(1 + 2 * np.exp(-2)), rtol=1e-12)


def test_byol_regression_loss_matches_its_formula():
    p, z = torch.randn(5, 7, dtype=torch.float64), 3 * torch.randn(5, 7, dtype=torch.float64)
    pn = p.numpy() / np.linalg.norm(p.numpy(), axis=1, keepdims=True)
    zn = z.numpy() / np.linalg.norm(z.numpy(), axis=1, keepdims=True)
    reference = np.mean([np.sum((pn[i] - zn[i]) ** 2) for i in range(5)])
    np.testing.assert_allclose(regression_loss(p, z).item(), reference, rtol=1e-12)
    # exact: aligned -> 0, opposite -> 4, orthogonal -> 2, whatever the norms
    a = torch.tensor([[2., 0.]], dtype=torch.float64)
    assert [regression_loss(a, b).item() for b in (5 * a, -a, torch.tensor([[0., 3.]], dtype=torch.float64))] \
        == [0.0, 4.0, 2.0]


def test_byol_is_the_moco_architecture_with_the_regression_loss():
    """Symmetrised loss of the module == regression_loss(p1, z2) + regression_loss(p2, z1)
    computed by hand from its parts (momentum update with m = 1 leaves the target as is)."""
    byol = method("byol", "model.head_bn=false").train()  # no batch statistics: views separable
    x1, x2 = views()
    loss, _ = byol(x1, x2, 1.0)
    p1, p2 = (byol.predictor(byol.projector(byol.backbone(x))) for x in (x1, x2))
    with torch.no_grad():
        z1, z2 = (byol.momentum_projector(byol.momentum_backbone(x)) for x in (x1, x2))
    torch.testing.assert_close(loss, regression_loss(p1, z2) + regression_loss(p2, z1))


# ---------------------------------------------------------------- the shared interface

@pytest.mark.parametrize("name,cls,groups", [
    ("mocov3", MoCo, ["projector", "predictor"]),
    ("simclr", SimCLR, ["projector"]),
    ("byol", MoCo, ["projector", "predictor"]),
])
def test_every_method_has_the_loop_interface(name, cls, groups):
    model = method(name).train()
    assert isinstance(model, cls) and model.feature_dim == 32
    x1, x2 = views()
    loss, features = model(x1, x2, 0.99)
    assert loss.ndim == 0 and torch.isfinite(loss) and not features.requires_grad
    torch.testing.assert_close(features, model.backbone_features(x1))
    loss.backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert [g for g, _ in layer_groups(model)][-len(groups):] == groups
    momentum = [n for n, _ in model.named_parameters() if n.startswith("momentum_")]
    assert bool(momentum) == (name != "simclr")


def test_byol_target_is_a_moving_average_of_the_online_encoder():
    byol = method("byol", "model.patch_proj=frozen").train()
    with torch.no_grad():  # make online and target differ
        for p in byol.backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    online = [p.detach().clone() for p in byol.backbone.parameters()]
    target = [p.detach().clone() for p in byol.momentum_backbone.parameters()]
    loss, _ = byol(*views(), 0.9)
    loss.backward()
    for o, t, new, p in zip(online, target, byol.momentum_backbone.parameters(), byol.backbone.parameters()):
        torch.testing.assert_close(new, 0.9 * t + 0.1 * o if p.requires_grad else t, rtol=0, atol=1e-6)
        assert new.grad is None


def test_unknown_method_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="method='swav' is not one of: mocov3, simclr, byol"):
        load_config(None, ["method=swav"])


# ---------------------------------------------------------------- training on the CPU

@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_each_method_trains_and_logs_like_moco(tmp_path, name):
    cfg = load_config(None, TINY + [f"method={name}", "model.patch_proj=frozen", "checkpoint.every_steps=2"])
    run_dir = tmp_path / name
    write_meta(run_dir, {"status": "running"})
    writer = RunWriter(run_dir)
    trainer = train(cfg, run_dir=run_dir, writer=writer)
    writer.close()
    run = sl.load_run(run_dir)
    assert run.steps["step"].tolist() == list(range(trainer.total_steps)) == list(range(4))
    assert run.steps["loss"].notna().all() and not run.steps["skipped"].any()
    layers = list(run.layers["layer"].cat.categories)
    assert layers[0] == "cls_token" and "patch_embed" not in layers  # frozen projection not logged
    assert layers[-1] == ("projector" if name == "simclr" else "predictor")
    assert set(run.knn["source"]) == {"queue", "val"} and run.knn["top1"].between(0, 1).all()
    state = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert state["config"]["method"] == name
    assert any(k.startswith("momentum_backbone.") for k in state["model"]) == (name == "byol")
    # its checkpoint is linear-probed like MoCo v3's: the base encoder is `backbone.*`
    row = probe(load_backbone(cfg.model, state), trainer.data, ProbeConfig(protocol="fast"),
                device=torch.device("cpu"))
    assert row["n_train"] == 64 and 0 <= row["top1"] <= 1


@pytest.mark.slow
def test_simclr_ddp_gloo_two_processes_equal_one_process(train_one_and_two_processes):
    """NT-Xent over views gathered from both ranks, with gradients: 2 processes of half the
    batch give the single-process loss and per-layer gradient norms."""
    one, two = train_one_and_two_processes(TINY + [
        "method=simclr", "data.augment=none", "model.head_bn=false", "optim.max_steps=3",
        "knn.enabled=false"])
    np.testing.assert_allclose(two.steps["loss"], one.steps["loss"], rtol=1e-5)
    np.testing.assert_allclose(two.grad_norms().to_numpy(), one.grad_norms().to_numpy(), rtol=1e-4)
