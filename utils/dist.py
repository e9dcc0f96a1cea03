"""Distributed set-up from torchrun's environment, and the few collectives the models need.

A plain ``python script.py`` needs no process group at all; under ``torchrun`` we use NCCL on CUDA
and gloo on CPU. Every helper here degrades to the identity in a single process.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist

from utils.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU when CUDA is available, else CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'device' is {name!r} but CUDA is not available; use device: auto "
                              "(or cpu) on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
        logger.info("process group: backend %s, rank %d of %d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (same shape on every rank) from all ranks along dim 0; no gradient."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`concat_all_gather`, but gradients flow back to each rank's own slice.

    Every rank computes a loss on the gathered tensor, so a rank's input receives the sum over all
    ranks of the gradients for its slice (torch's backward is a sum reduce-scatter; no 1/world factor).
    """
    if not is_dist():
        return t
    # Imported here: torch.distributed.nn needs a torch built with distributed support, which a
    # single process never needs. torch 2.14 deprecates it (one FutureWarning per process) in
    # favour of the private _functional_collectives.all_gather_single; we stay on the public API.
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(t), dim=0)


@torch.no_grad()
def gather_variable(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose dim 0 differs between ranks (in rank order)."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = concat_all_gather(n).tolist()
    pad = t.new_zeros((max(sizes) - t.shape[0],) + tuple(t.shape[1:]))
    gathered = concat_all_gather(torch.cat([t, pad], dim=0))
    chunks: List[torch.Tensor] = gathered.split(max(sizes), dim=0)
    return torch.cat([c[:s] for c, s in zip(chunks, sizes)], dim=0)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (a collective: all ranks must call)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's Python object, in rank order (a collective: all ranks must call)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_range(n: int) -> range:
    """This rank's contiguous slice of ``range(n)`` (ranks in order tile it; the last may be short)."""
    world, rank = get_world_size(), get_rank()
    step = -(-n // world)
    return range(min(n, rank * step), min(n, (rank + 1) * step))


@torch.no_grad()
def all_reduce_gradients(params, bucket_bytes: int = 25 << 20) -> None:
    """Average the gradients of ``params`` over the ranks (what DDP does, for a model trained
    without its wrapper), in flat buckets of about ``bucket_bytes``; a parameter without a gradient
    on this rank contributes zeros."""
    world = get_world_size()
    if world == 1:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
        if bucket and (p is None or size >= bucket_bytes):
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            all_reduce_sum(flat)
            flat /= world
            offset = 0
            for q in bucket:
                n = q.grad.numel()
                q.grad.copy_(flat[offset:offset + n].view_as(q.grad))
                offset += n
            bucket, size = [], 0
