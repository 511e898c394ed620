"""Byte-exact writers for shard files: tar members with fixed metadata, and the per-split HDF5 file.

A tar is built from independently written pieces: `tar_member` gives the header and padded data of one
member, exactly as `tarfile.TarFile.addfile` writes it, and `tar_end` the closing blocks `TarFile.close`
appends. Concatenating the members of several pieces and then `tar_end` gives the same bytes as one
`TarFile` writing all members in order, so a shard can be encoded in parallel pieces and joined.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np

from cxrshards.choices import CODEC_EXTENSIONS
from manifests.atomic import atomic_path

BLOCK = tarfile.BLOCKSIZE            # 512
RECORD = tarfile.RECORDSIZE          # 20 blocks: tar files are padded to a multiple of this
MEMBER_MODE = 0o444
H5_LIBVER = ("v110", "v110")         # pinned: the same HDF5 object versions whatever the library's default
EXTENSIONS = CODEC_EXTENSIONS


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member (header + data padded to 512 bytes): mtime 0, uid/gid 0, uname/gname '', mode 0o444."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    pad = (-len(data)) % BLOCK
    return header + data + b"\0" * pad


def sample_members(key: str, files: dict[str, bytes]) -> bytes:
    """All members of one sample, `KEY.EXT` for each extension, in sorted name order (as webdataset's TarWriter)."""
    return b"".join(tar_member(f"{key}.{ext}", files[ext]) for ext in sorted(files))


def tar_end(length: int) -> bytes:
    """The end-of-archive blocks for a member stream of `length` bytes, padded to a whole record."""
    end = length + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end) % RECORD)


def sample_json(key: str, labels: dict[str, float | None], split: str, patient_id: str) -> bytes:
    """The `KEY.json` member: labels by name (None where not usable), split and patient."""
    record = {"key": key, "labels": labels, "split": split, "patient_id": patient_id}
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode("utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def copy_into(dst: BinaryIO, src: str | os.PathLike, digest=None, chunk: int = 1 << 20) -> int:
    """Append the bytes of file `src` to `dst` (updating `digest` if given); returns the bytes copied."""
    total = 0
    with open(src, "rb") as fh:
        while block := fh.read(chunk):
            dst.write(block)
            if digest is not None:
                digest.update(block)
            total += len(block)
    return total


def write_h5(path: str | os.PathLike, *, split: str, size: int, labels: list[str], keys: list[str],
             label_matrix: np.ndarray, pixel_files: Iterable[tuple[str | os.PathLike, int]],
             block: int = 256) -> str:
    """Write `SPLIT.h5` atomically from raw uint8 pixel files; returns its sha256.

    `pixel_files` yields (file, count): each file holds `count` images of size x size bytes, in order;
    they are copied `block` images at a time, so memory stays flat whatever the split's size.
    Byte-deterministic: pinned libver, no timestamps (`track_times=False`), no attribute order tracking.
    """
    import h5py   # here: the build's workers, which import this module, never write HDF5

    n = len(keys)
    if label_matrix.shape != (n, len(labels)):
        raise ValueError(f"{split}: label matrix {label_matrix.shape} does not match {n} keys x {len(labels)} labels")
    final = Path(path)
    with atomic_path(final) as tmp:
        with h5py.File(tmp, "w", libver=H5_LIBVER, track_order=False) as h5:
            images = h5.create_dataset("images", shape=(n, size, size), dtype=np.uint8, chunks=(1, size, size),
                                       track_times=False)
            row = 0
            for file, count in pixel_files:
                pixels = np.memmap(file, dtype=np.uint8, mode="r", shape=(count, size, size)) if count else None
                for start in range(0, count, block):
                    stop = min(count, start + block)
                    images[row + start:row + stop] = pixels[start:stop]
                row += count
                del pixels
            if row != n:
                raise ValueError(f"{split}: pixel files hold {row} images, expected {n}")
            h5.create_dataset("labels", data=np.asarray(label_matrix, dtype=np.float32), track_times=False)
            h5.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"),
                              track_times=False)
            h5.attrs["labels"] = json.dumps(list(labels))
            h5.attrs["size"] = int(size)
            h5.attrs["split"] = split
    return sha256_file(final)
