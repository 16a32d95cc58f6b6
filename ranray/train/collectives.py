"""The few collectives the loops call outside DDP; each is a no-op without a process group."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device() -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """The element-wise sum of `values` over every rank (float64)."""
    packed = torch.tensor(values, dtype=torch.float64)
    if distributed():
        packed = packed.to(collective_device())
        dist.all_reduce(packed)
    return packed.cpu().tolist()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not distributed():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
