"""Who is reading: the DataLoader worker and the distributed rank of the current process. Shared by the
one-set reader (`cxrshards.reader`) and the mix (`cxrshards.mix`)."""
from __future__ import annotations

import torch

from manifests.errors import CxrError


def worker_info() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) outside a worker."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def dist_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) as given, or from torch.distributed when both are None (0, 1 when not initialised)."""
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise CxrError("pass both rank and world_size, or neither (then torch.distributed decides)")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise CxrError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    return rank, world_size
