"""Epoch plans: which samples each DDP rank and DataLoader worker reads, in which order, in which batches.

Everything here is a pure function of its arguments (seed, epoch, rank, world size, worker, number of
workers): no I/O, no global RNG. Positions are row positions into the split's manifest table.

Order of an epoch (all ranks compute the same one):
- wds: shard files are permuted by `default_rng([seed, epoch])` and their selected samples concatenated,
  each shard in tar order (reading a tar stays sequential);
- hdf5: the selected samples are permuted by `default_rng([seed, epoch])` (random access is cheap).
Without shuffling both keep the stored order.

Ranks get contiguous ranges of that order; their sizes differ by at most one sample. With a batch size B
every rank yields k = ceil(ceil(N / world_size) / B) batches: its samples are cut into k batches, full
batches first. When a rank has too few samples to give each of its k batches at least one (only possible
when N < world_size, or B == 1 and N is not a multiple of world_size), its last batches are EMPTY
(size 0): equal batch counts (no DDP hang) and each sample exactly once win over non-empty batches.

A rank's units (batches, or samples without a batch size) are dealt to DataLoader workers:
- wds: contiguous blocks of units, so each worker reads only the tars its block overlaps;
- hdf5: round robin (unit u to worker u % num_workers), so a DataLoader, which takes one unit from each
  worker in turn, yields the rank's units in plan order whatever the number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_rng(*parts: int) -> np.random.Generator:
    """A generator seeded by integer parts, e.g. (seed, epoch): never the global RNG."""
    return np.random.default_rng([int(p) for p in parts])


def wds_order(shard_codes: np.ndarray, n_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Epoch order of the selected samples for tar shards.

    `shard_codes[i]` is the shard number (0..n_shards-1, in file order) of selected sample i; the selected
    samples are given in stored order (shard, then position in the tar). Returns positions into them.
    """
    codes = np.asarray(shard_codes, dtype=np.int64)
    if not shuffle:
        return np.arange(codes.size, dtype=np.int64)
    shard_perm = epoch_rng(seed, epoch).permutation(n_shards)
    place = np.empty(n_shards, dtype=np.int64)
    place[shard_perm] = np.arange(n_shards)
    return np.argsort(place[codes], kind="stable").astype(np.int64)


def h5_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Epoch order of n selected samples for HDF5: a full permutation, or the stored order."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return epoch_rng(seed, epoch).permutation(n).astype(np.int64)


def split_range(n: int, parts: int, part: int) -> tuple[int, int]:
    """[start, stop) of `part` when n items are cut into `parts` contiguous ranges differing by at most 1."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)


def batches_per_rank(n: int, world_size: int, batch_size: int) -> int:
    """k = ceil(largest rank's sample count / batch_size): the same for every rank."""
    largest = -(-n // world_size)
    return -(-largest // batch_size)


def batch_sizes(n: int, k: int, batch_size: int) -> np.ndarray:
    """Cut n samples into exactly k batches of at most batch_size, full batches first, none empty if n >= k.

    E.g. (n=7, k=2, B=4) -> [4, 3]; (n=4, k=2, B=4) -> [3, 1]; (n=1, k=2, B=1) -> [1, 0].
    """
    if n > k * batch_size:
        raise ValueError(f"{n} samples do not fit in {k} batches of {batch_size}")
    if n < k:
        return np.array([1] * n + [0] * (k - n), dtype=np.int64)
    extra = n - k  # one sample per batch first, then fill batches front to back
    fill = np.clip(extra - np.arange(k) * (batch_size - 1), 0, batch_size - 1)
    return (1 + fill).astype(np.int64)


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank reads: `rows` in read order, cut into `sizes` (None: yield samples)."""

    rows: np.ndarray
    sizes: np.ndarray | None


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of an epoch: `rows` (positions into the split table) in order, and its batches."""

    rows: np.ndarray
    sizes: np.ndarray | None  # batch sizes (sum = len(rows)), None when yielding samples
    contiguous_workers: bool  # True: wds blocks; False: hdf5 round robin

    def __len__(self) -> int:
        """Units this rank yields: batches, or samples without a batch size."""
        return len(self.rows) if self.sizes is None else len(self.sizes)

    def worker(self, worker: int, num_workers: int) -> WorkerPlan:
        """The part of this rank read by DataLoader worker `worker` of `num_workers`."""
        units = len(self)
        if self.contiguous_workers:
            u0, u1 = split_range(units, num_workers, worker)
            if self.sizes is None:
                return WorkerPlan(self.rows[u0:u1], None)
            ends = np.concatenate([[0], np.cumsum(self.sizes)])
            return WorkerPlan(self.rows[ends[u0]:ends[u1]], self.sizes[u0:u1])
        picked = np.arange(worker, units, num_workers)
        if self.sizes is None:
            return WorkerPlan(self.rows[picked], None)
        ends = np.concatenate([[0], np.cumsum(self.sizes)])
        parts = [self.rows[ends[u]:ends[u + 1]] for u in picked]
        rows = np.concatenate(parts) if parts else self.rows[:0]
        return WorkerPlan(rows, self.sizes[picked])


def rank_plan(order: np.ndarray, rank: int, world_size: int, batch_size: int | None,
              contiguous_workers: bool) -> RankPlan:
    """Cut the epoch order (positions of selected samples) into this rank's share and batches."""
    n = len(order)
    start, stop = split_range(n, world_size, rank)
    rows = np.asarray(order[start:stop], dtype=np.int64)
    if batch_size is None:
        return RankPlan(rows, None, contiguous_workers)
    k = batches_per_rank(n, world_size, batch_size)
    return RankPlan(rows, batch_sizes(len(rows), k, batch_size), contiguous_workers)
