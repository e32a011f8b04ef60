"""SimCLR (Chen et al. 2020): one encoder (backbone + projector), NT-Xent over the 2N views.

The two views go through the encoder as one batch of 2N, as in SimCLR, so the projector's
BatchNorm sees both. Each view's positive is the other view of its image; every other view
of the global batch (all ranks, gathered with gradients) is a negative.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import concat_all_gather_with_grad, get_rank
from trainer.heads import build_projector
from trainer.model import build_backbone


def nt_xent_loss(z1, z2, temperature, z_all=None, rank=0):
    """NT-Xent of the views z = [z1; z2] (2N, C), mean over the 2N anchors.

    Anchor i scores cos(z_i, z_j) / T against every view j but itself; its positive is the
    other view of the same image. z_all: the L2-normalised [z1; z2] of all ranks concatenated
    rank by rank (default: this rank's own), this rank's block starting at rank * 2N.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    z_all = z if z_all is None else z_all
    n2 = z.shape[0]
    anchors = torch.arange(n2, device=z.device)
    offset = rank * n2
    logits = z @ z_all.T / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[anchors, offset + anchors] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = offset + (anchors + n2 // 2) % n2
    return F.cross_entropy(logits, positives)


class SimCLR(nn.Module):
    """z = projector(backbone(x)); no predictor, no momentum encoder (model.predictor unused)."""

    def __init__(self, model_cfg, moco_cfg):
        super().__init__()
        self.temperature = moco_cfg.temperature
        self.backbone = build_backbone(model_cfg)
        self.feature_dim = self.backbone.num_features
        self.projector = build_projector(model_cfg, self.feature_dim)

    def forward(self, x1, x2, m=None):
        """NT-Xent of the two views, and the (detached) pooled backbone features of x1.
        m (the momentum of the other methods) is not used."""
        features = self.backbone(torch.cat([x1, x2]))
        z1, z2 = self.projector(features).chunk(2)
        z_all = concat_all_gather_with_grad(F.normalize(torch.cat([z1, z2]), dim=1))
        loss = nt_xent_loss(z1, z2, self.temperature, z_all, get_rank())
        return loss, features[: len(x1)].detach()

    @torch.no_grad()
    def backbone_features(self, x):
        """Pooled features of the backbone, for kNN / linear evaluation."""
        return self.backbone(x)
