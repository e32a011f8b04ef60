"""OptimizerStateProbe against float64 references computed from the optimizer's state and the
parameters by hand (AdamW, LAMB, LARS), and its columns in a real run's `layers` table."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.optim import Lamb, Lars
from torch import nn

import stabilitylab as sl
from stabilitylab.plots_probes import optimizer_state_figure, optimizer_state_section
from trainer.probes import GradientProbe, layer_groups
from trainer.probes_optim import COLUMNS, SMALL_V, OptimizerStateProbe, _count_below


class Tiny(nn.Module):
    """Three layer groups named like the MoCo module's: blocks.0, blocks.1, projector."""

    def __init__(self):
        super().__init__()
        # blocks of modules (blocks.i.0.weight), as a ViT's: a bare layer list is one group
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(6, 5)), nn.Sequential(nn.Linear(5, 4)))
        self.projector = nn.Linear(4, 3)

    def forward(self, x):
        return self.projector(torch.tanh(self.blocks(x)))


def backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    (model(torch.randn(8, 6, generator=gen)) ** 3).sum().backward()


def reference_state(model, optimizer, groups, eps):
    """Per group, from state before the step: (freshness, small-v share) in float64."""
    params = dict(model.named_parameters())
    out = []
    for _, names in groups:
        g2 = v = small = n = 0.0
        for name in names:
            p = params[name]
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                return None
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            t = float(state.get("step", group.get("step", 0)))
            v_hat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** t)
            g2 += p.grad.double().square().sum().item()
            v += v_hat.sum().item()
            small += (v_hat.sqrt() < SMALL_V * eps).sum().item()
            n += p.numel()
        out.append((g2 / v, small / n))
    return np.array(out)


def reference_update(model, before, groups, lr):
    """Per group: (RMS of the update / lr, cosine of the update with -g) in float64."""
    params = dict(model.named_parameters())
    out = []
    for _, names in groups:
        update = torch.cat([(params[n].detach().double() - before[n]).flatten() for n in names])
        grad = torch.cat([params[n].grad.double().flatten() for n in names])
        out.append((update.square().mean().sqrt().item() / lr,
                    torch.dot(update, -grad).item() / (update.norm() * grad.norm()).item()))
    return np.array(out)


