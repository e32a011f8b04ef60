"""GradientProbe against independent torch.linalg.vector_norm references on a tiny MoCo stand-in."""
import copy
import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from trainer.probes import GradientProbe, layer_groups, tensor_norms



class TinyMoco(nn.Module):
    """Same attribute / parameter naming as trainer.moco's module, at toy size."""

    def __init__(self, **vit_kwargs):
        super().__init__()
        self.backbone = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                          num_heads=2, num_classes=0, **vit_kwargs)
        self.projector = nn.Sequential(nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                       nn.Linear(16, 8))
        self.predictor = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def forward(self, x):
        return self.predictor(self.projector(self.backbone(x)))


def backward(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    model(torch.randn(4, 3, 16, 16, generator=gen)).square().sum().backward()


def reference(model, groups, attr):
    """Per group: (l2 of concatenated tensors, max abs) of `attr` ('grad' or 'data')."""
    params = dict(model.named_parameters())
    out = []
    for _, names in groups:
        tensors = [getattr(params[n], attr) for n in names]
        flat = torch.cat([t.double().flatten() for t in tensors if t is not None] or
                         [torch.zeros(1, dtype=torch.double)])
        out.append((torch.linalg.vector_norm(flat).item(), flat.abs().max().item()))
    return np.array(out)


BLOCKS = ["blocks.0", "blocks.1"]


def test_group_order_learned_pos_embed():
    groups = layer_groups(TinyMoco())  # forward order: timm concatenates cls, then adds pos
    assert [g for g, _ in groups] == ["patch_embed", "cls_token", "pos_embed", *BLOCKS, "norm",
                                      "projector", "predictor"]
    names = dict(groups)
    assert names["patch_embed"] == ["backbone.patch_embed.proj.weight",
                                    "backbone.patch_embed.proj.bias"]
    assert names["norm"] == ["backbone.norm.weight", "backbone.norm.bias"]
    assert len(names["blocks.1"]) == 12
    assert names["projector"][2:4] == ["projector.1.weight", "projector.1.bias"]  # BatchNorm
    assert not any(n.startswith("momentum_") for _, ns in groups for n in ns)


def test_group_order_frozen_patch_and_pos_embed_fc_norm_weightnorm():
    model = TinyMoco(global_pool="avg", fc_norm=True)
    model.backbone.pos_embed.requires_grad_(False)  # fixed sin-cos
    model.backbone.patch_embed.requires_grad_(False)  # frozen random patch projection
    assert [g for g, _ in layer_groups(model)] == ["cls_token", *BLOCKS, "fc_norm", "projector",
                                                   "predictor"]
    assert dict(layer_groups(model))["fc_norm"] == ["backbone.fc_norm.weight", "backbone.fc_norm.bias"]

    model = TinyMoco()
    nn.utils.parametrizations.weight_norm(model.backbone.patch_embed.proj)
    assert dict(layer_groups(model))["patch_embed"] == [
        "backbone.patch_embed.proj.bias",
        "backbone.patch_embed.proj.parametrizations.weight.original0",
        "backbone.patch_embed.proj.parametrizations.weight.original1"]


def test_per_param_names_and_wrappers():
    model = TinyMoco()
    groups = layer_groups(model, per_param=True)
    names = [g for g, _ in groups]
    assert all([g] == ns for g, ns in groups)
    assert names[:5] == ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias",
                         "backbone.cls_token", "backbone.pos_embed",
                         "backbone.blocks.0.norm1.weight"]
    assert names[-1] == "predictor.2.bias"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(names) == trained - {n for n in trained if n.startswith("momentum_")}
    assert layer_groups(nn.DataParallel(model), per_param=True) == groups  # `.module` stripped
    bare = [g for g, _ in layer_groups(model.backbone)]
    assert bare == ["patch_embed", "cls_token", "pos_embed", *BLOCKS, "norm"]


