"""Write to a temporary name in the target folder, rename when whole: a crash never leaves a
file that looks complete."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success fsync it and rename it over `path`.

    On any exception the temporary file is removed and `path` is left as it was. `fsync=False` skips the
    flush to disk (the rename stays atomic for every process): only for intermediate files whose
    checksums are verified before reuse, so a power cut can at worst make them be rebuilt.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
