"""MoCo v3 (Chen, Xie & He 2021): base encoder + projector + predictor, momentum encoder,
symmetrised InfoNCE loss. The maths of the official moco-v3 `MoCo` / `MoCo_ViT` forward, with
both views through each backbone in one pass.

Fused views. The ViT backbone has no batch-dependent layer (LayerNorm is per token, attention
per image), so `backbone(cat(x1, x2))` equals `backbone(x1)`, `backbone(x2)` up to float
rounding; one call of twice the batch halves the kernel launches and per-layer overhead. The
heads have BatchNorm, whose batch statistics must stay per view as in the official code (each
view is a separate call there), so the features are split before the heads and each view goes
through the projector and predictor alone. A backbone with BatchNorm of its own
(patch_proj=batchnorm) takes the views in two calls for the same reason. tests/test_moco.py
checks loss, gradients and BatchNorm statistics against the two-call step.

BYOL has the same architecture with another loss, so it is this module with
`loss=trainer.byol.regression_loss` (see trainer/methods.py).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.distributed import concat_all_gather, get_rank
from trainer.heads import build_predictor, build_projector
from trainer.model import build_backbone


def contrastive_loss(q, k, temperature, rank=0):
    """InfoNCE of queries q (N, C) against keys k (M, C), times 2T as in the official code.

    k may be the keys of all ranks concatenated rank by rank; the positive of q[i] is then
    k[rank * N + i]. With the defaults this is the single-process loss.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCo(nn.Module):
    """q = predictor(projector(backbone(x))); k = momentum_projector(momentum_backbone(x)).

    loss(q, k) -> scalar scores one (query, key) direction; None is MoCo v3's InfoNCE
    against the keys of all ranks.
    """

    def __init__(self, model_cfg, moco_cfg, loss=None):
        super().__init__()
        self.temperature = moco_cfg.temperature
        self.loss = loss
        self.backbone = build_backbone(model_cfg)
        self.feature_dim = self.backbone.num_features
        self.projector = build_projector(model_cfg, self.feature_dim)
        self.predictor = build_predictor(model_cfg)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.fuse_views = not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                  for m in self.backbone.modules())

    def _momentum_pairs(self):
        """(base, momentum) parameter lists, without the base's frozen (requires_grad False) ones.

        Frozen params (fixed patch projection, sin-cos pos embed) start equal in both encoders
        and are never touched, so float rounding of m*x + (1-m)*x cannot make them drift.
        """
        base = [*self.backbone.parameters(), *self.projector.parameters()]
        mom = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        pairs = [(b, m) for b, m in zip(base, mom, strict=True) if b.requires_grad]
        return [b for b, _ in pairs], [m for _, m in pairs]

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        """theta_k <- m * theta_k + (1 - m) * theta_q, fused over all parameters.

        m is a float or a 0-d tensor on the parameters' device; a tensor lets a compiled
        forward take a new m every step without recompiling, and costs no host sync.
        """
        base, mom = self._momentum_pairs()
        torch._foreach_mul_(mom, m)
        torch._foreach_add_(mom, torch._foreach_mul(base, 1 - m))

    def _loss(self, q, k):
        if self.loss is not None:
            return self.loss(q, k)
        return contrastive_loss(q, concat_all_gather(k), self.temperature, get_rank())

    def forward(self, x1, x2, m):
        """Symmetrised loss of two views, and the (detached) pooled backbone features of x1.

        Queries come from the encoder before the momentum update, keys after it, as in the
        official code. m: float or 0-d tensor (see update_momentum_encoder).
        """
        f1, f2 = self._features(self.backbone, x1, x2)
        q1 = self.predictor(self.projector(f1))
        q2 = self.predictor(self.projector(f2))
        with torch.no_grad():
            self.update_momentum_encoder(m)
            g1, g2 = self._features(self.momentum_backbone, x1, x2)
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)
        return self._loss(q1, k2) + self._loss(q2, k1), f1.detach()

    def _features(self, backbone, x1, x2):
        """Backbone features of each view: one call on both (fuse_views), else one call each."""
        if self.fuse_views:
            return backbone(torch.cat([x1, x2])).chunk(2)
        return backbone(x1), backbone(x2)

    @torch.no_grad()
    def backbone_features(self, x):
        """Pooled features of the base backbone, for kNN / linear evaluation."""
        return self.backbone(x)
