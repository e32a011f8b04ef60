"""AttentionProbe against timm's own unfused attention weights (and float64 logits), on the
first images of the first backbone call only; and the `attention` table of a real run."""
import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from stabilitylab.plots_probes import attention_figure, attention_section
from trainer.probes_attention import COLUMNS, AttentionProbe


def vit(qk_norm=False):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, num_classes=0,
                              qkv_bias=True, qk_norm=qk_norm).eval()
    with torch.no_grad():  # LayerNorm gains away from 1 and nonzero shifts, so skipping them would show
        for name, p in model.named_parameters():
            if "_norm." in name:
                p.uniform_(0.5, 2.0) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    return model


def reference(model, x):
    """Per block (entropy_mean, entropy_min, max_logit) from timm's unfused softmax weights
    (captured at attn_drop) and float64 logits of the captured attention input."""
    probs, inputs, hooks = {}, {}, []
    for i, block in enumerate(model.blocks):
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, a, out, i=i: probs.__setitem__(i, a[0])))
        hooks.append(block.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    for block in model.blocks:
        block.attn.fused_attn = True
    rows = []
    for i, block in enumerate(model.blocks):
        p = probs[i].double().numpy()  # (batch, heads, tokens, tokens)
        tokens, heads = p.shape[-1], p.shape[1]
        entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(-1).mean(axis=(0, 2)) / math.log(tokens)
        qkv = inputs[i].double() @ block.attn.qkv.weight.double().T + block.attn.qkv.bias.double()
        q, k, _ = qkv.reshape(*qkv.shape[:2], 3, heads, -1).permute(2, 0, 3, 1, 4)
        if not isinstance(block.attn.q_norm, torch.nn.Identity):  # qk_norm: LayerNorm over d_head
            norm = block.attn.q_norm
            q = torch.nn.functional.layer_norm(q, q.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
            norm = block.attn.k_norm
            k = torch.nn.functional.layer_norm(k, k.shape[-1:], norm.weight.double(), norm.bias.double(), norm.eps)
        logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        rows.append((entropy.mean(), entropy.min(), logits.max().item()))
    return np.array(rows)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_statistics_match_timm_unfused_weights_on_the_first_call_only(qk_norm):
    model = vit(qk_norm)
    gen = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(6, 3, 16, 16, generator=gen), torch.randn(6, 3, 16, 16, generator=gen)
    probe = AttentionProbe(model, samples=4, capacity=4)
    with torch.no_grad():
        plain = model(x1)
        probe.arm(7)
        probed = model(x1)
        model(x2)  # a second call in the same step (the other view) is not probed
        probe.disarm()
        model(x2)  # nor one after disarming
    assert torch.equal(plain, probed)  # the forward itself is untouched
    columns = probe.drain()
    assert columns["step"].tolist() == [7, 7, 7] and list(columns["layer"]) == ["blocks.0", "blocks.1", "blocks.2"]
    values = np.stack([columns[c] for c in COLUMNS], axis=1)
    expected = reference(model, x1[:4])
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    assert (values[:, 1] <= values[:, 0]).all() and (values[:, :2] > 0).all() and (values[:, :2] <= 1).all()
    assert not np.allclose(expected, reference(model, x2[:4]))  # so x2 would have shown


def test_a_peaked_attention_shows_low_entropy_and_a_large_logit():
    model = vit()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[:64] *= 30  # scale q and k of block 1: sharper softmax
    probe = AttentionProbe(model, samples=2, capacity=2)
    probe.arm(0)
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    probe.disarm()
    rows = probe.drain()
    assert rows["entropy_mean"][1] < 0.5 * rows["entropy_mean"][0]
    assert rows["max_logit"][1] > 20 * rows["max_logit"][0]


def test_probe_refuses_a_model_without_timm_attention():
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        AttentionProbe(torch.nn.Linear(3, 3))


def test_a_run_writes_the_attention_table_every_few_steps(tmp_path):
    from test_train import run_tiny

    _, run = run_tiny(tmp_path, "optim.max_steps=7", "knn.enabled=false", "log.attention_every=3",
                      "log.attention_samples=4")
    table = run.table("attention")
    assert table["step"].tolist() == [0, 0, 3, 3, 6, 6]
    assert list(table["layer"].cat.categories) == ["blocks.0", "blocks.1"]
    assert table[list(COLUMNS)].notna().all().all() and table["entropy_mean"].between(0, 1).all()
    assert run.knn.empty

    # the report's "Attention" figure: first and last block side by side
    fig = attention_figure(run)
    assert [a.text for a in fig.layout.annotations[:2]] == ["blocks.0", "blocks.1"]
    lines = {(t.name, t.xaxis): t for t in fig.data if t.mode == "lines"}
    last = table[table["layer"] == "blocks.1"]
    np.testing.assert_array_equal(lines["entropy_min", "x2"].y, last["entropy_min"].to_numpy())
    np.testing.assert_array_equal(lines["max_logit", "x4"].y, last["max_logit"].to_numpy())
    assert attention_section(run).title == "Attention"
