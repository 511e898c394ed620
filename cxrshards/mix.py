"""Shard sets read as one: the one place where shard sets meet, for a run (`cxr train --shards A[,B...]`) and for
its evaluation. One set is a mix of one: it reads exactly as `open_shards` reads that set alone (the same
samples, order, `len()` and labels), so a run never needs a second path for the single-set case.

The rules:
- Sets: one image size (else a one-line error naming each set's size) and distinct card names.
- Labels: each set's labels in shared names (`manifests.labelmap`); the stream works in shared names. The run's
  labels are the union of shared names (the first set's in its card order, then each next set's new ones in
  its card order), each NAMED as the first set that has it names it (so a lone MIMIC set keeps
  `Pleural Effusion`); or `--labels`, given by those names or by shared names. A run label a set lacks is NaN
  for that set's samples (the losses mask NaN: never a fake negative).
- Keys in a mixed stream are `NAME/KEY` (NAME = the set's card name; keys never hold `/`), unique across sets.
- Per epoch each set gives n_s samples of its pool (its train keys after --views and --max-per-label), drawn
  without replacement, afresh each epoch, from `default_rng([seed, epoch, DRAW_TAG, set index])`:
    proportional: the whole pool of each set;
    equal: the smallest pool's size from each set;
    W1,W2,...: shares w_s / sum(w) of the largest total T that every set can give its share of without
      replacement, T = min_s(pool_s * sum(w) / w_s) (so at most the sum of the pools); n_s = floor(T * w_s / sum(w)).
- Order: each set's own epoch order (`ShardStream.epoch_order`: tar shards permuted by (seed, epoch), or a full
  permutation for hdf5), interleaved by a permutation of the set indices drawn from
  `default_rng([seed, epoch, INTERLEAVE_TAG])`; without shuffling (valid, test) set after set in stored order.
  That order is cut into ranks, batches and DataLoader workers by `cxrshards.plan` exactly as one set is: exact
  `len()`, the same number of batches on every rank, each selected sample once per epoch. With tar shards a
  worker reads each set's part through that set's shuffle buffer, seeded by (seed, epoch, rank, worker, set).
- Normalisation: the cards' train pixel stats pooled by train counts, w_s = n_s / N:
  mean = sum(w_s m_s), var = sum(w_s (std_s^2 + (m_s - mean)^2)) (within- plus between-set variance); for one
  set w = 1, so mean and std are the card's own, bit for bit.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset

from cxrshards import plan as planning
from cxrshards.reader import ShardStream, open_shards, read_card, resolve_shard_dir
from cxrshards.workers import dist_rank, worker_info
from manifests.errors import CxrError
from manifests.labelmap import LabelMap

MIXES = ("proportional", "equal")
DRAW_TAG = 0x313
INTERLEAVE_TAG = 0x1EAF
SEP = "/"


class MixError(CxrError):
    """Shard sets that cannot be read as one, or a bad --mix."""


@dataclass(frozen=True)
class MixSet:
    """One shard set of a mixed run."""
    name: str                  # the card's name: the key prefix and the metrics.csv column suffix
    shard_dir: Path
    card: dict
    shared: tuple[str, ...]    # the card's labels in shared names, card order

    @property
    def source(self) -> str:
        return str(self.card.get("source", ""))

    @property
    def labels(self) -> list[str]:
        """The card's own label names, card order."""
        return list(self.card["labels"])


def resolve_sets(names: Sequence[str | os.PathLike], root: str | os.PathLike | None,
                 label_map: LabelMap, **remote) -> list[MixSet]:
    """The shard sets of a run, checked to be readable as one (same size, distinct names). `remote`:
    `cache`/`cache_gb` for sets given as URLs (`resolve_shard_dir`)."""
    sets = []
    for name in names:
        shard_dir = resolve_shard_dir(name, root, **remote)
        card = read_card(shard_dir)
        shared = label_map.shared_labels(str(card.get("source", "")), list(card["labels"]))
        sets.append(MixSet(str(card.get("name") or shard_dir.name), shard_dir, card, tuple(shared)))
    sizes = [int(s.card["size"]) for s in sets]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{s.name} {n} px" for s, n in zip(sets, sizes))
        raise MixError(f"shard sets of different image sizes cannot be mixed ({listed}); "
                       f"build them at one size with `cxr shard build ... --size N`")
    seen: dict[str, Path] = {}
    for s in sets:
        if s.name in seen:
            raise MixError(f"two shard sets are named {s.name!r} ({seen[s.name]} and {s.shard_dir}); "
                           f"rebuild one with `cxr shard build ... --name OTHER`")
        seen[s.name] = s.shard_dir
    return sets