def steps_with(optimizer_factory, n_steps=3, eps=1e-8):
    """Run n_steps probed steps; return (probe columns, [per-step references])."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = optimizer_factory(model.parameters())
    probe = OptimizerStateProbe(model, optimizer, capacity=8)
    groups = layer_groups(model)
    assert probe.layer_names == [g for g, _ in groups] == ["blocks.0", "blocks.1", "projector"]
    references = []
    for step in range(n_steps):
        backward(model, step)
        state = reference_state(model, optimizer, groups, eps)
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        probe.before_step(step)
        optimizer.step()
        probe.after_step()
        references.append((state, reference_update(model, before, groups, optimizer.param_groups[0]["lr"])))
    columns = probe.drain()
    values = np.stack([columns[c] for c in COLUMNS], axis=1).reshape(n_steps, len(groups), len(COLUMNS))
    return values, references


@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_adam_family_columns_match_the_state_by_hand(name):
    eps = 1e-3  # large, so that some entries of v_hat fall below (10 eps)^2
    factory = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=eps, weight_decay=0.1),
               "lamb": lambda ps: Lamb(ps, lr=1e-2, eps=eps, weight_decay=0.1, max_grad_norm=None)}[name]
    values, references = steps_with(factory, eps=eps)
    assert np.isnan(values[0, :, :2]).all()  # no second moment before the first step
    small_v = []
    for step, (state, update) in enumerate(references):
        if state is not None:
            np.testing.assert_allclose(values[step, :, :2], state, rtol=1e-5, atol=1e-7)
            small_v.extend(state[:, 1])
        np.testing.assert_allclose(values[step, :, 2:4], update, rtol=1e-4)
    assert np.isnan(values[..., 4]).all()  # no trust ratio outside LARS
    assert 0 < max(small_v) < 1  # the small-v count was really exercised


def test_lars_trust_ratio_and_no_adam_state():
    values, references = steps_with(lambda ps: Lars(ps, lr=0.5, momentum=0.9, weight_decay=1e-2,
                                                   trust_coeff=1e-3), n_steps=2)
    assert np.isnan(values[..., :2]).all()
    for step, (_, update) in enumerate(references):
        np.testing.assert_allclose(values[step, :, 2:4], update, rtol=1e-4)
    # the trust ratio by hand on the weights and gradients the first step saw
    torch.manual_seed(0)
    model = Tiny()
    backward(model, 0)
    expected = []
    for _, names in layer_groups(model):
        params = [dict(model.named_parameters())[n] for n in names]
        ratios = [1e-3 * p.norm().item() / (p.grad.norm().item() + 1e-2 * p.norm().item() + 1e-8)
                  if p.norm() > 0 else 1.0 for p in params]  # zero-initialised biases: 1
        expected.append(np.average(ratios, weights=[p.numel() for p in params]))
    np.testing.assert_allclose(values[0, :, 4], expected, rtol=1e-5)


def test_named_parameters_skipped_update_and_parameters_outside_the_optimizer():
    """The Monitor's form: named parameters; a skipped update has zero RMS and no cosine; a
    group the optimizer does not hold has no state and no lr (NaN)."""
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.AdamW(model.blocks.parameters(), lr=1e-2)
    probe = OptimizerStateProbe(list(model.named_parameters()), optimizer, capacity=4)
    for step in range(2):
        backward(model, step)
        probe.before_step(step)
        if step == 0:
            optimizer.step()
        probe.after_step()
    columns = probe.drain()
    rows = {(s, layer): i for i, (s, layer) in enumerate(zip(columns["step"], columns["layer"]))}
    skipped, projector = rows[1, "blocks.0"], rows[0, "projector"]
    assert columns["update_rms_over_lr"][skipped] == 0 and math.isnan(columns["update_cos_neg_grad"][skipped])
    assert np.isfinite(columns["adam_freshness"][skipped])  # the state of step 0 is there
    assert all(math.isnan(columns[c][projector]) for c in ("adam_freshness", "update_rms_over_lr"))
    with pytest.raises(RuntimeError, match="after_step"):
        probe.after_step()


def test_sharing_the_gradient_probe_changes_no_number():
    """Handed the GradientProbe, the probe reuses its weight copy, update and gradient norms
    and logs bit for bit what it logs alone, also when gradients are clipped in between (their
    norms are taken again) and on a skipped update."""
    runs = []
    for shared in (False, True):
        torch.manual_seed(0)
        model = Tiny()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
        gradients = GradientProbe(model, capacity=8)
        probe = OptimizerStateProbe(model, optimizer, capacity=8, gradients=gradients if shared else None)
        assert (probe.snapshot is gradients.snapshot) == shared  # one copy of the weights
        for step in range(5):
            backward(model, step)
            gradients.record(step)
            if step % 2:  # clipping after the gradient probe, before the optimizer sees them
                assert torch.nn.utils.clip_grad_norm_(model.blocks[0].parameters(), 0.1) > 0.1
            gradients.snapshot_params()
            probe.before_step(step)
            if step != 3:
                optimizer.step()
            probe.after_step()
            gradients.record_update()
        runs.append((gradients.drain(), probe.drain()))
    for alone, shared in zip(*runs):
        assert alone.keys() == shared.keys()
        for name in alone:
            np.testing.assert_array_equal(alone[name], shared[name], err_msg=name)
    clipped = (runs[0][1]["step"] == 3) & (runs[0][1]["layer"] == "blocks.0")
    assert runs[0][1]["update_rms_over_lr"][clipped] == 0  # the skipped update
    with pytest.raises(ValueError, match="same parameters"):
        OptimizerStateProbe(model, optimizer, gradients=GradientProbe(model, per_param=True))


def test_a_run_logs_optimizer_state_and_the_switch_turns_it_off(tmp_path):
    from test_train import run_tiny

    _, run = run_tiny(tmp_path, "optim.max_steps=4", "knn.enabled=false", "log.attention_every=0", name="on")
    layers = run.layers[run.layers["step"] >= 1]  # lr is 0 at step 0 (warm-up from 0)
    assert layers[list(COLUMNS[:4])].notna().all().all() and layers["lars_trust_ratio"].isna().all()
    assert (layers["update_cos_neg_grad"].abs() <= 1).all() and (layers["adam_small_v_frac"] < 1).all()
    _, off = run_tiny(tmp_path, "optim.max_steps=2", "knn.enabled=false", "log.optim_state=false",
                      "log.attention_every=0", name="off")
    assert off.layers[list(COLUMNS)].isna().all().all() and off.layers["grad_l2"].notna().all()

    # the report's "Optimizer state" figure: first layer and last block side by side
    fig = optimizer_state_figure(run)
    assert [a.text for a in fig.layout.annotations[:2]] == ["patch_embed", "blocks.1"]
    lines = [t for t in fig.data if t.mode == "lines"]
    assert len(lines) == 2 * 4  # four columns (no LARS), two layers
    freshness = run.layers[run.layers["layer"] == "blocks.1"].set_index("step")["adam_freshness"].dropna()
    np.testing.assert_array_equal(lines[1].y, freshness.to_numpy())  # row 1, column 2
    assert fig.layout.yaxis.type == "log" and optimizer_state_section(run).title == "Optimizer state"
    # the small-v share (row 2, often 0 throughout) gets an axis from 0, not plotly's -1..1; log rows keep theirs
    assert fig.layout.yaxis3.rangemode == "nonnegative" and fig.layout.yaxis5.rangemode is None
    assert optimizer_state_figure(off) is None
    sample = sl.load_run(Path(__file__).parents[1] / "data_samples" / "runs" / "learned_lr1e-2")
    assert optimizer_state_section(sample) is None  # a run from before the probe


def test_small_v_counts_skip_only_the_tensors_with_nothing_below():
    """The CPU count looks only into tensors whose minimum is below their limit: tensors with
    none, some and all entries below, against a plain count."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.rand(50, generator=g) + 1, torch.rand(7, 3, generator=g), torch.rand(40, generator=g) * 1e-3]
    limits = [0.5, 0.5, 1.0]
    expected = [int((t < limit).sum()) for t, limit in zip(tensors, limits)]
    assert expected[0] == 0 and 0 < expected[1] < 21 and expected[2] == 40
    assert _count_below(tensors, limits).tolist() == expected
