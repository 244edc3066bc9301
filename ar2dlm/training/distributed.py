"""Multi-process training under torchrun: process-group set-up and model wrapping, in one place.

A plain `python -m ar2dlm ...` is a world of one and wraps nothing. Under torchrun, DDP is the default (gloo on CPU,
NCCL on CUDA); FSDP2 (`fully_shard` on every decoder layer, then the root) is for models that do not fit one device.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ar2dlm.errors import Ar2dlmError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_kind: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_kind == "cuda" and not torch.cuda.is_available():
        raise Ar2dlmError("--device cuda but no CUDA device is available")
    device = torch.device(device_kind, local) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device_kind: str):
    """`init` on entry (yields (info, device)), `shutdown` on exit, however the run ends."""
    info, device = init(device_kind)
    try:
        yield info, device
    finally:
        shutdown()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (used for data that only rank 0 prepares)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(module: nn.Module, info: DistInfo, device: torch.device, fsdp: bool, decoder_layers=()) -> nn.Module:
    """DDP or FSDP2 around the training module; the module itself when running alone."""
    if not info.enabled:
        return module
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