@dataclass(frozen=True)
class RunLabels:
    """The labels of a run over some shard sets: `names` as the run reports them, `shared` the same labels in
    shared names (what the streams and the label map work in), same order."""
    names: list[str]
    shared: list[str]


def run_labels(sets: Sequence[MixSet], wanted: Sequence[str] = ()) -> RunLabels:
    """The union of the sets' labels (first set's order, then each next set's new ones), each named as the first
    set holding it names it; or `wanted` (those names or shared names), in the order given."""
    shared: list[str] = []
    names: list[str] = []
    for s in sets:
        for own, common in zip(s.labels, s.shared):
            if common not in shared:
                shared.append(common)
                names.append(own)
    if not wanted:
        return RunLabels(names, shared)
    pick = []
    for w in wanted:
        if w in names:
            pick.append(names.index(w))
        elif w in shared:
            pick.append(shared.index(w))
        else:
            raise MixError(f"--labels: {w!r} is not a label of {', '.join(s.name for s in sets)} "
                           f"(labels: {', '.join(names)})")
    return RunLabels([names[i] for i in pick], [shared[i] for i in pick])


def label_columns(mix_set: MixSet, labels: Sequence[str]) -> np.ndarray:
    """For each run label, its column in the set's card labels, or -1 when the set lacks it (NaN)."""
    return np.array([mix_set.shared.index(n) if n in mix_set.shared else -1 for n in labels], dtype=np.int64)


