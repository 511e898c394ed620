"""Where shard sets live. Kept free of heavy imports: the builder (no torch) and the reader both use it."""
from __future__ import annotations

import os
from pathlib import Path


def shards_root(root: str | os.PathLike | None = None) -> Path:
    """ROOT of shard sets: `root`, else `$CXR_SHARDS`, else `./shards`."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get("CXR_SHARDS") or "shards")
