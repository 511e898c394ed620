"""torchrun support: process group from RANK/WORLD_SIZE/LOCAL_RANK, gathers that tolerate ranks
holding different sample counts."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The torchrun environment (single process when WORLD_SIZE is unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (nccl on cuda, gloo on cpu); no-op when alone."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return info


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_buffers(model: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running stats) over ranks, so every rank ends the epoch
    with identical state (DDP broadcasts buffers before a forward, but each rank's last forward updates
    its own copy)."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf.div_(world)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's [n_r, ...] tensor along dim 0 in rank order (n_r may differ: rows are
    padded to the largest count for the all_gather and trimmed afterwards)."""
    if not dist.is_initialized():
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    top = max(counts)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)


def gather_objects(items: list) -> list:
    """Concatenate each rank's python list in rank order."""
    if not dist.is_initialized():
        return list(items)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def broadcast_flag(value: bool, device: torch.device) -> bool:
    """Rank 0's decision (e.g. early stop) for every rank."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([1 if value else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
