"""MoCo module: loss, momentum update, frozen-parameter guarantees, every ablation switch, the
fused-view step against the per-view step."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from trainer import distributed
from trainer.config import ModelConfig, MocoConfig, TrainConfig, resolve
from trainer.moco import MoCo, contrastive_loss

IMG = 16


def tiny_moco(temperature=0.2, **kw):
    model = ModelConfig(img_size=IMG, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                        head_hidden_dim=64, head_out_dim=16, **kw)
    cfg = resolve(TrainConfig(model=model, moco=MocoConfig(temperature=temperature)))
    return MoCo(cfg.model, cfg.moco)


def views(b=4):
    return torch.randn(b, 3, IMG, IMG), torch.randn(b, 3, IMG, IMG)


def reference_loss(q, k, temperature, rank=0):
    """Mean over rows of -log softmax(q_i . k_j / T)[positive], times 2T, with explicit loops."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    total = 0.
    for i in range(len(q)):
        logits = [q[i] @ k[j] / temperature for j in range(len(k))]
        pos = logits[rank * len(q) + i]
        total += -(pos - np.log(np.sum(np.exp(logits))))
    return total / len(q) * 2 * temperature


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_contrastive_loss(temperature):
    q, k = torch.randn(6, 5, dtype=torch.float64), 3 * torch.randn(6, 5, dtype=torch.float64)
    loss = contrastive_loss(q, k, temperature)
    assert loss.ndim == 0
    np.testing.assert_allclose(loss.item(), reference_loss(q.numpy(), k.numpy(), temperature))
    # rank offset: q's positives sit in the second block of the gathered keys
    k_all = torch.randn(12, 5, dtype=torch.float64)
    np.testing.assert_allclose(contrastive_loss(q, k_all, temperature, rank=1).item(),
                               reference_loss(q.numpy(), k_all.numpy(), temperature, rank=1))


def test_gathered_loss(monkeypatch):
    """Simulated 2-rank run on rank 1: keys gathered [other rank, ours], labels offset by N."""
    other = torch.randn(4, 16)
    dist = distributed.dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "all_gather",
                        lambda out, x: [out[0].copy_(other), out[1].copy_(x)])
    model = tiny_moco()
    q, k = torch.randn(4, 16), torch.randn(4, 16)
    ref = reference_loss(q.numpy(), torch.cat([other, k]).numpy(), 0.2, rank=1)
    np.testing.assert_allclose(model._loss(q, k).item(), ref, rtol=1e-5)
    assert distributed.concat_all_gather(k).shape == (8, 16)


def test_single_process_gather_is_identity():
    k = torch.randn(3, 4)
    assert distributed.concat_all_gather(k) is k and distributed.get_rank() == 0


def test_structure_and_initial_copy():
    model = tiny_moco()
    assert model.feature_dim == 32
    for base, mom in [(model.backbone, model.momentum_backbone),
                      (model.projector, model.momentum_projector)]:
        for (n, b), (_, m) in zip(base.named_parameters(), mom.named_parameters()):
            assert torch.equal(b, m) and not m.requires_grad, n
    assert not isinstance(model.predictor, nn.Identity)


