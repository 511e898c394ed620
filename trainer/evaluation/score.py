"""Score: a run's model over one split of some shard sets -> the predictions table.

The sets are read as one (`cxrshards.mix.open_mix`, shuffle off, one rank), in the run's label order in shared
names, so a set's labels meet the run's outputs by shared name and a label a set lacks is NaN. The table has one
row per image: `key` (the set's own key), `patient_id` (the set's own id), `split`, `set` (card name), `view`,
`sex`, `age` (from the set's manifest; missing when it has none), one float32 column per label (1, 0, NaN = not
labelled) under `names`, and `prob_NAME` per label. Rows are sorted by `set/key`. A patient is the pair
(set, patient_id): `trainer.metrics.patient_keys`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from cxrshards import mix
from trainer.metrics import PROB_PREFIX

CONTEXT_COLUMNS = ("key", "patient_id", "split", "set", "view", "sex", "age")


def manifest_context(sets: Sequence[mix.MixSet]) -> pd.DataFrame:
    """Per image of the sets: set, key, patient_id, split, view, sex, age (NaN/None where a manifest has none)."""
    import pyarrow.parquet as pq

    parts = []
    for s in sets:
        path = s.shard_dir / "manifest.parquet"
        have = set(pq.read_schema(path).names)
        cols = [c for c in ("key", "patient_id", "split", "view", "sex", "age") if c in have]
        part = pq.read_table(path, columns=cols).to_pandas()
        part.insert(0, "set", s.name)
        if "sex" not in have:
            part["sex"] = None
        if "age" not in have:
            part["age"] = np.nan
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    table["key"] = table["key"].astype(str)
    table["patient_id"] = table["patient_id"].astype(str)
    table["age"] = table["age"].astype(np.float64)
    return table


def select_keys(context: pd.DataFrame, split: str, views: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the `NAME/KEY` keys of `split`, notes): the run's views apply on a set whose split records views; a set
    whose split records none is used whole, and a note says so."""
    rows = context[context["split"] == split]
    keys, notes = [], []
    for name, part in rows.groupby("set", sort=False):
        if views and part["view"].notna().any():
            part = part[part["view"].isin(views)]
        elif views:
            notes.append(f"{name} records no views, so all its {split} images are used "
                         f"(the run was trained on views {','.join(views)})")
        keys += (name + mix.SEP + part["key"]).tolist()
    return keys, notes


def score(loaded, sets: Sequence[mix.MixSet], split: str, shared: Sequence[str], names: Sequence[str],
          keys: Sequence[str], context: pd.DataFrame, *, fmt: str = "auto", batch_size: int = 64, workers: int = 0,
          quiet: bool = False) -> pd.DataFrame:
    """The predictions table of `keys` (`NAME/KEY`) of one split of `sets`: the run's outputs in its label order
    (`shared` names to meet the sets, reported under `names`). Progress as `cxr train` shows it."""
    import torch

    from trainer.loop import predict
    from trainer.watch import Progress

    stream = mix.open_mix(sets, split, list(shared), format=fmt, shuffle=False, batch_size=batch_size, rank=0,
                          world_size=1, keys=list(keys))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    inf = loaded.inference
    progress = Progress(epochs=1, quiet=quiet, what=f"predict {split}")
    progress.start_epoch(0, len(loader))
    try:
        probs, y, got = predict(inf.model, loader, loaded.device, mean=inf.mean, std=inf.std, head=inf.head,
                                gather=False, on_batch=progress.update)
    finally:
        progress.end_epoch(None)
    probs, y = probs.reshape(len(got), -1), y.reshape(len(got), -1)
    where = pd.Series(np.arange(len(context)), index=context["set"] + mix.SEP + context["key"])
    df = context.iloc[where.loc[list(got)].to_numpy()].reset_index(drop=True)[list(CONTEXT_COLUMNS)]
    df["split"] = split
    for j, name in enumerate(names):
        df[name] = y[:, j].astype(np.float32)
    for j, name in enumerate(names):
        df[PROB_PREFIX + name] = probs[:, j].astype(np.float32)
    order = np.argsort((df["set"] + mix.SEP + df["key"]).to_numpy(dtype=str), kind="stable")
    return df.iloc[order].reset_index(drop=True)