def map_label_values(values: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """float32 [N, L_set] -> [N, L_run]: the mapped columns, NaN where the set lacks a run label."""
    out = np.full((len(values), len(columns)), np.nan, dtype=np.float32)
    has = columns >= 0
    out[:, has] = values[:, columns[has]]
    return out


def pooled_normalisation(sets: Sequence[MixSet]) -> tuple[float, float]:
    """(mean, std) of the sets' train pixels together, from the cards' stats weighted by train counts."""
    counts, means, stds = [], [], []
    for s in sets:
        mean, std = s.card.get("pixel_mean"), s.card.get("pixel_std")
        count = int((s.card.get("splits", {}).get("train") or {}).get("count", 0))
        if mean is None or not std or count <= 0:
            raise MixError(f"shard set {s.name} has no train pixel_mean/pixel_std in its card: "
                           f"pass --normalize MEAN,STD (e.g. 0.5,0.5)")
        counts.append(count), means.append(float(mean)), stds.append(float(std))
    n, m, sd = np.array(counts, np.float64), np.array(means), np.array(stds)
    w = n / n.sum()
    mean = float((w * m).sum())
    var = float((w * (sd * sd + (m - mean) ** 2)).sum())
    return mean, math.sqrt(var)


def parse_mix(text: str, n_sets: int) -> str | tuple[float, ...]:
    """"proportional" | "equal" | one positive weight per set."""
    if text in MIXES:
        return text
    try:
        weights = tuple(float(w) for w in str(text).split(","))
    except ValueError:
        raise MixError(f"--mix {text!r}: expected proportional, equal or one weight per shard set "
                       f"(e.g. 2,1)") from None
    if len(weights) != n_sets:
        raise MixError(f"--mix {text}: {len(weights)} weight(s) for {n_sets} shard sets")
    if not all(w > 0 and math.isfinite(w) for w in weights):
        raise MixError(f"--mix {text}: weights must be positive numbers")
    return weights


def mix_counts(pools: Sequence[int], mix: str | tuple[float, ...]) -> list[int]:
    """How many samples each set gives this epoch, from its pool size (see the module rules)."""
    pools = [int(p) for p in pools]
    if mix == "proportional":
        return pools
    if mix == "equal":
        return [min(pools)] * len(pools)
    w = np.asarray(mix, dtype=np.float64)
    share = w / w.sum()
    total = min(p / s for p, s in zip(pools, share))
    return [min(p, int(math.floor(total * s + 1e-9))) for p, s in zip(pools, share)]


def draw(pool: np.ndarray, count: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """`count` of the pool's rows without replacement (sorted), a pure function of (seed, epoch, set index)."""
    if count >= len(pool):
        return pool
    picked = planning.epoch_rng(seed, epoch, DRAW_TAG, index).choice(len(pool), count, replace=False)
    return pool[np.sort(picked)]


def split_key(key: str) -> tuple[str, str]:
    """`NAME/KEY` -> (NAME, KEY)."""
    name, sep, rest = key.rpartition(SEP)
    if not sep:
        raise MixError(f"key {key!r} of a mixed run has no shard set prefix (NAME{SEP}KEY)")
    return name, rest


def combined_table(sets: Sequence[MixSet], labels: RunLabels):
    """The sets' manifest rows as one table: `set`, `key` as NAME/KEY, `patient_id` as NAME/ID, split, view, sex,
    age (missing in sets built before them) and the run's labels under `labels.names` (NaN where a set lacks
    one). For the per-label cap, pos_weight and the --views filter."""
    import pandas as pd

    from manifests.table import read_manifest

    parts = []
    for s in sets:
        table = read_manifest(s.shard_dir / "manifest.parquet").table
        part = pd.DataFrame({"set": s.name, "key": s.name + SEP + table["key"].astype(str),
                             "patient_id": s.name + SEP + table["patient_id"].astype(str),
                             "split": table["split"], "view": table["view"], "sex": table["sex"],
                             "age": table["age"]})
        for name, col in zip(labels.names, label_columns(s, labels.shared).tolist()):
            part[name] = table[s.labels[col]].astype(np.float32) if col >= 0 else np.float32(np.nan)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def shuffle_rng(seed: int, epoch: int, rank: int, worker: int, set_index: int) -> np.random.Generator:
    """The shuffle buffer's generator of one set in one worker: set 0 draws as a lone set's reader does."""
    return planning.epoch_rng(seed, epoch, rank, worker, *([set_index] if set_index else []))


class MixedStream(IterableDataset):
    """One split of several shard sets as one iterable of samples or collated batches. Build with `open_mix`.

    Yields what `ShardStream` yields (`(uint8 [b,1,S,S], float32 [b,L], keys)` with batches; with decode="gpu"
    an `EncodedJpegBatch` for the images), labels in the run's order, keys `NAME/KEY`. `set_epoch(e)` / `set_keys(keys)` before each epoch's iterator, as for
    `ShardStream`; `len()` is exact.
    """

    def __init__(self, sets: Sequence[MixSet], streams: Sequence[ShardStream], labels: Sequence[str],
                 mix: str | tuple[float, ...], *, seed: int, epoch: int, shuffle: bool, batch_size: int | None,
                 rank: int, world_size: int, decode: str = "cpu"):
        super().__init__()
        self.names = [s.name for s in sets]
        self.streams = list(streams)
        self.labels = list(labels)
        self.mix = mix
        self.seed, self.epoch, self.shuffle = int(seed), int(epoch), bool(shuffle)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.decode = decode
        self.size = int(sets[0].card["size"])
        self._values = [map_label_values(st._label_values, label_columns(s, labels))
                        for s, st in zip(sets, self.streams)]
        # every set's rows as one table, so a batch gathers its labels and keys in one indexing each
        self._base = np.concatenate([[0], np.cumsum([len(v) for v in self._values])])[:-1].astype(np.int64)
        self._all_values = np.concatenate(self._values) if self._values else np.empty((0, len(self.labels)))
        self._all_keys = np.concatenate([np.char.add((name + SEP).encode(), st._keys)
                                         for name, st in zip(self.names, self.streams)])
        self._pools = [np.arange(len(st._keys), dtype=np.int64) for st in self.streams]
        self._contiguous = any(st.format == "wds" for st in self.streams)
        self._cache: tuple[tuple, tuple] | None = None
        self.start = 0

    # -- per-epoch settings --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, units: int) -> None:
        """The next iterator begins after this rank's first `units` batches of the epoch (a resume inside
        it), as `ShardStream.set_start`: the skip is in the plan, those samples are never read."""
        self.start = int(units)

    def set_keys(self, keys: Iterable[str] | None) -> None:
        """Pools of the epoch's draw: these `NAME/KEY` keys (e.g. the per-label cap); None = every sample."""
        if keys is None:
            self._pools = [np.arange(len(st._keys), dtype=np.int64) for st in self.streams]
        else:
            per_set: dict[str, list[str]] = {name: [] for name in self.names}
            for key in keys:
                name, rest = split_key(str(key))
                if name not in per_set:
                    raise MixError(f"key {key!r}: no shard set {name!r} in this run ({', '.join(self.names)})")
                per_set[name].append(rest)
            pools = []
            for st, name in zip(self.streams, self.names):
                st.set_keys(per_set[name])
                pools.append(st._selected.copy())
            self._pools = pools
        self._cache = None

    # -- plan ------------------------------------------------------------------------------------------
    def counts(self) -> list[int]:
        """Samples each set gives this epoch (over all ranks)."""
        return mix_counts([len(p) for p in self._pools], self.mix)

    def epoch_plan(self) -> tuple[list[np.ndarray], planning.RankPlan]:
        """(each set's rows in its epoch order, this rank's plan over the interleaved positions)."""
        key = (self.epoch, self.rank, self.world_size, self.batch_size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        counts = self.counts()
        orders = []
        for i, (st, pool, n) in enumerate(zip(self.streams, self._pools, counts)):
            st.set_rows(draw(pool, n, self.seed, self.epoch, i) if self.shuffle else pool[:n])
            st.set_epoch(self.epoch)
            orders.append(st.epoch_order())
        which = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        if self.shuffle:
            which = planning.epoch_rng(self.seed, self.epoch, INTERLEAVE_TAG).permutation(which)
        offsets = np.concatenate([[0], np.cumsum(counts)])[:-1].astype(np.int64)
        order = np.empty(len(which), dtype=np.int64)
        for s in range(len(counts)):   # the k-th slot of set s holds global position offsets[s] + k
            slots = np.flatnonzero(which == s)
            order[slots] = offsets[s] + np.arange(len(slots))
        rp = planning.rank_plan(order, self.rank, self.world_size, self.batch_size,
                                contiguous_workers=self._contiguous)
        self._cache = (key, (orders, rp))
        return orders, rp

    def __len__(self) -> int:
        n = sum(self.counts())
        if self.batch_size is None:
            start, stop = planning.split_range(n, self.world_size, self.rank)
            return stop - start
        return planning.batches_per_rank(n, self.world_size, self.batch_size)

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        worker, num_workers = worker_info()
        orders, rp = self.epoch_plan()
        wp = rp.worker(worker, num_workers, start=self.start)
        counts = np.array([len(o) for o in orders], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])[:-1]
        group = np.searchsorted(offsets, wp.rows, side="right") - 1 if len(wp.rows) else wp.rows
        buffers = [st.buffer_order(int(np.count_nonzero(group == s)),
                                   shuffle_rng(self.seed, self.epoch, self.rank, wp.worker, s))
                   for s, st in enumerate(self.streams)]
        rows, sizes, reads = wp.after_buffers(group, buffers)
        set_of = np.searchsorted(offsets, rows, side="right") - 1 if len(rows) else rows
        encoded = self.decode == "gpu"
        items_of = []
        for s, st in enumerate(self.streams):
            read, mine = orders[s][reads[s] - offsets[s]], orders[s][rows[set_of == s] - offsets[s]]
            items_of.append(st.iter_records(read, mine) if encoded else st.iter_images(read, mine))
        sizes = sizes if sizes is not None else np.ones(len(rows), dtype=np.int64)
        start = 0
        for b in sizes.tolist():
            which = set_of[start:start + b].tolist()
            start += b
            images = torch.empty((0 if encoded else b, 1, self.size, self.size), dtype=torch.uint8)
            out = images.numpy()
            at = np.empty(b, dtype=np.int64)   # rows in the sets' joint table
            data = []
            for j, s in enumerate(which):
                got = next(items_of[s], None)
                if got is None:   # cannot happen with a consistent plan; never yield a short batch silently
                    raise MixError(f"{self.streams[s].shard_dir}: ran out of samples mid-epoch")
                if encoded:
                    data.append(self.streams[s].encoded_tensor(got[0], got[1], got[2]))
                else:
                    out[j, 0] = got[1]
                at[j] = self._base[s] + got[0]
            labels = self._all_values[at]
            keys = [k.decode() for k in self._all_keys[at].tolist()]
            if encoded:
                from cxrshards.jpeg_batch import EncodedJpegBatch

                where = ", ".join(dict.fromkeys(self.streams[s].where for s in which))
                yield EncodedJpegBatch(data, self.size, keys, where), torch.from_numpy(labels), keys
            elif wp.sizes is None:
                yield images[0], torch.from_numpy(labels[0]), keys[0]
            else:
                yield images, torch.from_numpy(labels), keys


def open_mix(sets: Sequence[MixSet], split: str, labels: Sequence[str], *, mix: str = "proportional",
             format: str = "auto", seed: int = 0, epoch: int = 0, shuffle: bool | None = None,
             keys: Iterable[str] | None = None, batch_size: int | None = None, rank: int | None = None,
             world_size: int | None = None, shuffle_buffer: int = 1000, decode: str = "cpu") -> MixedStream:
    """One split of the shard sets as a `MixedStream` (arguments as `open_shards`, plus the labels in shared
    names and the --mix)."""
    rank, world_size = dist_rank(rank, world_size)
    shuffle = (split == "train") if shuffle is None else shuffle
    streams = [open_shards(s.shard_dir, split, format=format, seed=seed, epoch=epoch, shuffle=shuffle,
                           rank=0, world_size=1, shuffle_buffer=shuffle_buffer, decode=decode,
                           batch_size=batch_size if decode == "gpu" else None) for s in sets]
    stream = MixedStream(sets, streams, labels, parse_mix(mix, len(sets)) if isinstance(mix, str) else mix,
                         seed=seed, epoch=epoch, shuffle=shuffle, batch_size=batch_size, rank=rank,
                         world_size=world_size, decode=decode)
    if keys is not None:
        stream.set_keys(keys)
    return stream
