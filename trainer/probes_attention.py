"""Attention probe: how peaked each block's attention is, for the `attention` table.

On a probe step, for each transformer block, on a fixed slice of the training batch (the
first `samples` images of the step's first view):

- `entropy_mean`: attention entropy over the keys, averaged over query tokens and images and
  divided by log(N) for N tokens (1: uniform attention, 0: one-hot), then averaged over heads;
- `entropy_min`: the same per-head value, its minimum over heads (one head collapsing first
  shows here; Zhai et al. 2023's entropy collapse);
- `max_logit`: the largest attention logit q·k/√d_head of the slice (the logit growth that
  ViT-22B's qk-norm was added against; Dehghani et al. 2023, Wortsman et al. 2023).

timm's fused attention (`scaled_dot_product_attention`) never forms the weights, so a
forward pre-hook on each block's `attn` takes the block's input for the slice and recomputes
q and k with the block's own `qkv`, `q_norm` and `k_norm`, as timm's unfused branch does,
under no_grad and only while the probe is armed: training's arithmetic is untouched and a
step that is not probed pays one Python call per block. Rows are buffered on the device.

    probe = AttentionProbe(backbone, samples=8)
    probe.arm(step); loss = model(x1, x2); probe.disarm()   # the first backbone call is probed
    columns = probe.drain()                                  # step, layer, the columns above
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

COLUMNS = ("entropy_mean", "entropy_min", "max_logit")
_ATTENTION_ATTRS = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")


class AttentionProbe:
    """Per-block attention entropy and max logit (module docstring), buffered on the device."""

    def __init__(self, backbone: nn.Module, *, samples: int = 8, capacity: int = 1000):
        blocks = list(getattr(backbone, "blocks", []))
        if not blocks or not all(hasattr(getattr(b, "attn", None), a) for b in blocks for a in _ATTENTION_ATTRS):
            raise ValueError("the attention probe needs a timm VisionTransformer (blocks[i].attn with "
                             "qkv, num_heads, head_dim, scale, q_norm, k_norm)")
        if samples < 1:
            raise ValueError(f"attention probe samples must be >= 1, not {samples}")
        self.samples = samples
        self.capacity = capacity
        self.layer_names = [f"blocks.{i}" for i in range(len(blocks))]
        self.device = next(backbone.parameters()).device
        self._buffer = torch.full((capacity, len(blocks), len(COLUMNS)), math.nan, device=self.device)
        self._steps: list[int] = []
        self._armed = False
        self._done = [False] * len(blocks)
        self._hooks = [b.attn.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(blocks)]

    @property
    def full(self) -> bool:
        return len(self._steps) >= self.capacity

    def arm(self, step: int) -> None:
        """Probe the next forward pass of the backbone, as `step`."""
        if self.full:
            raise RuntimeError(f"AttentionProbe buffer is full ({self.capacity} rows): drain() first")
        self._steps.append(int(step))
        self._done = [False] * len(self.layer_names)
        self._armed = True

    def disarm(self) -> None:
        self._armed = False

    def _hook(self, index: int):
        def record(attn: nn.Module, args) -> None:
            if self._armed and not self._done[index]:
                self._done[index] = True
                self._buffer[len(self._steps) - 1, index] = self._statistics(attn, args[0][:self.samples])
        return record

    @torch.no_grad()
    def _statistics(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # (batch, heads, tokens, tokens)
        entropy = torch.special.entr(logits.softmax(dim=-1)).sum(dim=-1)
        per_head = entropy.mean(dim=(0, 2)) / math.log(max(tokens, 2))  # one token: entropy 0
        return torch.stack([per_head.mean(), per_head.min(), logits.amax()])

    def drain(self) -> dict[str, np.ndarray]:
        """Columns (step, layer, COLUMNS) of the buffered rows, one device->host copy; resets."""
        n, blocks = len(self._steps), len(self.layer_names)
        values = self._buffer[:n].cpu().numpy().reshape(n * blocks, len(COLUMNS))
        columns = {"step": np.repeat(np.asarray(self._steps, dtype=np.int64), blocks),
                   "layer": np.tile(np.asarray(self.layer_names, dtype=object), n)}
        columns.update({name: values[:, i].copy() for i, name in enumerate(COLUMNS)})
        self._buffer[:n].fill_(math.nan)
        self._steps = []
        return columns

    def close(self) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
