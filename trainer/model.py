"""The ViT backbone: timm's VisionTransformer set up as MoCo v3 (official vits.py) does it,
plus the paper's stability switches (position embedding, pooling, patch projection variant)
and one from later work: qk_norm, a LayerNorm on each head's queries and keys (Dehghani et al.
2023), against the attention-logit growth that precedes the batch-1024 breaks of docs/findings.md.

timm's weight_init='moco' already gives MoCo v3's xavier_uniform Linear init with the qkv
weight bound computed per q/k/v third, zero biases and cls_token ~ N(0, 1e-6); its LayerNorm
eps is 1e-6 as in vits.py. It leaves out two things we add here: the patch projection init and
the fixed 2-D sin-cos position embedding.
"""
import torch
import torch.nn as nn
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import VisionTransformer

from trainer.config import PATCH_PROJS, POOLS, POS_EMBEDS


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the embedding channels of (B, N, C) patch tokens (stats over B and N).

    Used as timm PatchEmbed's `norm` (params `patch_embed.norm.bn.*`). It wraps rather than
    subclasses BatchNorm1d so that convert_sync_batchnorm swaps the inner `bn` and keeps the
    transpose.
    """

    def __init__(self, num_features, **kwargs):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, **kwargs)

    def forward(self, x):
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")


def sincos_pos_embed(grid_size, embed_dim):
    """(1, 1 + h*w, dim) fixed 2-D sin-cos embedding in MoCo v3's channel layout, zero for cls.

    timm builds [sin(row), sin(col), cos(row), cos(col)] (blocks of dim/4); MoCo v3's
    build_2d_sincos_position_embedding is [sin(row), cos(row), sin(col), cos(col)]
    (its `grid_w` from torch.meshgrid 'ij' indexing is the row index), so reorder 0, 2, 1, 3.
    """
    pe = build_sincos2d_pos_embed(list(grid_size), dim=embed_dim, temperature=10000.)
    pe = torch.cat([pe.chunk(4, dim=1)[i] for i in (0, 2, 1, 3)], dim=1)
    return torch.cat([torch.zeros(1, embed_dim), pe], dim=0).unsqueeze(0)


def build_backbone(cfg) -> VisionTransformer:
    """ViT without classifier head (num_classes=0) from a resolved ModelConfig."""
    _check("pos_embed", cfg.pos_embed, POS_EMBEDS)
    _check("pool", cfg.pool, POOLS)
    _check("patch_proj", cfg.patch_proj, PATCH_PROJS)
    model = VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
        depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        qk_norm=cfg.qk_norm,
        num_classes=0, weight_init="moco",
        pos_embed="none" if cfg.pos_embed == "none" else "learn",  # learn: trunc_normal(.02)
        global_pool="token" if cfg.pool == "token" else "avg",
        fc_norm=False,  # avg: final LayerNorm on the tokens before pooling, as for token pooling
        final_norm=cfg.pool != "avg_nonorm",
        embed_norm_layer=TokenBatchNorm if cfg.patch_proj == "batchnorm" else None,
    )
    if cfg.pos_embed == "sincos":
        with torch.no_grad():
            model.pos_embed.copy_(sincos_pos_embed(model.patch_embed.grid_size, cfg.embed_dim))
        model.pos_embed.requires_grad_(False)

    # MoCo v3 patch projection init, which timm's 'moco' init skips (the conv keeps PyTorch's
    # kaiming default): xavier_uniform of the conv weight viewed as a (dim, 3*p*p) linear layer,
    # i.e. bound sqrt(6 / (3*p*p + dim)); zero bias.
    proj = model.patch_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    if cfg.patch_proj == "frozen":  # official stop_grad_conv1: random fixed projection
        proj.requires_grad_(False)
    elif cfg.patch_proj == "weightnorm":  # w = g * v / ||v|| per output channel
        nn.utils.parametrizations.weight_norm(proj)
    return model


def patch_proj_parameters(backbone) -> list:
    """Trainable parameters of the patch embedding (what patch_proj=clip clips)."""
    return [p for p in backbone.patch_embed.parameters() if p.requires_grad]
