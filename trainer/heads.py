"""Projector and predictor MLPs, as official moco-v3 `_build_mlp` / MoCo_ViT.

Linear layers keep PyTorch's default init: in the official code the heads replace the ViT
head after the ViT's own init, so they are never re-initialised.
"""
import torch.nn as nn


def build_mlp(num_layers, input_dim, hidden_dim, output_dim, last_bn=True, use_bn=True):
    """Linear(no bias)-BN-ReLU hidden layers, then Linear(no bias) + BN without affine if last_bn.

    use_bn=False (paper ablation): Linear with bias and no BN anywhere.
    """
    layers = []
    for i in range(num_layers):
        dim1 = input_dim if i == 0 else hidden_dim
        dim2 = output_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim1, dim2, bias=not use_bn))
        if i < num_layers - 1:
            if use_bn:
                layers.append(nn.BatchNorm1d(dim2))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn and use_bn:
            layers.append(nn.BatchNorm1d(dim2, affine=False))  # SimCLR design, gamma removed
    return nn.Sequential(*layers)


def build_projector(cfg, input_dim):
    """3-layer projector from the backbone feature to head_out_dim."""
    return build_mlp(3, input_dim, cfg.head_hidden_dim, cfg.head_out_dim, use_bn=cfg.head_bn)


def build_predictor(cfg):
    """2-layer predictor without last BN (MoCo_ViT), or Identity when disabled (ablation)."""
    if not cfg.predictor:
        return nn.Identity()
    return build_mlp(2, cfg.head_out_dim, cfg.head_hidden_dim, cfg.head_out_dim, last_bn=False,
                     use_bn=cfg.head_bn)
