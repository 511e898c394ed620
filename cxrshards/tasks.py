"""The unit of work of a shard build: one piece (a run of consecutive samples) of one shard.

`run_piece(task)` is a top-level function of a frozen, picklable task, so it runs the same inline, in a
process pool (any start method) or on a Dask worker. It decodes, resizes and encodes each image, and
writes three files into the work folder, each atomically:

- `STEM.tarpart`: the tar members of the kept samples (`writers.sample_members`), no end blocks;
- `STEM.u8`: their pixels after the codec round trip, size x size bytes each, in order (for HDF5);
- `STEM.json`: the record returned (written last: a record on disk means the piece is whole). It names
  each source as `[path, size, mtime_ns, sha256 or None]`, stamped before the file is read (sha256 only
  with `hash_sources`), so a resume can tell whether the piece was made from the sources as they are now.

A rejected image (`PixelError`) is simply absent: which sample goes to which shard was decided before.

Tracing for bench/shard_bench.py: with the environment variable CXR_TRACE_FIRST=FILE, each piece appends
one line `PID WALL_TIME` to FILE once its first image is decoded, resized and encoded (`time.time()`), so
the bench can tell how long after the command's start the first image was ready. Read once per piece.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrshards.writers import EXTENSIONS, sample_members
from manifests.atomic import atomic_path, write_bytes_atomic

TRACE_FIRST = "CXR_TRACE_FIRST"   # environment variable: see the module docstring


@dataclass(frozen=True)
class PieceTask:
    """Samples `start .. start+len(items)` of shard `shard` (a file stem such as `train-000003`)."""

    shard: str
    start: int
    items: tuple[tuple[str, str, bytes], ...]   # (key, image path relative to raw, KEY.json bytes)
    raw: str                                    # absolute raw root
    size: int
    fit: str
    codec: str
    jpeg_quality: int
    wds: bool                                   # write the .tarpart
    hdf5: bool                                  # write the .u8 pixels
    work: str                                   # folder for this piece's files (absolute)
    shard_id: str                               # fingerprint of the whole shard's inputs and options
    hash_sources: bool = False                  # record each source's sha256 too (--verify-sources)

    @property
    def stem(self) -> str:
        return f"{self.shard}.{self.start:06d}"

    @property
    def task_id(self) -> str:
        """Fingerprint of everything that shapes this piece's bytes (the work folder excluded)."""
        return hashlib.sha256(f"{self.shard_id}:{self.start}:{len(self.items)}".encode()).hexdigest()

    def paths(self) -> dict[str, Path]:
        base = Path(self.work) / self.stem
        return {"tarpart": base.with_name(base.name + ".tarpart"), "u8": base.with_name(base.name + ".u8"),
                "record": base.with_name(base.name + ".json")}


def shard_fingerprint(options: dict, items: list[tuple[str, str, bytes]] | tuple) -> str:
    """sha256 over the pixel options and every (key, path, json) of a shard, in order."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for key, path, meta in items:
        digest.update(b"\0" + key.encode() + b"\0" + path.encode() + b"\0" + meta)
    return digest.hexdigest()


def source_stamp(path: Path, with_hash: bool) -> list:
    """[size, mtime_ns, sha256 or None] of a source file as it is now; [None, None, None] when it cannot be
    stat'ed (missing). Taken before the file is read, so a change during the build shows as stale later."""
    try:
        st = os.stat(path)
    except OSError:
        return [None, None, None]
    return [st.st_size, st.st_mtime_ns, file_sha256(path) if with_hash else None]


def _trace_first(path: str) -> None:
    """Append `PID WALL_TIME` to `path` (one short O_APPEND write: lines from several workers stay whole)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def process_image(path: str | os.PathLike, size: int, fit: str, codec: str, quality: int) -> tuple[bytes, np.ndarray]:
    """(encoded shard member, pixels after the codec round trip) of one raw image; PixelError if unusable.

    The pixels equal `cxrshards.pixels.preprocess(path, size, fit, codec, quality)` (what `cxr predict` sees)."""
    from cxrshards.pixels import decode, encode, prepare   # see run_piece

    img = prepare(path, size, fit)
    data = encode(img, codec, quality)
    if codec == "jpeg":   # png and raw are lossless: the round trip gives back `img`
        img = decode(data, codec)
    return data, img


def run_piece(task: PieceTask) -> dict:
    """Process one piece and write its files; returns its record (also written as `STEM.json`).

    OpenCV runs single-threaded meanwhile: the build's parallelism is one piece per process, and extra
    OpenCV threads per process would only compete for the same cores. OpenCV and the decoders
    (`cxrshards.pixels`) are imported here, not with this module: a build's parent process imports it for
    `PieceTask` but decodes nothing, and its worker server preloads them (`cxrshards.pool.PRELOAD`).
    """
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        return _run_piece(task)
    finally:
        cv2.setNumThreads(threads)


def _run_piece(task: PieceTask) -> dict:
    from cxrshards.pixels import PixelError

    paths = task.paths()
    Path(task.work).mkdir(parents=True, exist_ok=True)
    ext = EXTENSIONS[task.codec]
    raw = Path(task.raw)
    kept: list[str] = []
    rejects: list[list[str]] = []
    hist = np.zeros(256, dtype=np.int64)
    sources = [[rel, *source_stamp(raw / rel, task.hash_sources)] for _, rel, _ in task.items]
    tar_digest, u8_digest = hashlib.sha256(), hashlib.sha256()
    trace = os.environ.get(TRACE_FIRST)
    # No fsync: a piece is reused only after its files' sha256 match its record, so a power cut at worst
    # makes it be rebuilt; three fsyncs per piece would idle the worker's core (~10% of a build).
    with atomic_path(paths["tarpart"], fsync=False) as tar_tmp, atomic_path(paths["u8"], fsync=False) as u8_tmp:
        with open(tar_tmp, "wb") as tar_fh, open(u8_tmp, "wb") as u8_fh:
            for key, rel, meta in task.items:
                try:
                    data, pixels = process_image(raw / rel, task.size, task.fit, task.codec, task.jpeg_quality)
                except PixelError as exc:
                    rejects.append([key, rel, exc.reason])
                    continue
                finally:
                    if trace:
                        _trace_first(trace)
                        trace = None
                kept.append(key)
                hist += np.bincount(pixels.ravel(), minlength=256)
                if task.wds:
                    block = sample_members(key, {ext: data, "json": meta})
                    tar_fh.write(block)
                    tar_digest.update(block)
                if task.hdf5:
                    buf = pixels.tobytes()
                    u8_fh.write(buf)
                    u8_digest.update(buf)
    record = {
        "task": task.task_id, "shard": task.shard, "start": task.start, "count": len(kept), "keys": kept,
        "rejects": rejects, "hist": hist.tolist(), "sources": sources,
        "tarpart_sha256": tar_digest.hexdigest(), "u8_sha256": u8_digest.hexdigest(),
    }
    write_bytes_atomic(paths["record"], json.dumps(record).encode(), fsync=False)
    return record
