"""Reading shard sets back as tensors: `open_shards` streams a split (WebDataset tars or HDF5) for training
and evaluation; `H5Split` gives random access by index into an HDF5 split.

Labels come from the shard set's manifest.parquet (float32, NaN kept); pixels are decoded with
`cxrshards.pixels.decode` only for the samples an epoch selects. The epoch plan (order, ranks, workers,
batches) is in `cxrshards.plan`: a pure function of (seed, epoch), never the global RNG.
Memory stays flat as the set grows: only the split's keys, labels and sample locations are held, plus at
most one batch (and, for tars, `shuffle_buffer` encoded samples) per worker.
"""
from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from cxrshards import plan as planning
from cxrshards import remote
from cxrshards.workers import dist_rank, worker_info
from cxrshards.paths import shards_root
from manifests.errors import CxrError

FORMATS = ("auto", "wds", "hdf5")
DECODES = ("cpu", "gpu")  # gpu: JPEG tar batches come out encoded, decoded by `.to(device)` (cxrshards.jpeg_batch)
_IMAGE_EXTS = {b"png": "png", b"jpg": "jpeg", b"jpeg": "jpeg", b"npy": "raw"}
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_H5_BLOCK_BYTES = 64 << 20  # sample mode: read HDF5 images in sorted blocks of at most this many bytes


# --------------------------------------------------------------------------------------------------
# Finding a shard set


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith((".", "~")) or Path(name).is_absolute()


def resolve_shard_dir(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None, *,
                      cache: str | os.PathLike | None = None, cache_gb: float | None = None) -> Path:
    """The directory of a shard set given as a path, or as a NAME under ROOT; CxrError if there is none.

    A URL (http(s)://, s3://, gs://, ...) gives its local mirror (card and manifest; see cxrshards.remote),
    kept under `cache` (default $CXR_CACHE) when given, whose tars the reader then fetches.
    """
    text = os.fspath(name_or_path)
    if remote.is_url(text):
        return remote.mirror(text, cache, cache_gb)
    base = shards_root(root)
    candidates = [Path(text).expanduser()] if _looks_like_path(text) else [base / text, Path(text)]
    for cand in candidates:
        if (cand / "dataset.json").is_file():
            return cand
    for cand in candidates:
        if cand.is_dir():
            raise CxrError(f"{cand} is not a shard set: it has no dataset.json (an unfinished build?); "
                           f"re-run `cxr shard build ... --out {cand.parent} --name {cand.name}`")
    where = candidates[0]
    raise CxrError(f"no shard set at {where}: build it first with "
                   f"`cxr shard build --source SOURCE --raw DIR --out {where.parent} --name {where.name}` "
                   f"(shard sets are looked up under --root, else $CXR_SHARDS, else ./shards)")


