"""torch.distributed helpers: process-group setup from torchrun's environment, gathers."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device_type: str) -> tuple[int, int, int]:
    """Init the default process group when launched by torchrun; return (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return get_rank(), get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0 (no gradient), rank order."""
    if get_world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def concat_all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0, rank order, differentiably: each rank's
    gradient reaches the rank that computed the piece (torch.distributed.nn all_gather), so a
    loss over the gathered batch trains like the single-process loss (SimCLR's negatives)."""
    if get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()
