"""Automatic layer groups (trainer.groups) on the model families the Monitor must get right,
all built from tiny local configs (nothing is downloaded)."""
import copy
import random

import pytest
import timm
import torch
import torchvision
from torch import nn

from trainer.groups import group_parameters
from trainer.probes import model_grouping

transformers = pytest.importorskip("transformers")


def blocks(n):
    return [f"blocks.{i}" for i in range(n)]


class OfficialMoco(nn.Module):
    """The layout of facebookresearch/moco-v3 `MoCo_ViT`: a timm ViT as `base_encoder` whose
    `head` is the projector MLP, a `momentum_encoder` copy without gradients, a `predictor`;
    vits.py fixes the sin-cos position embedding (and optionally the patch projection)."""

    def __init__(self, stop_grad_conv1=False):
        super().__init__()
        self.base_encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                                              patch_size=4, embed_dim=32, depth=3, num_heads=2)
        self.base_encoder.head = nn.Sequential(nn.Linear(32, 64, bias=False), nn.BatchNorm1d(64),
                                               nn.ReLU(), nn.Linear(64, 16, bias=False),
                                               nn.BatchNorm1d(16, affine=False))
        self.base_encoder.pos_embed.requires_grad = False
        if stop_grad_conv1:
            self.base_encoder.patch_embed.proj.requires_grad_(False)
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)
        self.predictor = nn.Sequential(nn.Linear(16, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                                       nn.Linear(64, 16, bias=False))


def tiny_hf(name):
    t = transformers
    if name == "vit":
        return t.ViTForImageClassification(t.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=16, patch_size=4, num_labels=3))
    if name == "bert":
        return t.BertForSequenceClassification(t.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            intermediate_size=64, num_labels=2))
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                              n_positions=32, bos_token_id=0, eos_token_id=0))
    return t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, bos_token_id=0, eos_token_id=0))


CASES = {
    "moco v3 official": (lambda: OfficialMoco(),
                         ["patch_embed", "cls_token", *blocks(3), "norm", "head", "predictor"],
                         "patch_embed", "blocks.2"),
    "timm vit": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                                           patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                           num_classes=5),
                 ["patch_embed", "cls_token", "pos_embed", *blocks(2), "norm", "head"],
                 "patch_embed", "blocks.1"),
    "timm resnet": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=5),
                    ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"], "conv1", "layer4"),
    "torchvision resnet": (lambda: torchvision.models.resnet18(num_classes=5),
                           ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"], "conv1", "layer4"),
    "hf vit": (lambda: tiny_hf("vit"), ["embeddings", *blocks(2), "layernorm", "classifier"],
               "embeddings", "blocks.1"),
    "hf bert": (lambda: tiny_hf("bert"), ["embeddings", *blocks(3), "pooler", "classifier"],
                "embeddings", "blocks.2"),
    "hf gpt2": (lambda: tiny_hf("gpt2"), ["wte", "wpe", *blocks(2), "ln_f"], "wte", "blocks.1"),
    "hf llama": (lambda: tiny_hf("llama"), ["embed_tokens", *blocks(2), "norm", "lm_head"],
                 "embed_tokens", "blocks.1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_groups_named_as_a_person_would(case):
    build, names, first, last = CASES[case]
    model = build()
    grouping = model_grouping(model)
    assert grouping.names == names
    assert (grouping.first_layer, grouping.last_block) == (first, last)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    members = [p for _, ps in grouping.groups for p in ps]
    assert sorted(members) == sorted(trained)  # every trained parameter, once; nothing frozen


def test_official_moco_layout_members_and_frozen_first_layer():
    grouping = model_grouping(OfficialMoco())
    groups = dict(grouping.groups)
    assert groups["patch_embed"] == ["base_encoder.patch_embed.proj.weight",
                                     "base_encoder.patch_embed.proj.bias"]
    assert groups["head"][0] == "base_encoder.head.0.weight"
    assert not any(p.startswith("momentum_encoder.") for ps in groups.values() for p in ps)
    frozen = model_grouping(OfficialMoco(stop_grad_conv1=True))
    assert frozen.names[0] == "cls_token"  # the frozen projection is not logged ...
    assert frozen.first_layer == "patch_embed"  # ... but is still the model's first layer


def test_per_layer_names_from_a_log_in_any_order_give_the_same_groups():
    """Importers see only parameter names, maybe sorted: blocks by index, tensors after the
    first layer, everything else by first appearance."""
    model = tiny_hf("bert")
    names = [n for n, _ in model.named_parameters()]
    expected = model_grouping(model)
    assert group_parameters(names).groups == expected.groups
    vit = [n for n, _ in timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=12).named_parameters()]
    shuffled = vit[:5] + random.Random(0).sample(vit[5:], len(vit) - 5)
    grouping = group_parameters(shuffled)
    assert grouping.names[:3] == ["patch_embed", "cls_token", "pos_embed"]
    assert [g for g in grouping.names if g.startswith("blocks.")] == blocks(12)
    assert grouping.last_block == "blocks.11"


def test_blocks_next_to_a_list_of_heads_are_not_stages():
    names = (["patch_embed.proj.weight"] + [f"blocks.{i}.attn.qkv.weight" for i in range(3)]
             + ["norm.weight"] + [f"heads.{i}.mlp.fc.weight" for i in range(2)])
    grouping = group_parameters(names)
    assert grouping.names == ["patch_embed", *blocks(3), "norm", "heads"]
    assert grouping.last_block == "blocks.2"


def test_rules_override_and_keep_first_and_last():
    model = tiny_hf("gpt2")
    rules = {r"\.w[tp]e\.": "embed", r"\.h\.(\d+)\.attn\.": r"attn.\1"}
    grouping = model_grouping(model, rules=rules)
    assert grouping.names == ["embed", "blocks.0", "attn.0", "blocks.1", "attn.1", "ln_f"]  # ln_1 first
    assert dict(grouping.groups)["embed"] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert grouping.first_layer == "embed"
    assert grouping.last_block == "blocks.1"  # holds block 1's last parameter


def test_models_without_a_block_list():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert model_grouping(mlp).names == ["0", "2"]
    assert model_grouping(mlp).last_block is None

    class Wrapped(nn.Module):  # a LightningModule-style holder: `self.net = ...`
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    assert model_grouping(Wrapped()).names == ["net.0", "net.2"]
    assert model_grouping(Wrapped(), per_param=True).names == [
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]


def test_wrappers_are_looked_through():
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    assert model_grouping(torch.compile(model, backend="eager")).groups == model_grouping(model).groups
    assert model_grouping(nn.DataParallel(model)).groups == model_grouping(model).groups
