"""Backbone and heads: MoCo v3 init and pos embed, pooling / patch-projection switches."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from trainer.config import ModelConfig, TrainConfig, resolve
from trainer.heads import build_predictor, build_projector
from trainer.model import build_backbone, patch_proj_parameters, sincos_pos_embed

DIM, PATCH, IMG = 32, 4, 16


def tiny(**kw):
    model = ModelConfig(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=2,
                        head_hidden_dim=64, head_out_dim=16, **kw)
    return resolve(TrainConfig(model=model)).model


def official_sincos(h, w, dim, temperature=10000.):
    """MoCo v3 vits.py build_2d_sincos_position_embedding, line by line in numpy."""
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64),
                                 indexing="ij")  # torch.meshgrid default
    pos_dim = dim // 4
    omega = 1. / temperature ** (np.arange(pos_dim, dtype=np.float64) / pos_dim)
    out_w = np.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = np.einsum("m,d->md", grid_h.flatten(), omega)
    pos_emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
    return np.concatenate([np.zeros((1, dim)), pos_emb], axis=0)[None]


@pytest.mark.parametrize("grid,dim", [((4, 4), 32), ((14, 14), 384)])
def test_sincos_matches_official(grid, dim):
    ours = sincos_pos_embed(grid, dim).numpy()
    np.testing.assert_allclose(ours, official_sincos(*grid, dim), atol=1e-5)


def test_sincos_backbone_fixed():
    model = build_backbone(tiny())
    assert not model.pos_embed.requires_grad
    ref = official_sincos(IMG // PATCH, IMG // PATCH, DIM)
    np.testing.assert_allclose(model.pos_embed.detach().numpy(), ref, atol=1e-5)


def test_learned_and_no_pos_embed():
    learned = build_backbone(tiny(pos_embed="learned"))
    assert learned.pos_embed.requires_grad
    assert 0.01 < learned.pos_embed.std().item() < 0.03  # trunc_normal(std=.02)
    assert build_backbone(tiny(pos_embed="none")).pos_embed is None


def test_moco_init():
    """Patch projection: our xavier on the (dim, 3*p*p) view; qkv: timm's per-third bound."""
    model = build_backbone(tiny())
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6. / (3 * PATCH * PATCH + DIM))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(model.patch_embed.proj.bias == 0)
    qkv = model.blocks[0].attn.qkv
    qkv_bound = math.sqrt(6. / (DIM + DIM))  # (3*dim, dim) weight split into q, k, v
    assert qkv.weight.abs().max() <= qkv_bound and qkv.weight.abs().max() > 0.9 * qkv_bound
    assert torch.all(qkv.bias == 0)
    fc1 = model.blocks[0].mlp.fc1.weight  # xavier_uniform
    assert fc1.abs().max() <= math.sqrt(6. / sum(fc1.shape))
    assert model.cls_token.abs().max() < 1e-4


@pytest.mark.parametrize("pool", ["token", "avg", "avg_nonorm"])
def test_pool(pool):
    model = build_backbone(tiny(pool=pool)).eval()
    x = torch.randn(2, 3, IMG, IMG)
    tokens = model.forward_features(x)  # blocks then model.norm
    out = model(x)
    assert out.shape == (2, DIM)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + (pool != "avg_nonorm")  # two per block (+ final)
    assert isinstance(model.fc_norm, nn.Identity)
    if pool == "token":
        torch.testing.assert_close(out, tokens[:, 0])
    else:  # average of the patch tokens, after the final LayerNorm unless avg_nonorm
        assert isinstance(model.norm, nn.Identity if pool == "avg_nonorm" else nn.LayerNorm)
        torch.testing.assert_close(out, tokens[:, 1:].mean(1))


