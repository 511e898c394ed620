"""The per-epoch order of a WebDataset split has two parts, and each must change with the epoch on its own:
the order of the shard files, and the shuffle buffer's mixing of samples."""
from __future__ import annotations

import pandas as pd
import pytest

import cxrshards
from tests.shardset_fixture import make_shard_set

EPOCHS = range(6)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rules-reader")
    return {"many": make_shard_set(root, "many-8", counts={"train": 30}, size=8, shard_size=5, formats=("wds",)),
            "one": make_shard_set(root, "one-8", counts={"train": 30}, size=8, shard_size=30, formats=("wds",))}


def _order(shard_dir, epoch: int, buffer: int) -> list[str]:
    stream = cxrshards.open_shards(shard_dir, "train", format="wds", seed=0, epoch=0, shuffle=True,
                                   shuffle_buffer=buffer)
    stream.set_epoch(epoch)
    return [key for _image, _labels, key in stream]


def test_shard_order_alone_changes_with_the_epoch(sets):
    """Buffer of 1 (no mixing): each tar is read whole, in tar order, and the sequence of tars differs
    between epochs."""
    table = pd.read_parquet(sets["many"] / "manifest.parquet")
    shard_of = dict(zip(table["key"], table["shard"]))
    in_tar = {s: g.sort_values("shard_index")["key"].tolist() for s, g in table.groupby("shard")}
    sequences = set()
    for epoch in EPOCHS:
        keys = _order(sets["many"], epoch, buffer=1)
        tars = [shard_of[k] for k in keys[::5]]
        assert keys == [k for t in tars for k in in_tar[t]]            # whole tars, each in tar order
        assert sorted(tars) == sorted(in_tar)
        sequences.add(tuple(tars))
    assert len(sequences) > 1, "the order of the shard files is the same in every epoch"


def test_shuffle_buffer_alone_changes_with_the_epoch(sets):
    """One tar (the shard order has nothing to change): the buffer's mixing differs between epochs."""
    stored = pd.read_parquet(sets["one"] / "manifest.parquet").sort_values("shard_index")["key"].tolist()
    orders = set()
    for epoch in EPOCHS:
        keys = _order(sets["one"], epoch, buffer=10)
        assert sorted(keys) == sorted(stored) and keys != stored
        assert keys == _order(sets["one"], epoch, buffer=10)           # a pure function of (seed, epoch)
        orders.add(tuple(keys))
    assert len(orders) == len(EPOCHS), "the shuffle buffer mixes the samples the same way in two epochs"
