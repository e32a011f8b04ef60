"""Learning-rate / momentum schedules against hand-computed values, and the optimizer factory."""
import math

import pytest
import torch

from trainer.config import OptimConfig
from trainer.optim import build_optimizer
from trainer.schedules import lr_at, momentum_at


# peak lr = 1.5e-4 * 4096 / 256 = 2.4e-3; 100 steps per epoch, 10 warmup epochs of 100
LR = dict(base_lr=1.5e-4, global_batch=4096, steps_per_epoch=100, warmup_epochs=10, epochs=100)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),                                   # start: official first iteration has lr 0
    (1, 2.4e-3 * 0.01 / 10),                    # fractional epoch 0.01
    (500, 1.2e-3),                              # mid-warmup, epoch 5
    (1000, 2.4e-3),                             # end of warmup, cos(0)
    (3250, 2.4e-3 * 0.5 * (1 + math.sqrt(0.5))),  # a quarter into the cosine
    (5500, 1.2e-3),                             # middle of the cosine
    (10000, 0.0),                               # end
    (12000, 0.0),                               # past the end: stays at the final value
])
def test_lr_at(step, expected):
    assert lr_at(step, **LR) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (500, 1.2e-3), (1000, 2.4e-3), (5500, 2.4e-3), (12000, 2.4e-3)])
def test_constant_schedule_holds_the_peak_after_warmup(step, expected):
    assert lr_at(step, **LR, schedule="constant") == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        lr_at(step, **LR, schedule="linear")


def test_lr_without_warmup_starts_at_peak():
    assert lr_at(0, **{**LR, "warmup_epochs": 0}) == pytest.approx(2.4e-3)


@pytest.mark.parametrize("step, expected", [
    (0, 0.99),
    (2500, 1 - 0.5 * (1 + math.sqrt(0.5)) * 0.01),  # epoch 25 of 100
    (5000, 0.995),
    (10000, 1.0),
    (12000, 1.0),
])
def test_momentum_at_cosine(step, expected):
    m = momentum_at(step, m=0.99, steps_per_epoch=100, epochs=100)
    assert m == pytest.approx(expected, abs=1e-12)


def test_momentum_constant():
    assert momentum_at(5000, m=0.99, steps_per_epoch=100, epochs=100, cosine=False) == 0.99


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 4))
        self.fc = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 2)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self):  # as timm ViTs declare; build_optimizer ignores it on purpose
        return {"cls_token"}

    def forward(self, x):
        return self.frozen(self.norm(self.fc(x) + self.cls_token[0]))


def _wd_by_param(opt):
    return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
@pytest.mark.parametrize("exclude", [False, True])
def test_build_optimizer(name, exclude):
    torch.manual_seed(0)
    net = Net()
    cfg = OptimConfig(name=name, weight_decay=0.1, exclude_norm_bias_wd=exclude)
    opt = build_optimizer(net, cfg, lr=0.01)
    wd = _wd_by_param(opt)
    trained = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert set(wd) == {id(p) for p in trained.values()}  # frozen params are in no group
    for n, p in trained.items():
        decayed = not exclude or (p.ndim > 1 and not n.endswith(".bias"))
        assert wd[id(p)] == (0.1 if decayed else 0.0), n
    assert all(g["lr"] == 0.01 for g in opt.param_groups)

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    for n, p in net.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == p.requires_grad, n


def test_optimizer_hyperparameters():
    net = Net()
    adamw = build_optimizer(net, OptimConfig(name="adamw", betas=[0.9, 0.95], eps=1e-6), lr=1e-3)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95) and adamw.param_groups[0]["eps"] == 1e-6
    lamb = build_optimizer(net, OptimConfig(name="lamb"), lr=1e-3)
    assert lamb.param_groups[0]["max_grad_norm"] is None  # no hidden gradient clipping
    lars = build_optimizer(net, OptimConfig(name="lars", momentum=0.8), lr=1e-3)
    assert lars.param_groups[0]["momentum"] == 0.8
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(net, OptimConfig(name="sgd"), lr=1e-3)