@pytest.mark.parametrize("variant", ["learned", "frozen", "batchnorm", "weightnorm", "clip"])
def test_patch_proj_variants(variant):
    model = build_backbone(tiny(patch_proj=variant)).train()
    model(torch.randn(4, 3, IMG, IMG)).square().mean().backward()
    names = {n for n, p in model.named_parameters()}
    trainable = patch_proj_parameters(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    patch_ids = {id(p) for n, p in model.named_parameters() if n.startswith("patch_embed.")}
    assert {id(p) for p in trainable} <= patch_ids
    proj = model.patch_embed.proj
    if variant == "frozen":
        assert trainable == [] and proj.weight.grad is None and proj.bias.grad is None
    elif variant == "batchnorm":
        bn = model.patch_embed.norm.bn
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == DIM
        assert bn.running_mean.abs().sum() > 0  # saw the (B, N, C) tokens over C
        assert {"patch_embed.norm.bn.weight", "patch_embed.norm.bn.bias"} <= names
    elif variant == "weightnorm":
        assert parametrize.is_parametrized(proj, "weight")
        assert {"patch_embed.proj.parametrizations.weight.original0",
                "patch_embed.proj.parametrizations.weight.original1"} <= names
    else:  # learned, clip: plain conv, same parameters
        assert len(trainable) == 2 and isinstance(model.patch_embed.norm, nn.Identity)
        assert names == {n for n, _ in build_backbone(tiny()).named_parameters()}


def test_qk_norm_bounds_every_attention_logit_by_the_head_width():
    """With unit-gain LayerNorms on q and k, |q|, |k| <= sqrt(d_head), so by Cauchy-Schwarz
    q.k / sqrt(d_head) <= sqrt(d_head) however large the qkv weights grow; without, it grows."""
    from trainer.probes_attention import AttentionProbe

    head_dim = DIM // 2
    x = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    max_logit = {}
    for qk_norm in (False, True):
        torch.manual_seed(0)
        model = build_backbone(tiny(qk_norm=qk_norm)).eval()
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight[:2 * DIM] *= 30  # q and k rows: the logit growth of a collapse
        probe = AttentionProbe(model, samples=4, capacity=1)
        probe.arm(0)
        with torch.no_grad():
            model(x)
        probe.disarm()
        max_logit[qk_norm] = probe.drain()["max_logit"]
    assert (max_logit[True] <= math.sqrt(head_dim)).all() and (max_logit[True] > 0.5).all()
    assert (max_logit[False] > 10 * math.sqrt(head_dim)).all()
    names = {n for n, _ in build_backbone(tiny(qk_norm=True)).named_parameters()}
    assert names - {n for n, _ in build_backbone(tiny()).named_parameters()} == {
        f"blocks.{i}.attn.{qk}_norm.{p}" for i in range(2) for qk in "qk" for p in ("weight", "bias")}


@pytest.mark.parametrize("field,value", [("pos_embed", "rope"), ("pool", "max"),
                                         ("patch_proj", "layernorm")])
def test_unknown_values_raise(field, value):
    with pytest.raises(ValueError, match=f"model.{field}=.*not one of"):
        build_backbone(tiny(**{field: value}))


@pytest.mark.parametrize("head_bn", [True, False])
def test_heads_layout(head_bn):
    cfg = tiny(head_bn=head_bn)
    proj, pred = build_projector(cfg, DIM), build_predictor(cfg)
    kinds = lambda seq: [type(m).__name__ for m in seq]  # noqa: E731
    if head_bn:
        assert kinds(proj) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
        assert not proj[-1].affine
        assert kinds(pred) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    else:
        assert kinds(proj) == ["Linear", "ReLU"] * 2 + ["Linear"]
        assert kinds(pred) == ["Linear", "ReLU", "Linear"]
    linears = [m for m in [*proj, *pred] if isinstance(m, nn.Linear)]
    assert all((m.bias is None) == head_bn for m in linears)
    assert [m.weight.shape for m in linears] == [(64, DIM), (64, 64), (16, 64), (64, 16), (16, 64)]
    assert isinstance(build_predictor(tiny(predictor=False)), nn.Identity)


def test_batchnorm_survives_sync_conversion():
    """The loop's convert_sync_batchnorm must swap the inner BN and keep the token transpose."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_backbone(tiny(patch_proj="batchnorm")))
    assert isinstance(model.patch_embed.norm.bn, nn.SyncBatchNorm)
    assert model.train()(torch.randn(2, 3, IMG, IMG)).shape == (2, DIM)
