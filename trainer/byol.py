"""BYOL (Grill et al. 2020): the online network's prediction regresses the target network's
projection of the other view; the target is a momentum copy of the online encoder.

The architecture is MoCo v3's (base = online encoder + projector + predictor, momentum =
target encoder + projector, updated by the same moving average), so BYOL is `trainer.moco.MoCo`
with `loss=regression_loss`; only the loss is BYOL's own. No negatives: nothing is gathered
across ranks.
"""
import torch
import torch.nn.functional as F


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Normalised MSE ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z), mean over the batch.

    p: online predictions (N, C); z: target projections of the other view (N, C), no gradient.
    The symmetrised BYOL loss is regression_loss(p1, z2) + regression_loss(p2, z1).
    """
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()
