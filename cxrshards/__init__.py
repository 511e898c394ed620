"""Shard sets: pixels into WebDataset tars and HDF5 (`cxrshards.build`), and back out as tensors.

`import cxrshards` stays light: the reading API below is imported on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["open_shards", "resolve_shard_dir", "read_card", "H5Split", "ShardStream"]

if TYPE_CHECKING:  # pragma: no cover
    from cxrshards.reader import H5Split, ShardStream, open_shards, read_card, resolve_shard_dir


def __getattr__(name: str):
    if name in __all__:
        from cxrshards import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'cxrshards' has no attribute {name!r}")
