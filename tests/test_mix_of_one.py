"""One shard set is a mix of one: `cxrshards.mix.open_mix([set])` reads exactly what `open_shards(set)` reads
(the same samples in the same order, the same batches and `len()`, the same labels), for both formats, with and
without shuffling, a cap (`set_keys`), several ranks and DataLoader workers, and GPU-decode batches; and pooled
normalisation of one set is the card's own mean and std, bit for bit."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import cxrshards
from cxrshards import mix
from manifests.labelmap import load_label_map
from tests.shardset_fixture import make_shard_set


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    jpeg = make_shard_set(root, "fx-jpeg", codec="jpeg", formats=("wds", "hdf5"), shard_size=7,
                          counts={"train": 40, "valid": 9, "test": 5})
    card = json.loads((jpeg / "dataset.json").read_text())
    card.update(pixel_mean=0.4217, pixel_std=0.2331)
    (jpeg / "dataset.json").write_text(json.dumps(card))
    return jpeg


def _batches(stream, workers):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [(images.to("cpu") if not isinstance(images, torch.Tensor) else images, labels, keys)
            for images, labels, keys in loader]


def _same(alone, mixed, name):
    assert len(alone) == len(mixed)
    for (xa, ya, ka), (xm, ym, km) in zip(alone, mixed):
        km = [km] if isinstance(km, str) else km
        ka = [ka] if isinstance(ka, str) else ka
        assert [name + "/" + k for k in ka] == km
        assert torch.equal(xa, xm)
        assert torch.equal(ya.nan_to_num(-1), ym.nan_to_num(-1))


@pytest.mark.parametrize("fmt,split,batch,rank,world,workers,seed,epoch", [
    ("wds", "train", 4, 0, 1, 0, 0, 0), ("wds", "train", 4, 0, 1, 2, 3, 1), ("wds", "train", None, 1, 2, 0, 5, 2),
    ("hdf5", "train", 4, 0, 1, 2, 1, 3), ("hdf5", "train", 3, 1, 2, 0, 0, 1), ("wds", "valid", 4, 0, 1, 0, 0, 0),
    ("hdf5", "test", None, 0, 1, 0, 0, 0)])
def test_a_mix_of_one_reads_exactly_as_the_set_alone(one, fmt, split, batch, rank, world, workers, seed, epoch):
    (s,) = mix.resolve_sets([one], None, load_label_map())
    kw = dict(format=fmt, seed=seed, epoch=epoch, batch_size=batch, rank=rank, world_size=world, shuffle_buffer=5)
    alone = cxrshards.open_shards(one, split, **kw)
    mixed = mix.open_mix([s], split, mix.run_labels([s]).shared, **kw)
    assert len(alone) == len(mixed)
    _same(_batches(alone, workers), _batches(mixed, workers), s.name)
    # a cap: the same subset by key, read the same way, for the next epoch too
    keys = sorted(alone.table["key"].tolist())[::3]
    alone.set_keys(keys), mixed.set_keys([s.name + "/" + k for k in keys])
    alone.set_epoch(epoch + 1), mixed.set_epoch(epoch + 1)
    assert len(alone) == len(mixed)
    _same(_batches(alone, workers), _batches(mixed, workers), s.name)


def test_gpu_decode_batches_of_a_mix_hold_what_the_set_alone_yields(one):
    (s,) = mix.resolve_sets([one], None, load_label_map())
    kw = dict(seed=2, epoch=1, batch_size=4, rank=0, world_size=1, decode="gpu")
    alone = list(cxrshards.open_shards(one, "train", **kw))
    mixed = list(mix.open_mix([s], "train", mix.run_labels([s]).shared, **kw))
    assert [k for _, _, k in mixed] == [[s.name + "/" + k for k in keys] for _, _, keys in alone]
    for (xa, _, _), (xm, _, _) in zip(alone, mixed):
        assert torch.equal(xa.to("cpu"), xm.to("cpu"))


def test_one_set_keeps_its_card_stats_and_label_names_bit_for_bit(one, tmp_path):
    card = json.loads((one / "dataset.json").read_text())
    (s,) = mix.resolve_sets([one], None, load_label_map())
    assert mix.pooled_normalisation([s]) == (card["pixel_mean"], card["pixel_std"])
    for mean, std in itertools.product([0.1, 0.3, 0.4999, 0.73], [0.1, 0.17, 0.2331, 0.3]):   # sqrt(std*std) == std
        s1 = mix.MixSet(s.name, s.shard_dir, {**card, "pixel_mean": mean, "pixel_std": std}, s.shared)
        assert mix.pooled_normalisation([s1]) == (mean, std)
    mimic = mix.MixSet("m", s.shard_dir, {**card, "source": "mimic", "labels": ["Atelectasis", "Pleural Effusion"]},
                       ("Atelectasis", "Effusion"))
    assert mix.run_labels([mimic]) == mix.RunLabels(["Atelectasis", "Pleural Effusion"], ["Atelectasis", "Effusion"])
    assert mix.run_labels([mimic], ["Effusion"]) == mix.run_labels([mimic], ["Pleural Effusion"]) \
        == mix.RunLabels(["Pleural Effusion"], ["Effusion"])
    with pytest.raises(mix.MixError, match=r"--labels: 'Mass' is not a label of m \(labels: Atelectasis, Pleural"):
        mix.run_labels([mimic], ["Mass"])
