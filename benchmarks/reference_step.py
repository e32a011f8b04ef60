"""The comparison arm of bench_throughput.py: a MoCo v3 training step written the way the
official facebookresearch/moco-v3 code (`moco/builder.py`, `main_moco.py`) writes it, on the
same network as stabilitylab's.

What makes it "official style":
- the base encoder is the ViT with the 3-layer projector as its head, the momentum encoder a
  copy of it, and the predictor a separate MLP;
- each view goes through the base encoder on its own, then (without gradient) the momentum
  update runs as a Python loop over every parameter pair, `m * theta_k + (1 - m) * theta_q`,
  then each view goes through the momentum encoder on its own;
- the loss normalises, forms the logits with einsum and applies `CrossEntropyLoss` times 2T;
- `torch.optim.AdamW(model.parameters(), lr, weight_decay=...)` with torch's default
  implementation, no torch.compile; on CUDA fp16 autocast with a GradScaler, on a CPU fp32
  (the official `torch.cuda.amp.autocast` does nothing there); `loss.item()` every step, for
  the progress meter.

The network is built from stabilitylab's own backbone and heads (timm ViT, MoCo v3 init), so
both arms run the same maths on the same weights: `tests/test_benchmarks.py` checks that this
step's loss and gradients equal stabilitylab's.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class OfficialStyleMoCo(nn.Module):
    """Base encoder (backbone + projector), momentum encoder and predictor, official layout."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module,
                 temperature: float):
        super().__init__()
        self.T = temperature
        self.base_encoder = nn.Sequential(backbone, projector)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for param_m in self.momentum_encoder.parameters():
            param_m.requires_grad = False
        self.predictor = predictor

    @classmethod
    def from_moco(cls, moco) -> "OfficialStyleMoCo":
        """The same weights as a stabilitylab `trainer.moco.MoCo` (copied)."""
        model = cls(copy.deepcopy(moco.backbone), copy.deepcopy(moco.projector),
                    copy.deepcopy(moco.predictor), moco.temperature)
        model.momentum_encoder.load_state_dict(
            nn.Sequential(moco.momentum_backbone, moco.momentum_projector).state_dict())
        return model

    @torch.no_grad()
    def _update_momentum_encoder(self, m: float) -> None:
        for param_b, param_m in zip(self.base_encoder.parameters(), self.momentum_encoder.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1. - m)

    def contrastive_loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        logits = torch.einsum("nc,mc->nm", [q, k]) / self.T
        labels = torch.arange(logits.shape[0], dtype=torch.long, device=logits.device)
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self._update_momentum_encoder(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)


class ReferenceStep:
    """One official-style optimizer step per call: `step(x1, x2, m, lr) -> loss (float)`."""

    def __init__(self, moco, lr: float, weight_decay: float, device: torch.device | str):
        self.device = torch.device(device)
        self.model = OfficialStyleMoCo.from_moco(moco).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr, weight_decay=weight_decay)
        self.cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)

    def __call__(self, x1, x2, m: float, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x1 = x1.to(self.device, non_blocking=True)
        x2 = x2.to(self.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            loss = self.model(x1, x2, m)
        value = loss.item()
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value