def test_momentum_update_values():
    model = tiny_moco(patch_proj="frozen")
    with torch.no_grad():  # make base and momentum differ
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    base = [p.detach().clone() for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    mom = [p.clone() for p in [*model.momentum_backbone.parameters(),
                               *model.momentum_projector.parameters()]]
    trainable = [p.requires_grad for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    model.update_momentum_encoder(0.9)
    new = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert not all(trainable)  # frozen patch projection and sin-cos pos embed
    for b, m, n, t in zip(base, mom, new, trainable):
        torch.testing.assert_close(n, 0.9 * m + 0.1 * b if t else m, rtol=0, atol=1e-6)


def test_forward_outputs():
    model = tiny_moco().train()
    x1, x2 = views()
    loss, f1 = model(x1, x2, 0.99)
    assert loss.ndim == 0 and torch.isfinite(loss) and not f1.requires_grad
    torch.testing.assert_close(f1, model.backbone_features(x1))  # no BN/dropout in the backbone
    loss.backward()
    assert all(p.grad is None for p in model.momentum_backbone.parameters())
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("opt_params", ["trainable", "all"])
def test_frozen_projection_stays_fixed(opt_params):
    """AdamW with weight decay: frozen projection and sin-cos pos embed unchanged, same in both."""
    model = tiny_moco(patch_proj="frozen").train()
    fixed = {n: p.detach().clone() for n, p in model.named_parameters()
             if n.startswith(("backbone.patch_embed.", "backbone.pos_embed"))}
    assert len(fixed) == 3
    qkv = model.backbone.blocks[0].attn.qkv.weight.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad or opt_params == "all"]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss, _ = model(*views(), 0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = dict(model.named_parameters())
    for n, p in fixed.items():
        assert torch.equal(state[n], p), n
        assert torch.equal(state[n.replace("backbone.", "momentum_backbone.", 1)], p), n
    assert not torch.equal(model.backbone.blocks[0].attn.qkv.weight, qkv)


@pytest.mark.parametrize("variant,expected", [
    ("learned", {"proj.weight", "proj.bias"}),
    ("frozen", {"proj.weight", "proj.bias"}),
    ("clip", {"proj.weight", "proj.bias"}),
    ("batchnorm", {"proj.weight", "proj.bias", "norm.bn.weight", "norm.bn.bias"}),
    ("weightnorm", {"proj.bias", "proj.parametrizations.weight.original0",
                    "proj.parametrizations.weight.original1"}),
])
def test_patch_param_names(variant, expected):
    model = tiny_moco(patch_proj=variant)
    names = [n for n, _ in model.named_parameters()]
    patch = {n.removeprefix("backbone.patch_embed.") for n in names
             if n.startswith("backbone.patch_embed.")}
    assert patch == expected


@pytest.mark.parametrize("switch", [
    dict(pos_embed="sincos"), dict(pos_embed="learned"), dict(pos_embed="none"),
    dict(pool="token"), dict(pool="avg"), dict(pool="avg_nonorm"),
    dict(head_bn=True), dict(head_bn=False), dict(predictor=True), dict(predictor=False),
    dict(patch_proj="batchnorm"), dict(patch_proj="weightnorm"),
])
def test_ablation_switch_steps(switch):
    model = tiny_moco(**switch).train()
    if switch.get("predictor") is False:
        assert isinstance(model.predictor, nn.Identity)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in model.momentum_projector.parameters()]
    for _ in range(2):
        loss, f1 = model(*views(), 0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and f1.shape == (4, 32)
    after = list(model.momentum_projector.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # momentum encoder moved


def per_view_step(model, x1, x2, m):
    """The official code's forward: each view through the base encoder and heads in its own
    call, the momentum update, then each view through the momentum encoder in its own call."""
    q1 = model.predictor(model.projector(model.backbone(x1)))
    q2 = model.predictor(model.projector(model.backbone(x2)))
    with torch.no_grad():
        model.update_momentum_encoder(m)
        k1 = model.momentum_projector(model.momentum_backbone(x1))
        k2 = model.momentum_projector(model.momentum_backbone(x2))
    return model._loss(q1, k2) + model._loss(q2, k1)


# fp32 tolerance of the fused-view step against two calls, elementwise |a - b| <= atol + rtol |b|:
# the backbone's matmuls over 2B rows block differently from B rows, so values agree to float
# rounding, not bit for bit (measured on this model: at most 4e-7 relative for entries of
# gradients of order 0.1-200, 2e-8 absolute for entries near 0).
FUSED_RTOL, FUSED_ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("switch", [dict(), dict(patch_proj="batchnorm"), dict(pool="avg")])
def test_fused_views_equal_the_per_view_step(switch):
    """Loss, every gradient, the momentum encoder after its update and the heads' BatchNorm
    running statistics (per view, as two calls keep them) match the per-view step. A backbone
    with BatchNorm (patch_proj=batchnorm) is not fused."""
    torch.manual_seed(0)
    fused = tiny_moco(**switch).train()
    assert fused.fuse_views == (switch.get("patch_proj") != "batchnorm")
    per_view = copy.deepcopy(fused)
    x1, x2 = views(8)
    loss, features = fused(x1, x2, 0.9)
    loss.backward()
    reference = per_view_step(per_view, x1, x2, 0.9)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    ours, theirs = dict(fused.named_parameters()), dict(per_view.named_parameters())
    for name, p in ours.items():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=FUSED_RTOL, atol=FUSED_ATOL,
                                       msg=name)
        else:  # the momentum encoder after the update (and frozen parameters)
            torch.testing.assert_close(p, theirs[name], rtol=0, atol=1e-7, msg=name)
    buffers = dict(per_view.named_buffers())
    assert any("running_mean" in name for name in buffers)
    for name, b in fused.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=FUSED_RTOL, atol=1e-6, msg=name)
    torch.testing.assert_close(features, per_view.backbone_features(x1), rtol=FUSED_RTOL, atol=FUSED_ATOL)


def test_momentum_as_a_tensor_equals_the_float():
    """The trainer passes m as a 0-d device tensor (no recompiles, no host sync)."""
    torch.manual_seed(0)
    a = tiny_moco().train()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    b = copy.deepcopy(a)
    x1, x2 = views()
    loss_a, _ = a(x1, x2, 0.95)
    loss_b, _ = b(x1, x2, torch.tensor(0.95))
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)  # 1 - m rounds in float32
    for pa, pb in zip(a.momentum_backbone.parameters(), b.momentum_backbone.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
