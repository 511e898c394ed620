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
With tar shards a worker reads its rows in plan order (tar order) and yields them through a shuffle buffer
(`buffer_order`: the buffer only ever moves positions, so its output order is a pure function of the number
of rows, the buffer size and its RNG). A shard set with several groups (the shard sets of a mix) has one
buffer per group; slot i of the worker's output takes the next output of the group of its i-th row.

Resuming inside an epoch (`RankPlan.worker(..., start=S)`, S = the rank's units already yielded): the skip
happens here, never by reading. A DataLoader takes one unit from each worker in turn (skipping finished
ones), so the S units done are the first S of that round robin; the resumed DataLoader's worker i takes over
the uninterrupted epoch's worker (w* + i) % num_workers (w* = the worker owing unit S), which keeps the
round robin's order; each worker's plan says how many of its units are done (`skip`), and its
shuffle buffers are replayed on positions (`WorkerPlan.after_buffers`), so the rows still to yield come out
exactly as in the uninterrupted epoch and only they are read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order (positions 0..n-1) of a shuffle buffer of `size` fed n items in order.

    The buffer keeps `size` items; each further item takes the place of a random one (drawn from
    `rng.integers(0, size, 1024)` blocks), which is emitted; at the end the rest come out in the order of
    `rng.permutation`. Holding positions instead of samples gives the very order a buffer of samples gives.
    """
    out = np.empty(n, dtype=np.int64)
    buf = list(range(min(size, n)))
    k = 0
    draws: list[int] = []
    at = 0
    for item in range(len(buf), n):
        if at == len(draws):
            draws, at = rng.integers(0, size, 1024).tolist(), 0
        j = draws[at]
        at += 1
        out[k] = buf[j]
        buf[j] = item
        k += 1
    for j in rng.permutation(len(buf)).tolist():
        out[k] = buf[j]
        k += 1
    return out


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker of one rank reads: `rows` in read order, cut into `sizes` (None: yield samples).

    `worker`: the worker of the uninterrupted epoch this share is (it seeds the shuffle buffers); `skip`:
    how many of its units were already yielded before a resume (never read again)."""

    rows: np.ndarray
    sizes: np.ndarray | None
    worker: int = 0
    skip: int = 0

    @property
    def done_samples(self) -> int:
        """Samples of the units already done."""
        return self.skip if self.sizes is None else int(self.sizes[:self.skip].sum())

    def after_buffers(self, groups: np.ndarray | None = None, orders: Sequence[np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None, list[np.ndarray]]:
        """(rows still to yield, in yield order; their unit sizes; each group's rows still to read, in read order).

        `groups[i]`: the group of `rows[i]` (None: one group); `orders[g]`: the output order of group g's
        buffer (`buffer_order` over its rows; None: no buffers, rows come out as read).
        """
        groups = np.zeros(len(self.rows), dtype=np.int64) if groups is None else np.asarray(groups)
        n_groups = int(groups.max()) + 1 if len(groups) else 1
        if orders is None:
            orders = [np.arange(int(np.count_nonzero(groups == g)), dtype=np.int64) for g in range(n_groups)]
        done = self.done_samples
        emitted = np.empty_like(self.rows)
        reads = []
        for g, order in enumerate(orders):
            at = np.flatnonzero(groups == g)
            mine = self.rows[at]
            emitted[at] = mine[order]
            gone = int(np.count_nonzero(groups[:done] == g))
            reads.append(mine[np.sort(order[gone:])])
        sizes = None if self.sizes is None else self.sizes[self.skip:]
        return emitted[done:], sizes, reads


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of an epoch: `rows` (positions into the split table) in order, and its batches."""

    rows: np.ndarray
    sizes: np.ndarray | None  # batch sizes (sum = len(rows)), None when yielding samples
    contiguous_workers: bool  # True: wds blocks; False: hdf5 round robin

    def __len__(self) -> int:
        """Units this rank yields: batches, or samples without a batch size."""
        return len(self.rows) if self.sizes is None else len(self.sizes)

    def worker(self, worker: int, num_workers: int, start: int = 0) -> WorkerPlan:
        """The part of this rank read by DataLoader worker `worker` of `num_workers`, when the DataLoader
        has already yielded the rank's first `start` units (a resume; see the module rules)."""
        units = len(self)
        start = min(max(int(start), 0), units)
        if self.contiguous_workers:
            source, skip = resumed_worker(units, num_workers, worker, start)
            u0, u1 = split_range(units, num_workers, source)
            if self.sizes is None:
                return WorkerPlan(self.rows[u0:u1], None, source, skip)
            ends = np.concatenate([[0], np.cumsum(self.sizes)])
            return WorkerPlan(self.rows[ends[u0]:ends[u1]], self.sizes[u0:u1], source, skip)
        picked = np.arange(start + worker, units, num_workers)
        if self.sizes is None:
            return WorkerPlan(self.rows[picked], None, worker)
        ends = np.concatenate([[0], np.cumsum(self.sizes)])
        parts = [self.rows[ends[u]:ends[u + 1]] for u in picked]
        rows = np.concatenate(parts) if parts else self.rows[:0]
        return WorkerPlan(rows, self.sizes[picked], worker)


def resumed_worker(units: int, num_workers: int, worker: int, start: int) -> tuple[int, int]:
    """(the uninterrupted epoch's worker whose block resumed worker `worker` reads, its units already done)
    when `units` are dealt to workers in contiguous blocks and the DataLoader's round robin yielded `start`.

    Block w holds n_w units (split_range: the larger blocks first). The round robin yields unit j of block w
    at position j * num_workers + w while every block has a unit j, then the larger blocks' last units.
    """
    if start <= 0:
        return worker, 0
    base, extra = divmod(units, num_workers)
    if start >= units:
        return worker, split_range(units, num_workers, worker)[1] - split_range(units, num_workers, worker)[0]
    if start < base * num_workers:
        round_, first = divmod(start, num_workers)
    else:
        round_, first = base, start - base * num_workers
    source = (first + worker) % num_workers
    return source, round_ if source >= first else round_ + 1


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
