"""Reading shard sets back: pixels and labels, epoch order, ranks x workers x batches, key subsets, errors."""
from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import cxrshards
from cxrshards import pixels
from cxrshards.reader import _tar_members
from manifests.errors import CxrError
from tests.shardset_fixture import expected_pixels, label_row, make_shard_set

SIZE = 16


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    return {codec: make_shard_set(root, f"fx-{codec}", codec=codec, size=SIZE) for codec in ("png", "jpeg", "raw")}


def _keys_of(stream) -> list[str]:
    out = []
    for item in stream:
        out += item[2] if isinstance(item[2], list) else [item[2]]
    return out


def _stored_keys(shard_dir: Path, split: str) -> list[str]:
    import pandas as pd

    table = pd.read_parquet(shard_dir / "manifest.parquet")
    return table[table["split"] == split].sort_values("h5_index")["key"].tolist()


@pytest.mark.parametrize("codec,fmt", [("png", "wds"), ("jpeg", "wds"), ("raw", "wds"), ("png", "hdf5"),
                                       ("jpeg", "hdf5")])
def test_samples_have_manifest_labels_and_stored_pixels(sets, codec, fmt):
    stream = cxrshards.open_shards(sets[codec], "valid", format=fmt)  # valid: no shuffle by default
    items = list(stream)
    assert len(items) == len(stream) == 7
    assert [k for _, _, k in items] == _stored_keys(sets[codec], "valid")
    for image, labels, key in items:
        assert image.dtype == torch.uint8 and image.shape == (1, SIZE, SIZE)
        assert labels.dtype == torch.float32
        np.testing.assert_array_equal(image[0].numpy(), expected_pixels(key, SIZE, codec))
        np.testing.assert_array_equal(labels.numpy(), label_row(key))  # NaN == NaN here
    nan_seen = any(np.isnan(lab.numpy()).any() for _, lab, _ in cxrshards.open_shards(sets[codec], "train"))
    assert nan_seen  # the fixture has unusable labels: they come back as NaN, not 0


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
def test_batches_are_collated_with_labels(sets, fmt):
    stream = cxrshards.open_shards(sets["png"], "train", format=fmt, batch_size=5, seed=3)
    batches = list(stream)
    assert len(batches) == len(stream) == 5 and [len(b[2]) for b in batches] == [5, 5, 5, 5, 3]
    for images, labels, keys in batches:
        assert images.dtype == torch.uint8 and images.shape == (len(keys), 1, SIZE, SIZE)
        assert labels.dtype == torch.float32 and labels.shape == (len(keys), 3)
        for j, key in enumerate(keys):
            np.testing.assert_array_equal(images[j, 0].numpy(), expected_pixels(key, SIZE, "png"))
            np.testing.assert_array_equal(labels[j].numpy(), label_row(key))
    assert sorted(k for b in batches for k in b[2]) == sorted(_stored_keys(sets["png"], "train"))


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
def test_order_is_a_pure_function_of_seed_and_epoch(sets, fmt):
    def order(seed, epoch):
        return _keys_of(cxrshards.open_shards(sets["png"], "train", format=fmt, seed=seed, epoch=epoch,
                                              shuffle_buffer=8))

    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    first = order(0, 0)
    assert first == order(0, 0)
    assert sorted(first) == sorted(order(0, 1)) and first != order(0, 1)
    assert first != order(1, 0)
    stream = cxrshards.open_shards(sets["png"], "train", format=fmt, seed=0, epoch=5, shuffle_buffer=8)
    stream.set_epoch(0)
    assert _keys_of(stream) == first
    after = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    assert torch.equal(states[0], after[0]) and states[2] == after[2]
    assert all(np.array_equal(a, b) for a, b in zip(states[1][1:], after[1][1:]))


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
@pytest.mark.parametrize("n", [23, 16, 9, 3])
@pytest.mark.parametrize("seed, epoch", [(7, 2), (0, 0), (2024, 5)])
def test_two_ranks_two_workers_cover_each_sample_once_with_equal_batches(sets, fmt, n, seed, epoch):
    """Every (seed, epoch) gives its own shard order, shuffle and cut between ranks and workers: each must
    still cover every selected sample exactly once, in equal batch counts per rank."""
    all_keys = _stored_keys(sets["png"], "train")
    keys = all_keys[:n]
    seen, batches_per_rank = Counter(), []
    for rank in range(2):
        stream = cxrshards.open_shards(sets["png"], "train", format=fmt, keys=keys, batch_size=4, rank=rank,
                                       world_size=2, seed=seed, epoch=epoch, shuffle_buffer=4)
        batches = list(DataLoader(stream, batch_size=None, num_workers=2))
        assert len(batches) == len(stream)
        batches_per_rank.append(len(batches))
        for images, labels, ks in batches:
            assert images.shape[0] == labels.shape[0] == len(ks) <= 4 and len(ks) >= 1
            seen.update(ks)
    assert batches_per_rank[0] == batches_per_rank[1] == -(-(-(-n // 2)) // 4)
    assert seen == Counter(keys)


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
def test_fewer_samples_than_ranks_gives_empty_batches_not_a_hang(sets, fmt):
    one = _stored_keys(sets["png"], "train")[4:5]
    got = []
    for rank in range(2):
        stream = cxrshards.open_shards(sets["png"], "train", format=fmt, keys=one, batch_size=4, rank=rank,
                                       world_size=2)
        batches = list(stream)
        assert len(batches) == len(stream) == 1
        got.append(batches[0])
    assert got[0][2] == one and got[1][2] == []
    assert got[1][0].shape == (0, 1, SIZE, SIZE) and got[1][1].shape == (0, 3)


def test_hdf5_batches_do_not_depend_on_the_number_of_workers(sets):
    def run(workers):
        stream = cxrshards.open_shards(sets["png"], "train", format="hdf5", batch_size=3, seed=1)
        return [b[2] for b in DataLoader(stream, batch_size=None, num_workers=workers)]

    assert run(0) == run(2)


def test_sample_mode_splits_ranks(sets):
    counts = []
    seen = []
    for rank in range(3):
        stream = cxrshards.open_shards(sets["jpeg"], "train", format="wds", rank=rank, world_size=3)
        keys = _keys_of(stream)
        counts.append(len(keys))
        assert len(keys) == len(stream)
        seen += keys
    assert counts == [8, 8, 7] and sorted(seen) == sorted(_stored_keys(sets["jpeg"], "train"))


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
def test_key_subset_is_honoured_and_skipped_samples_never_decoded(sets, fmt, monkeypatch):
    calls = []
    real = pixels.decode
    monkeypatch.setattr(pixels, "decode", lambda data, codec: calls.append(codec) or real(data, codec))
    all_keys = _stored_keys(sets["png"], "train")
    keep = all_keys[3:5] + all_keys[17:19] + all_keys[-1:]
    stream = cxrshards.open_shards(sets["png"], "train", format=fmt, keys=keep, batch_size=2)
    got = _keys_of(stream)
    assert sorted(got) == sorted(keep) and len(stream) == 3
    assert len(calls) == (len(keep) if fmt == "wds" else 0)
    stream.set_keys(all_keys[:2])
    assert sorted(_keys_of(stream)) == sorted(all_keys[:2]) and len(stream) == 1
    stream.set_keys(None)
    assert len(stream) == 12
    with pytest.raises(CxrError, match="not in the train split"):
        stream.set_keys(["no_such_key"])


def test_h5split_random_access(sets):
    ds = cxrshards.H5Split(sets["png"], "train")
    keys = _stored_keys(sets["png"], "train")
    assert len(ds) == len(keys)
    for i in (5, 0, 22, -1, 11):
        image, labels, key = ds[i]
        assert key == keys[i]
        assert image.dtype == torch.uint8 and image.shape == (1, SIZE, SIZE)
        np.testing.assert_array_equal(image[0].numpy(), expected_pixels(key, SIZE, "png"))
        np.testing.assert_array_equal(labels.numpy(), label_row(key))
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert cxrshards.H5Split(sets["png"] / "valid.h5", "valid")[0][2] == _stored_keys(sets["png"], "valid")[0]
    loader = DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)  # opened lazily in each worker
    assert [k for _, _, ks in loader for k in ks] == keys


def test_resolve_by_name_under_root_and_card(sets, monkeypatch):
    root = sets["png"].parent
    assert cxrshards.resolve_shard_dir("fx-png", root=root) == root / "fx-png"
    monkeypatch.setenv("CXR_SHARDS", str(root))
    assert cxrshards.read_card("fx-png")["codec"] == "png"
    assert len(cxrshards.open_shards("fx-png", "test")) == 5
    assert cxrshards.open_shards("fx-png", "test").format == "hdf5"  # auto prefers HDF5


def test_errors_say_what_is_wrong(sets, tmp_path):
    with pytest.raises(CxrError, match="cxr shard build"):
        cxrshards.open_shards("nope", "train", root=tmp_path)
    with pytest.raises(CxrError, match=r"splits present: train \(23\), valid \(7\), test \(5\)"):
        cxrshards.open_shards(sets["png"], "validate")
    wds_only = make_shard_set(tmp_path, "wds-only", counts={"train": 4}, formats=("wds",), size=SIZE)
    assert cxrshards.open_shards(wds_only, "train").format == "wds"
    with pytest.raises(CxrError, match="no hdf5 shards.*formats present: wds"):
        cxrshards.open_shards(wds_only, "train", format="hdf5")
    with pytest.raises(CxrError, match="format must be"):
        cxrshards.open_shards(sets["png"], "train", format="tfrecord")
    with pytest.raises(CxrError, match="rank"):
        cxrshards.open_shards(sets["png"], "train", rank=2, world_size=2)
    with pytest.raises(CxrError, match="no dataset.json"):
        (tmp_path / "half").mkdir()
        cxrshards.open_shards(tmp_path / "half", "train")
    with pytest.raises(CxrError, match="hdf5"):
        cxrshards.H5Split(wds_only, "train")


def test_tar_reader_handles_long_names_and_skips(tmp_path):
    long_key = "k" * 150
    members = {"a.json": b"{}", "a.png": b"x" * 700, f"{long_key}.npy": b"y" * 3, "b.png": b""}
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with open(path, "rb") as f:
            got = {}
            for name, size in _tar_members(f, path):
                if name.endswith((b".png", b".npy")):
                    got[name.decode()] = f.read(size)
                else:
                    got[name.decode()] = None
        assert got == {k: (None if k.endswith(".json") else v) for k, v in members.items()}
    path.write_bytes(path.read_bytes()[:100] + b"!" + path.read_bytes()[101:])
    with pytest.raises(CxrError, match="corrupt tar header"), open(path, "rb") as f:
        list(_tar_members(f, path))


def test_missing_tar_member_is_an_error(sets, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sets["raw"], copy)
    tar_path = copy / "train-000000.tar"
    with tarfile.open(tar_path) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:-2]  # drop the last sample
    with tarfile.open(tar_path, "w") as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(CxrError, match="not in the tar"):
        list(cxrshards.open_shards(copy, "train", format="wds", shuffle=False))
    with tarfile.open(tar_path, "w") as tar:  # same members, one image's bytes garbled
        for i, (m, data) in enumerate(kept):
            tar.addfile(m, io.BytesIO(b"\x00" * len(data) if i == 1 else data))
    bad = kept[1][0].name.split(".")[0]
    with pytest.raises(CxrError, match=f"train sample {bad}"):
        list(cxrshards.open_shards(copy, "train", format="wds", shuffle=False))
    assert json.loads((copy / "dataset.json").read_text())["codec"] == "raw"


def test_reads_a_set_made_by_the_real_builder(tmp_path, phantom_kermany):
    import h5py
    import pandas as pd

    from cxrshards.build import BuildConfig, build_shards
    from manifests.options import ManifestOptions

    config = BuildConfig(source="folder", raw=phantom_kermany, out=tmp_path, name="k", size=32,
                         codec="jpeg", shard_size=2, workers=1, quiet=True)
    shard_dir = build_shards(config, ManifestOptions(source="folder", label="Pneumonia",
                                                     patient_pattern=r"(person\d+)_")).path
    table = pd.read_parquet(shard_dir / "manifest.parquet")
    for split in sorted(set(table["split"])):
        rows = table[table["split"] == split].set_index("key")
        with h5py.File(shard_dir / f"{split}.h5") as h5:
            stored = {k.decode() if isinstance(k, bytes) else k: img for k, img in zip(h5["keys"][()], h5["images"][()])}
        for fmt in ("wds", "hdf5"):
            seen = []
            for rank in range(2):
                stream = cxrshards.open_shards("k", split, root=tmp_path, format=fmt, batch_size=2, rank=rank,
                                               world_size=2, shuffle=True, shuffle_buffer=3)
                for images, labels, keys in stream:
                    for j, key in enumerate(keys):
                        np.testing.assert_array_equal(images[j, 0].numpy(), stored[key])  # jpeg: same decoder
                        np.testing.assert_array_equal(labels[j].numpy(), rows.loc[key, ["Pneumonia"]].to_numpy(np.float32))
                    seen += keys
            assert sorted(seen) == sorted(rows.index)
