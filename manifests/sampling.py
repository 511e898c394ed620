"""Per-label cap sampling (the seed's NIH balancing), a pure function of (table, cap, seed, epoch)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from manifests.errors import ManifestError


def cap_sample(
    table: pd.DataFrame, labels: list[str], cap: int, seed: int, epoch: int, split: str | None = "train"
) -> list[str]:
    """Keys of the rows of `split` (None: all rows) to use this epoch, in table order.

    Each label keeps at most `cap` of its positives (1.0), drawn with
    `numpy.random.default_rng([seed, epoch])`; labels with <= cap positives are kept whole (Hernia).
    Rows positive for no label form one more group, capped the same way. The result is the union,
    so a row kept for one label stays even if another label dropped it. Same arguments, same keys; the
    draw runs over the rows sorted by key, so a reordered table (e.g. a shard set's manifest) gives the
    same keys.
    """
    if cap < 1:
        raise ManifestError(f"cap must be a positive number of images per label, got {cap}")
    missing = [label for label in labels if label not in table.columns]
    if missing:
        raise ManifestError(f"cap_sample: table has no label column(s) {', '.join(missing)}")
    rows = table if split is None else table[table["split"] == split]
    keys = rows["key"].to_numpy(dtype=object)
    by_key = np.argsort(keys, kind="stable")          # draw over key order: row order does not matter
    positive = rows[list(labels)].to_numpy(dtype=np.float32)[by_key] == 1.0
    groups = np.concatenate([positive, ~positive.any(axis=1, keepdims=True)], axis=1)
    rng = np.random.default_rng([seed, epoch])
    keep_sorted = np.zeros(len(rows), dtype=bool)
    for column in range(groups.shape[1]):
        members = np.flatnonzero(groups[:, column])
        if len(members) > cap:
            members = rng.choice(members, size=cap, replace=False)
        keep_sorted[members] = True
    keep = np.empty_like(keep_sorted)
    keep[by_key] = keep_sorted
    return keys[keep].tolist()