def read_card(name_or_path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """The shard set's card (dataset.json) as a dict."""
    path = resolve_shard_dir(name_or_path, root) / "dataset.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CxrError(f"{path}: unreadable card ({exc}); run `cxr shard verify {path.parent}`") from None


# --------------------------------------------------------------------------------------------------
# Low-level readers


def _verify_hint(path: Path | str) -> str:
    if isinstance(path, Path):
        return f"run `cxr shard verify {path.parent}`"
    return f"pull it with `cxr shard pull {path.rsplit('/', 1)[0]}` to check it"


def _tar_members(f, path: Path | str) -> Iterator[tuple[bytes, int]]:
    """Yield (name, size) of each regular file in an open tar, positioned at its data.

    The caller may read the data or not: the next header is found by seeking past it, so skipped members
    cost a header parse and no copy. Handles ustar, pax (`x`) and GNU long-name (`L`) headers.
    """
    long_name: bytes | None = None
    pax_size: int | None = None
    start = f.tell()
    while True:
        header = f.read(_BLOCK)
        if len(header) < _BLOCK or header == _ZERO_BLOCK:
            return
        try:
            stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            if stored != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError("bad header checksum")
            if header[124] & 0x80:  # base-256 size (members over 8 GB)
                size = int.from_bytes(header[125:136], "big")
            else:
                size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError as exc:
            raise CxrError(f"{path}: corrupt tar header at byte {start} ({exc}); {_verify_hint(path)}") from None
        kind = header[156:157]
        data_at = start + _BLOCK
        if kind in (b"x", b"L"):
            data = f.read(size)
            if kind == b"L":
                long_name = data.rstrip(b"\0")
            else:
                for record in data.split(b"\n"):
                    _, _, item = record.partition(b" ")
                    field, _, value = item.partition(b"=")
                    if field == b"path":
                        long_name = value
                    elif field == b"size":
                        pax_size = int(value)
        elif kind in (b"0", b"\0", b"7"):
            if pax_size is not None:
                size = pax_size
            if long_name is not None:
                name = long_name
            else:
                name = header[:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
                if prefix:
                    name = prefix + b"/" + name
            long_name = pax_size = None
            yield name, size
        else:  # directories, links, global pax headers: nothing to read
            long_name = pax_size = None
        start = data_at + ((size + _BLOCK - 1) // _BLOCK) * _BLOCK
        f.seek(start)


class _Decoder:
    """`pixels.decode`, plus a shortcut for `.npy` members: once one member's header has been decoded
    and found to be uint8 (size, size) C-order, members with byte-identical headers are plain views of
    their data (parsing the header with numpy costs more than copying the pixels)."""

    def __init__(self, decode, size: int):
        self.decode, self.size = decode, size
        self._npy_prefix: bytes | None = None

    def __call__(self, data: bytes, codec: str) -> np.ndarray:
        prefix = self._npy_prefix
        if codec == "raw" and prefix is not None and data[:len(prefix)] == prefix \
                and len(data) == len(prefix) + self.size * self.size:
            return np.frombuffer(data, np.uint8, offset=len(prefix)).reshape(self.size, self.size)
        img = self.decode(data, codec)
        if codec == "raw" and prefix is None:
            self._npy_prefix = self._learn_npy_prefix(data)
        return img

    def _learn_npy_prefix(self, data: bytes) -> bytes | None:
        from numpy.lib import format as npy

        try:
            stream = io.BytesIO(data)
            major, _ = npy.read_magic(stream)
            read_header = npy.read_array_header_1_0 if major == 1 else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(stream)
        except ValueError:
            return None
        ok = shape == (self.size, self.size) and not fortran and dtype == np.dtype(np.uint8)
        return bytes(data[:stream.tell()]) if ok else None


def _check_image(img: Any, size: int, where: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.shape != (size, size):
        raise CxrError(f"{where}: decoded image is {img.dtype} {tuple(img.shape)}, expected uint8 "
                       f"({size}, {size}); run `cxr shard verify`")
    return img


class _H5Images:
    """The `images` dataset of SPLIT.h5, opened lazily in the process that reads (fork-safe).

    Images stored one per chunk without filters (the format's layout) are read with `read_direct_chunk`
    straight into the destination array; any other layout falls back to ordinary h5py reads.
    """

    def __init__(self, path: Path):
        self.path = path
        self._pid: int | None = None
        self._file = self._ds = None
        self._direct = False

    def _open(self):
        import h5py

        if self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._ds = self._file["images"]
            ds = self._ds
            self._direct = (ds.dtype == np.uint8 and ds.chunks == (1, *ds.shape[1:])
                            and ds.id.get_create_plist().get_nfilters() == 0)
            self._pid = os.getpid()
        return self._ds

    def read_into(self, index: int, out: np.ndarray) -> None:
        """Copy image `index` into `out` (a C-contiguous uint8 S x S array)."""
        ds = self._open()
        if self._direct:
            try:
                ds.id.read_direct_chunk((index, 0, 0), out=out.reshape(-1))
                return
            except (OSError, ValueError, RuntimeError):
                pass  # e.g. a chunk never written: read it the ordinary way
        out[...] = ds[index]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._ds = self._pid = None

    def __getstate__(self):
        return {"path": self.path, "_pid": None, "_file": None, "_ds": None, "_direct": False}


def _in_order(records: Iterable[tuple], order: np.ndarray, where: Path | str) -> Iterator[tuple]:
    """`records` ((row, ...) in read order) re-emitted in `order` (rows), holding those read ahead of their
    turn: with an order from `plan.buffer_order` that is the shuffle buffer's own holding, at most its size."""
    held: dict[int, tuple] = {}
    records = iter(records)
    for row in order.tolist():
        while row not in held:
            got = next(records, None)
            if got is None:   # cannot happen with a consistent plan; never yield a short epoch silently
                raise CxrError(f"{where}: the shards ran out of samples mid-epoch")
            held[got[0]] = got
        yield held.pop(row)


def _key_bytes(keys: Iterable[str]) -> np.ndarray:
    """Keys as a fixed-width bytes array (UTF-8): compact, and no refcounted objects to copy into workers."""
    return np.array([str(k).encode("utf-8") for k in keys], dtype="S")


# --------------------------------------------------------------------------------------------------
# Streaming


class ShardStream(IterableDataset):
    """One split of a shard set as an iterable of samples or collated batches. Build with `open_shards`.

    Samples: `(uint8 [1,S,S], float32 [L], key)`; batches: `(uint8 [b,1,S,S], float32 [b,L], list[str])`.
    `len()` is exact: this rank's batches (or samples). Use with
    `DataLoader(stream, batch_size=None, num_workers=N)`; call `set_epoch(e)` (and `set_keys(...)`) before
    each epoch's iterator is created (so not with `persistent_workers=True`, whose workers keep their copy).
    """

    def __init__(self, shard_dir: Path, split: str, fmt: str, card: dict, *, seed: int, epoch: int,
                 shuffle: bool, keys: Iterable[str] | None, batch_size: int | None, rank: int,
                 world_size: int, shuffle_buffer: int, tars: remote.RemoteTars | None = None,
                 decode: str = "cpu"):
        super().__init__()
        self.shard_dir, self.split, self.format, self.card = shard_dir, split, fmt, card
        self._tars = tars  # None: the tars are files in shard_dir
        self.decode = decode
        self.seed, self.epoch, self.shuffle = int(seed), int(epoch), bool(shuffle)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle_buffer = int(shuffle_buffer)
        self.size = int(card["size"])
        self.labels: list[str] = list(card["labels"])
        self._load_split()
        self._selected = np.arange(len(self._keys), dtype=np.int64)
        self._plan_cache: tuple[tuple, planning.RankPlan] | None = None
        self._table = None
        self.start = 0
        self.set_keys(keys)

    # -- setup ---------------------------------------------------------------------------------------
    def _load_split(self) -> None:
        import pyarrow.parquet as pq

        path = self.shard_dir / "manifest.parquet"
        if not path.is_file():
            raise CxrError(f"{path} is missing: the shard set is incomplete; re-run `cxr shard build`")
        columns = ["key", "split", "shard", "shard_index", "h5_index", *self.labels]
        try:
            table = pq.read_table(path, columns=columns, filters=[("split", "==", self.split)]).to_pandas()
        except Exception as exc:  # pyarrow raises several types for a bad file or a missing column
            raise CxrError(f"{path}: cannot read columns {columns} ({exc})") from None
        if self.format == "wds":
            if table["shard"].isna().any():
                raise CxrError(f"{path}: {int(table['shard'].isna().sum())} {self.split} rows have no tar shard")
            table = table.sort_values(["shard", "shard_index"], kind="stable")
            names, codes = np.unique(table["shard"].to_numpy(dtype=str), return_inverse=True)
            self._shard_names = [str(n) for n in names]
            self._shard_code = codes.astype(np.int32)
            exists = self._tars.has if self._tars is not None else (lambda n: (self.shard_dir / n).is_file())
            missing = [n for n in self._shard_names if not exists(n)]
            if missing:
                if self._tars is not None:
                    raise CxrError(f"{self._tars.url}: manifest.parquet names shard {missing[0]}, which the card "
                                   f"does not list ({len(missing)} such); the set is damaged")
                raise CxrError(f"{self.shard_dir}: shard {missing[0]} is missing ({len(missing)} missing); "
                               f"run `cxr shard verify {self.shard_dir}` and rebuild")
        else:
            if (table["h5_index"] < 0).any():
                raise CxrError(f"{path}: some {self.split} rows have no h5_index")
            table = table.sort_values("h5_index", kind="stable")
            self._h5_index = table["h5_index"].to_numpy(np.int64)
            self._check_h5(int(self._h5_index.max()) + 1 if len(table) else 0)
        self._keys = _key_bytes(table["key"])  # fixed-width bytes: no per-row Python objects
        self._label_values = np.ascontiguousarray(table[self.labels].to_numpy(np.float32))

    def _check_h5(self, needed: int) -> None:
        import h5py

        path = self.shard_dir / f"{self.split}.h5"
        try:
            with h5py.File(path, "r") as h5:
                shape = h5["images"].shape
        except (OSError, KeyError) as exc:
            raise CxrError(f"{path}: unreadable ({exc}); run `cxr shard verify {self.shard_dir}`") from None
        if shape[1:] != (self.size, self.size) or shape[0] < needed:
            raise CxrError(f"{path}: images are {shape}, expected at least ({needed}, {self.size}, {self.size})")

    # -- per-epoch settings --------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: order and shuffle buffer are pure functions of (seed, epoch)."""
        self.epoch = int(epoch)

    def set_start(self, units: int) -> None:
        """The next iterator begins after this rank's first `units` batches (samples without a batch size) of
        the epoch, as a DataLoader with the same number of workers would have yielded them: a resume inside
        an epoch. They are neither read nor decoded (`cxrshards.plan`). 0: the whole epoch. `len()` stays
        the epoch's."""
        self.start = int(units)

    def set_keys(self, keys: Iterable[str] | None) -> None:
        """Read only these keys (e.g. the per-label cap of this epoch); None reads the whole split.

        Unknown keys are an error. Skipped samples are neither read nor decoded.
        """
        if keys is None:
            self._selected = np.arange(len(self._keys), dtype=np.int64)
        else:
            wanted = np.unique(_key_bytes(keys))
            hit = np.isin(self._keys, wanted)
            if int(hit.sum()) != len(wanted):
                absent = np.setdiff1d(wanted, self._keys[hit])
                raise CxrError(f"{len(absent)} of the keys asked for are not in the {self.split} split of "
                               f"{self.shard_dir} (e.g. {', '.join(k.decode() for k in absent[:3])})")
            self._selected = np.flatnonzero(hit).astype(np.int64)
        self._plan_cache = None

    def set_rows(self, rows: np.ndarray) -> None:
        """Read only these row positions of the stored order (sorted, unique): `set_keys` by position."""
        self._selected = np.asarray(rows, dtype=np.int64)
        self._plan_cache = None

    # -- plan ------------------------------------------------------------------------------------------
    @property
    def num_selected(self) -> int:
        """Samples this epoch reads over all ranks."""
        return len(self._selected)

    @property
    def table(self):
        """The split's rows of manifest.parquet as a DataFrame (loaded on first use, not sent to workers)."""
        if self._table is None:
            import pandas as pd

            full = pd.read_parquet(self.shard_dir / "manifest.parquet", filters=[("split", "==", self.split)])
            self._table = full.reset_index(drop=True)
        return self._table

    def rank_plan(self) -> planning.RankPlan:
        """This rank's rows and batch sizes for the current epoch (positions into the stored order)."""
        key = (self.epoch, self.seed, self.shuffle, self.rank, self.world_size, self.batch_size)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]
        rp = planning.rank_plan(self.epoch_order(), self.rank, self.world_size, self.batch_size,
                                contiguous_workers=self.format == "wds")
        self._plan_cache = (key, rp)
        return rp

    def epoch_order(self) -> np.ndarray:
        """The selected rows in this epoch's order, over all ranks (positions into the stored order)."""
        sel = self._selected
        if self.format == "wds":
            order = planning.wds_order(self._shard_code[sel], len(self._shard_names), self.seed, self.epoch,
                                       self.shuffle)
        else:
            order = planning.h5_order(len(sel), self.seed, self.epoch, self.shuffle)
        return sel[order]

    def __len__(self) -> int:
        n = len(self._selected)
        start, stop = planning.split_range(n, self.world_size, self.rank)
        if self.batch_size is None:
            return stop - start
        return planning.batches_per_rank(n, self.world_size, self.batch_size)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_table"] = None
        return state

    # -- iteration -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        from cxrshards import pixels

        worker, num_workers = worker_info()
        wp = self.rank_plan().worker(worker, num_workers, start=self.start)
        if self.format == "hdf5":
            rows, sizes, _ = wp.after_buffers()
            return self._iter_h5(rows, sizes)
        rng = planning.epoch_rng(self.seed, self.epoch, self.rank, wp.worker)
        rows, sizes, (read,) = wp.after_buffers(None, [self.buffer_order(len(wp.rows), rng)])
        records = _in_order(self._wds_records(read), rows, self.shard_dir)
        return self._emit_wds(records, sizes, _Decoder(pixels.decode, self.size))

    def buffer_order(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Output order of a worker's shuffle buffer over its n rows this epoch, drawn from `rng` (e.g. seeded
        by (seed, epoch, rank, worker)); identity without shuffling or for hdf5."""
        if self.format != "wds" or not self.shuffle or self.shuffle_buffer <= 1:
            return np.arange(n, dtype=np.int64)
        return planning.buffer_order(n, self.shuffle_buffer, rng)

    def iter_records(self, read: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, Any, str]]:
        """(row, encoded image, codec) for each of `rows` of a tar split in that order, reading `read` (the same
        rows in read order: each tar once), for readers that make their own batches (`cxrshards.mix`)."""
        return _in_order(self._wds_records(read), rows, self.where)

    def iter_images(self, read: np.ndarray, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(row, uint8 S x S image) for each of `rows` in that order (hdf5: reading them so; wds: as
        `iter_records`)."""
        from cxrshards import pixels

        if self.format == "hdf5":   # blocks read in file order, as `_iter_h5` reads a batch, yielded in `rows` order
            h5 = _H5Images(self.shard_dir / f"{self.split}.h5")
            block = max(1, min(256, _H5_BLOCK_BYTES // (self.size * self.size)))
            try:
                for start in range(0, len(rows), block):
                    part = rows[start:start + block]
                    where = self._h5_index[part]
                    images = np.empty((len(part), self.size, self.size), dtype=np.uint8)
                    for j in np.argsort(where, kind="stable").tolist():
                        h5.read_into(int(where[j]), images[j])
                    yield from zip(part.tolist(), images)
            finally:
                h5.close()
            return
        decode = _Decoder(pixels.decode, self.size)
        for row, data, codec in self.iter_records(read, rows):
            yield row, self._decode(decode, data, codec, row)

    def encoded_tensor(self, row: int, data, codec: str) -> torch.Tensor:
        """A JPEG member as a 1-D uint8 tensor for `EncodedJpegBatch` (--decode gpu); CxrError for another codec."""
        if codec != "jpeg":
            raise CxrError(f"{self.shard_dir}: {self.split} sample {self._keys[row].decode()} is {codec}, "
                           f"not JPEG: --decode gpu reads JPEG tars only")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @property
    def where(self) -> str:
        """The set's URL or folder, for messages."""
        return str(self._tars.url if self._tars else self.shard_dir)

    def _wds_records(self, rows: np.ndarray) -> Iterator[tuple[int, bytes, str]]:
        """(row, encoded image, codec) for `rows`, in tar order, reading each tar once and sequentially."""
        if not len(rows):
            return
        codes = self._shard_code[rows]
        for run in np.split(rows, np.flatnonzero(np.diff(codes)) + 1):
            name = self._shard_names[self._shard_code[run[0]]]
            wanted = dict(zip(self._keys[run].tolist(), run.tolist()))
            if self._tars is None:
                path = self.shard_dir / name
                yield from self._read_tar(path, wanted, open(path, "rb", buffering=1 << 20))
            else:
                yield from self._read_tar(self._tars.where(name), wanted, self._tars.open(name))

    @staticmethod
    def _read_tar(path: Path | str, wanted: dict[bytes, int], opened) -> Iterator[tuple[int, bytes, str]]:
        with opened as f:
            read = getattr(f, "read_view", f.read)   # a remote block hands out views of itself, not copies
            for name, size in _tar_members(f, path):
                key, _, ext = name.partition(b".")
                row = wanted.get(key)
                if row is None or ext not in _IMAGE_EXTS:
                    continue
                data = read(size)
                if len(data) != size:
                    raise CxrError(f"{path}: truncated at member {name.decode(errors='replace')}; "
                                   f"{_verify_hint(path)}")
                del wanted[key]
                yield row, data, _IMAGE_EXTS[ext]
                if not wanted:
                    return
        if wanted:
            raise CxrError(f"{path}: {len(wanted)} samples listed in manifest.parquet are not in the tar "
                           f"(e.g. {next(iter(wanted)).decode()}); {_verify_hint(path)}")

    def _decode(self, decode, data: bytes, codec: str, row: int) -> np.ndarray:
        where = f"{self.shard_dir}: {self.split} sample {self._keys[row].decode()}"
        try:
            img = decode(data, codec)
        except CxrError as exc:  # e.g. pixels.PixelError for a corrupt member
            raise CxrError(f"{where}: {exc}; run `cxr shard verify {self.shard_dir}`") from None
        return _check_image(img, self.size, where)

    def _emit_wds(self, records: Iterator, sizes: np.ndarray | None, decode) -> Iterator:
        if sizes is None:
            for row, data, codec in records:
                img = self._decode(decode, data, codec, row)
                yield (torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)[None]),
                       torch.from_numpy(self._label_values[row].copy()), self._keys[row].decode())
            return
        records = iter(records)
        if self.decode == "gpu":
            yield from self._emit_encoded(records, sizes)
            return
        for b in sizes.tolist():
            images = torch.empty((b, 1, self.size, self.size), dtype=torch.uint8)
            out = images.numpy()
            rows = np.empty(b, dtype=np.int64)
            got = 0
            for row, data, codec in itertools.islice(records, b):
                out[got, 0] = self._decode(decode, data, codec, row)
                rows[got] = row
                got += 1
            if got != b:  # cannot happen with a consistent plan; never yield a short batch silently
                raise CxrError(f"{self.shard_dir}: the {self.split} shards ran out of samples mid-epoch")
            yield self._collate(images, rows)

    def _emit_encoded(self, records: Iterator, sizes: np.ndarray) -> Iterator:
        """Batches of encoded JPEGs (`EncodedJpegBatch`): the trainer decodes them on its device."""
        from cxrshards.jpeg_batch import EncodedJpegBatch

        for b in sizes.tolist():
            batch = list(itertools.islice(records, b))
            if len(batch) != b:
                raise CxrError(f"{self.shard_dir}: the {self.split} shards ran out of samples mid-epoch")
            rows = np.array([row for row, _, _ in batch], dtype=np.int64)
            data = [self.encoded_tensor(row, d, codec) for row, d, codec in batch]
            images, labels, keys = self._collate(None, rows)
            yield EncodedJpegBatch(data, self.size, keys, self.where), labels, keys

    def _collate(self, images: torch.Tensor, rows: np.ndarray):
        return (images, torch.from_numpy(self._label_values[rows]),
                [k.decode() for k in self._keys[rows].tolist()])

    def _iter_h5(self, plan_rows: np.ndarray, sizes: np.ndarray | None) -> Iterator:
        h5 = _H5Images(self.shard_dir / f"{self.split}.h5")
        try:
            if sizes is not None:
                start = 0
                for b in sizes.tolist():
                    rows = plan_rows[start:start + b]
                    start += b
                    images = torch.empty((b, 1, self.size, self.size), dtype=torch.uint8)
                    out = images.numpy()
                    where = self._h5_index[rows]
                    for j in np.argsort(where, kind="stable").tolist():  # file order, placed in plan order
                        h5.read_into(int(where[j]), out[j, 0])
                    yield self._collate(images, rows)
                return
            block = max(1, min(256, _H5_BLOCK_BYTES // (self.size * self.size)))
            for start in range(0, len(plan_rows), block):
                rows = plan_rows[start:start + block]
                where = self._h5_index[rows]
                out = [None] * len(rows)
                for j in np.argsort(where, kind="stable").tolist():
                    out[j] = np.empty((1, self.size, self.size), dtype=np.uint8)
                    h5.read_into(int(where[j]), out[j][0])
                for j, row in enumerate(rows.tolist()):
                    yield (torch.from_numpy(out[j]), torch.from_numpy(self._label_values[row].copy()),
                           self._keys[row].decode())
                    out[j] = None
        finally:
            h5.close()


def open_shards(name_or_path: str | os.PathLike, split: str, *, root: str | os.PathLike | None = None,
                format: str = "auto", seed: int = 0, epoch: int = 0, shuffle: bool | None = None,
                keys: Iterable[str] | None = None, batch_size: int | None = None, rank: int | None = None,
                world_size: int | None = None, shuffle_buffer: int = 1000, cache: str | os.PathLike | None = None,
                cache_gb: float | None = None, decode: str = "cpu") -> ShardStream:
    """Open one split of a shard set (a path, a NAME under ROOT, or a URL) as a `ShardStream`.

    format: "auto" (hdf5 when SPLIT.h5 exists, else wds; wds for a URL with tars), "wds" or "hdf5". shuffle defaults to True for
    train only. keys: read only these (never decoding the rest). batch_size: yield collated batches, every
    rank the same number. rank/world_size: default from torch.distributed when initialised, else 0/1.
    A URL streams its tars (through `cache`, default $CXR_CACHE, when given, holding at most `cache_gb`
    GiB): see cxrshards.remote. decode="gpu" (JPEG tars, batches only) yields each batch's images still
    encoded, as a `cxrshards.jpeg_batch.EncodedJpegBatch` that `.to(device)` decodes in one batched call.
    """
    shard_dir = resolve_shard_dir(name_or_path, root, cache=cache, cache_gb=cache_gb)
    tars = remote.remote_tars(shard_dir)
    card = read_card(shard_dir)
    splits = {name: int((info or {}).get("count", 0)) for name, info in card.get("splits", {}).items()}
    if splits.get(split, 0) <= 0:
        present = ", ".join(f"{s} ({n})" for s, n in splits.items() if n > 0) or "none"
        raise CxrError(f"{shard_dir} has no {split!r} split; splits present: {present}")
    if format not in FORMATS:
        raise CxrError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    h5_path = shard_dir / f"{split}.h5"
    has = {"hdf5": h5_path.is_file() or (tars is not None and tars.has(h5_path.name)),
           "wds": any(f.get("split") == split and str(f.get("file", "")).endswith(".tar")
                      for f in card.get("files", [])) or any(shard_dir.glob(f"{split}-*.tar"))}
    if format == "auto":  # a URL set (HDF5 is local only) and --decode gpu read the tars when there are some
        format = "hdf5" if has["hdf5"] and not ((tars is not None or decode == "gpu") and has["wds"]) else "wds"
    if tars is not None and format == "hdf5":
        raise CxrError(f"{tars.url}: HDF5 shards are read from local disk only; pull the set first "
                       f"(`cxr shard pull {tars.url} --root ROOT`) and open ROOT/NAME, or read its tars (--format wds)")
    if not has[format]:
        present = [f for f in ("wds", "hdf5") if has[f]] or ["none"]
        raise CxrError(f"{shard_dir} has no {format} shards for {split!r} (formats present: "
                       f"{', '.join(present)}); rebuild with `cxr shard build ... --format {format}` or both")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise CxrError(f"batch_size must be a positive integer or None, not {batch_size!r}")
    if shuffle_buffer < 0:
        raise CxrError(f"shuffle_buffer must be >= 0, not {shuffle_buffer}")
    if decode not in DECODES:
        raise CxrError(f"decode must be one of {', '.join(DECODES)}, not {decode!r}")
    if decode == "gpu" and (format != "wds" or card.get("codec") != "jpeg" or batch_size is None):
        raise CxrError(f"--decode gpu reads JPEG tars in batches; {shard_dir} gives {format} "
                       f"{card.get('codec')} shards{'' if batch_size else ' without a batch size'}: rebuild with "
                       f"`cxr shard build ... --codec jpeg` or use --decode cpu")
    rank, world_size = dist_rank(rank, world_size)
    return ShardStream(shard_dir, split, format, card, seed=seed, epoch=epoch,
                       shuffle=(split == "train") if shuffle is None else shuffle, keys=keys,
                       batch_size=batch_size, rank=rank, world_size=world_size, shuffle_buffer=shuffle_buffer,
                       tars=tars, decode=decode)


# --------------------------------------------------------------------------------------------------
# Random access


class H5Split(Dataset):
    """Map-style view of SPLIT.h5: `len()`, `[i] -> (uint8 [1,S,S], float32 [L], key)`.

    `path_or_dir` is the .h5 file, a shard set directory or a NAME under `root`. Keys and labels come from
    the file itself (so a bare .h5 works); the file is opened lazily in each process that reads (fork-safe).
    """

    def __init__(self, path_or_dir: str | os.PathLike, split: str, root: str | os.PathLike | None = None):
        import h5py

        given = Path(path_or_dir)
        path = given if given.suffix == ".h5" and given.is_file() else \
            resolve_shard_dir(path_or_dir, root) / f"{split}.h5"
        if not path.is_file():
            raise CxrError(f"{path} does not exist: the shard set has no hdf5 {split!r} split "
                           f"(build with `cxr shard build ... --format hdf5` or both)")
        try:
            with h5py.File(path, "r") as h5:
                shape = h5["images"].shape
                self.keys = _key_bytes(k.decode("utf-8") if isinstance(k, bytes) else k
                                       for k in h5["keys"][()])
                self._label_values = np.ascontiguousarray(h5["labels"][()], dtype=np.float32)
                self.labels = json.loads(h5.attrs["labels"]) if "labels" in h5.attrs else []
        except (OSError, KeyError, ValueError) as exc:
            raise CxrError(f"{path}: not a cxr HDF5 split ({exc})") from None
        if len(shape) != 3 or shape[1] != shape[2] or len(self.keys) != shape[0] or \
                len(self._label_values) != shape[0]:
            raise CxrError(f"{path}: images {shape}, {len(self.keys)} keys and {len(self._label_values)} "
                           f"label rows do not agree")
        self.path, self.split, self.size = path, split, int(shape[1])
        self._images = _H5Images(path)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int):
        n = len(self.keys)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.path}")
        image = np.empty((1, self.size, self.size), dtype=np.uint8)
        self._images.read_into(i, image[0])
        return torch.from_numpy(image), torch.from_numpy(self._label_values[i].copy()), self.keys[i].decode()

    def close(self) -> None:
        self._images.close()
