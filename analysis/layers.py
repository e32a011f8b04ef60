"""Which layer is "the first layer" and which "the last block": one answer for every surface.

The paper compares the patch projection with the last layers of the ViT, so every verdict,
summary, table and figure speaks of two layers: the model's first layer (the run's meta
`first_layer`, which the trainer, the Monitor and the importers record; else `patch_embed`)
and its last transformer block (meta `last_block` when logged; else the last `blocks.N`
layer, not the projection or prediction heads; else the last layer).
"""
from __future__ import annotations

import re

DEFAULT_FIRST = "patch_embed"
BLOCK = re.compile(r"blocks\.\d+")


def first_layer(meta: dict | None) -> str:
    """The model's first layer, logged or not (a frozen patch projection logs no gradient)."""
    return (meta or {}).get("first_layer") or DEFAULT_FIRST


def logged_first_layer(meta: dict | None, layers) -> str | None:
    """The first layer when it is logged, else the first logged layer: what a figure shows."""
    layers = [str(layer) for layer in layers]
    first = first_layer(meta)
    return first if first in layers else (layers[0] if layers else None)


def last_block(meta: dict | None, layers) -> str | None:
    """Meta `last_block` when logged, else the last `blocks.N` of `layers`, else the last one."""
    layers = [str(layer) for layer in layers]
    last = (meta or {}).get("last_block")
    if last in layers:
        return last
    blocks = [layer for layer in layers if BLOCK.fullmatch(layer)]
    return (blocks or layers or [None])[-1]