@pytest.mark.parametrize("per_param", [False, True])
def test_grad_and_update_norms_match_reference(per_param):
    torch.manual_seed(0)
    model = TinyMoco()
    groups = layer_groups(model, per_param=per_param)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = GradientProbe(model, per_param=per_param, update_norms=True, capacity=4)
    assert probe.layer_names == [g for g, _ in groups]
    for step in range(2):
        backward(model, seed=step)
        model.predictor[0].bias.grad = None  # an unused parameter: counts as zero
        grads = reference(model, groups, "grad")
        expected_total = math.sqrt((grads[:, 0] ** 2).sum())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        total = probe.record(step)
        probe.snapshot_params()
        optimizer.step()
        probe.record_update()
        params = reference(model, groups, "data")
        now = dict(model.named_parameters())
        updates = [torch.linalg.vector_norm(torch.cat(
            [(now[n].detach() - before[n]).double().flatten() for n in names])).item()
            for _, names in groups]
    out = probe.drain()
    last = out["step"] == 1
    assert total.shape == () and total.item() == pytest.approx(expected_total, rel=1e-5)
    np.testing.assert_allclose(out["grad_l2"][last], grads[:, 0], rtol=1e-5)
    np.testing.assert_allclose(out["grad_max_abs"][last], grads[:, 1], rtol=1e-5)
    np.testing.assert_allclose(out["param_l2"][last], params[:, 0], rtol=1e-5)
    np.testing.assert_allclose(out["update_l2"][last], updates, rtol=1e-5)
    assert all(out[c].dtype == np.float32 for c in ("grad_l2", "grad_max_abs", "param_l2",
                                                      "update_l2"))


def test_mixed_dtypes_computed_in_float32():
    model = TinyMoco()
    model.projector.double()
    model.predictor.bfloat16()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e3
    groups = layer_groups(model)
    probe = GradientProbe(model)
    probe.record(0)
    probe.record_update()
    out = probe.drain()
    np.testing.assert_allclose(out["grad_l2"], reference(model, groups, "grad")[:, 0], rtol=1e-5)
    np.testing.assert_allclose(out["param_l2"], reference(model, groups, "data")[:, 0], rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_abs_norms_equal_abs_then_max(dtype):
    """The CPU's max-abs path (one min/max pass per tensor) gives abs().max()'s values exactly:
    a negative extreme, signed zeros and inf bit for bit, NaN as NaN."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(7, 5, generator=gen), -torch.rand(9, generator=gen) - 3,
               torch.tensor([-0.0, -0.0]), torch.zeros(3), torch.tensor([1.0, -math.inf]),
               torch.tensor([2.0, math.nan, -5.0]), torch.randn(1, generator=gen)]
    tensors = [t.to(dtype) for t in tensors]
    got = tensor_norms(tensors, math.inf)
    expected = torch.stack([t.abs().max().float() for t in tensors])
    assert got.dtype == torch.float32
    finite = ~expected.isnan()
    assert got[finite].numpy().tobytes() == expected[finite].numpy().tobytes()
    assert got[~finite].isnan().all() and (~finite).sum() == 1


def test_update_norms_off_drain_rows_and_full():
    model = TinyMoco()
    probe = GradientProbe(model, update_norms=False, capacity=3)
    n_groups = len(probe.layer_names)
    for step in (10, 20, 30):
        backward(model, seed=step)
        probe.record(step)
        probe.snapshot_params()
        probe.record_update()
    assert probe.full
    with pytest.raises(RuntimeError, match="drain"):
        probe.record(40)
    out = probe.drain()
    assert out["step"].dtype == np.int64 and len(out["step"]) == 3 * n_groups
    np.testing.assert_array_equal(out["step"], np.repeat([10, 20, 30], n_groups))
    assert list(out["layer"][:n_groups]) == probe.layer_names and out["layer"].dtype == object
    assert np.isnan(out["update_l2"]).all() and np.isfinite(out["param_l2"]).all()
    assert not probe.full
    assert all(len(v) == 0 for v in probe.drain().values())
    probe.record(40)  # a row without record_update: param_l2 stays NaN (not stale)
    assert np.isnan(probe.drain()["param_l2"]).all()


def test_total_grad_norm_and_update_without_snapshot():
    model = TinyMoco()
    backward(model)
    probe = GradientProbe(model, update_norms=True)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()
                                              if p.grad is not None])
    assert probe.total_grad_norm().item() == pytest.approx(expected.item(), rel=1e-5)
    assert probe.record(0).item() == pytest.approx(expected.item(), rel=1e-5)
    probe.record_update()  # skipped update, no snapshot: update_l2 unknown
    probe.record(1)
    probe.snapshot_params()
    probe.record_update()  # skipped update after a snapshot: nothing moved
    out = probe.drain()
    assert np.isnan(out["update_l2"][out["step"] == 0]).all()
    assert (out["update_l2"][out["step"] == 1] == 0).all()
    assert np.isfinite(out["param_l2"]).all()
