"""The shard set's self-description: `dataset.json` (the card) and `manifest.parquet` with sample locations."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from manifests import __version__
from manifests.atomic import write_bytes_atomic
from manifests.table import Manifest, split_summary, write_manifest

FORMAT_VERSION = 1
CARD_NAME = "dataset.json"
MANIFEST_NAME = "manifest.parquet"
REJECTS_NAME = "rejects.parquet"
BUILD_NAME = "build.json"
LOCATION_COLUMNS = ("shard", "shard_index", "h5_index")


def pixel_stats(hist: np.ndarray | list[int]) -> tuple[float | None, float | None]:
    """(mean, std) on the 0..1 scale from a 256-bin histogram of uint8 pixels; exact integer sums."""
    counts = [int(c) for c in hist]
    n = sum(counts)
    if n == 0:
        return None, None
    s1 = sum(v * c for v, c in enumerate(counts))
    s2 = sum(v * v * c for v, c in enumerate(counts))
    mean = s1 / n
    var = max(0.0, s2 / n - mean * mean)
    return mean / 255.0, math.sqrt(var) / 255.0


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Pretty, key-order-preserving JSON written atomically (the same dict gives the same bytes)."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def write_located_manifest(path: str | os.PathLike, table: pd.DataFrame, meta: dict) -> None:
    """manifest.parquet: the manifest table plus shard, shard_index, h5_index, with `b"cxr"` metadata (labels
    from `meta["labels"]`), rows in the table's order. Written by `manifests.table.write_manifest`, the one
    writer of manifests: its checks and its leakage audit (no patient in two splits) hold for every shard set."""
    write_manifest(Manifest(table=table, labels=list(meta["labels"]), meta=meta), path, sort=False)


def make_card(*, name: str, source: str, size: int, codec: str, jpeg_quality: int, fit: str,
              formats: tuple[str, ...], labels: list[str], table: pd.DataFrame, train_hist,
              manifest_options: dict, shard_options: dict, rejects: int, pixel_rejects: int,
              reject_reasons: dict[str, int], manifest_sha256: str, files: list[dict]) -> dict:
    """The card dict of DESIGN.md section 2 (`table` holds the samples actually in the shards)."""
    mean, std = pixel_stats(train_hist)
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "size": int(size),
        "codec": codec,
        "jpeg_quality": int(jpeg_quality),
        "fit": fit,
        "formats": list(formats),
        "labels": list(labels),
        "splits": split_summary(table, list(labels)),
        "pixel_mean": mean,
        "pixel_std": std,
        "build": {"manifest options": manifest_options, "shard options": shard_options},
        "tool_version": __version__,
        "rejects": int(rejects),
        "pixel_rejects": int(pixel_rejects),
        "reject_reasons": reject_counts_json(reject_reasons),
        "manifest_sha256": manifest_sha256,
        "files": files,
    }


def reject_counts_json(counts: dict[str, int]) -> dict[str, int]:
    return {str(k): int(v) for k, v in counts.items()}


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
