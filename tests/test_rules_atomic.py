"""Atomic writes: an error raised while a manifest, a card, a shard (tar or HDF5) or a checkpoint is being
written leaves the previous file byte-identical and nothing partial under the final name.

Each test goes through the real write function and makes the byte writer underneath it fail after
writing part of the file.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

import cxrshards.build as build_module
from cxrshards.build import BuildConfig, build_shards
from cxrshards.card import write_json
from cxrshards.writers import write_h5
from manifests.build import ManifestOptions, build_manifest
from manifests.table import read_manifest, write_manifest
from tests.test_manifest_table import folder_raw
from tests.test_shard_resume import copies_tree
from trainer.checkpoint import load_checkpoint, save_checkpoint


class Injected(RuntimeError):
    """The failure raised mid-write."""


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _assert_untouched(folder: Path, before: dict[str, bytes]) -> None:
    """Every file as it was (the previous file byte-identical), no new file (partial or temporary) beside it."""
    after = _listing(folder)
    assert sorted(after) == sorted(before), f"files now: {sorted(after)}, before: {sorted(before)}"
    for name, data in before.items():
        assert after[name] == data, f"{name} changed"


def test_manifest_write_interrupted_keeps_the_previous_manifest(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    raw = folder_raw(tmp_path / "raw")
    out = tmp_path / "out"
    path = write_manifest(build_manifest(raw, ManifestOptions(source="cardiomegaly", seed=0)), out / "m.parquet")
    before = _listing(out)
    newer = build_manifest(raw, ManifestOptions(source="cardiomegaly", seed=1))   # other split: other bytes
    real = pq.write_table

    def half_then_fail(table, where, *args, **kwargs):
        buf = io.BytesIO()
        real(table, buf, *args, **kwargs)
        Path(where).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise Injected("disk went away")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(Injected):
        write_manifest(newer, path)
    monkeypatch.undo()
    _assert_untouched(out, before)
    assert read_manifest(path).meta["options"]["seed"] == 0


def test_card_write_interrupted_keeps_the_previous_card(tmp_path, monkeypatch):
    card = tmp_path / "set" / "dataset.json"
    write_json(card, {"name": "set", "files": [{"file": "train-000000.tar"}]})
    before = _listing(card.parent)
    real = Path.write_bytes

    def half_then_fail(self, data):
        real(self, data[: len(data) // 2])
        raise Injected("disk went away")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    with pytest.raises(Injected):
        write_json(card, {"name": "set", "files": [{"file": "train-000000.tar"}, {"file": "train-000001.tar"}]})
    monkeypatch.undo()
    _assert_untouched(card.parent, before)


def test_tar_shard_write_interrupted_keeps_the_previous_shard(tmp_path, phantom_kermany, monkeypatch):
    """A second build rewrites the shards of a finished set (one of them damaged); the first tar it
    writes fails half-way: every tar stays as it was, and the next build repairs the set."""
    raw = copies_tree(phantom_kermany, tmp_path / "raw", copies=1)
    options = ManifestOptions(source="folder")
    config = BuildConfig(source="folder", raw=raw, out=tmp_path / "a", name="set", size=32, shard_size=3,
                         format="wds", workers=1, quiet=True)
    folder = build_shards(config, options).path
    good = {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    assert len(good) > 1
    damaged = bytearray(good["train-000000.tar"])
    damaged[600] ^= 0xFF                          # no longer matches its checksum: a build must rewrite it
    (folder / "train-000000.tar").write_bytes(bytes(damaged))
    before = {p.name: p.read_bytes() for p in folder.glob("*.tar")}
    written = []

    def half_then_fail(dst, src, digest=None, chunk=1 << 20):
        written.append(Path(dst.name))
        data = Path(src).read_bytes()
        dst.write(data[: len(data) // 2])
        dst.flush()
        raise Injected("disk went away")

    monkeypatch.setattr(build_module, "copy_into", half_then_fail)
    with pytest.raises(Injected):
        build_shards(config, options)
    monkeypatch.undo()
    assert len(written) == 1 and written[0].parent == folder and ".tar" in written[0].name
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == before
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    build_shards(config, options)                 # the next build repairs the damaged shard
    assert {p.name: p.read_bytes() for p in folder.glob("*.tar")} == good


def test_hdf5_shard_write_interrupted_keeps_the_previous_file(tmp_path):
    size, labels = 8, ["A"]
    pixels = tmp_path / "px.u8"
    np.arange(3 * size * size, dtype=np.uint8).tofile(pixels)
    out = tmp_path / "set"
    write_h5(out / "train.h5", split="train", size=size, labels=labels, keys=["a", "b", "c"],
             label_matrix=np.zeros((3, 1), np.float32), pixel_files=[(pixels, 3)])
    before = _listing(out)

    def files_then_fail():
        yield pixels, 3
        raise Injected("disk went away")          # after 3 of the 6 images were written

    with pytest.raises(Injected):
        write_h5(out / "train.h5", split="train", size=size, labels=labels, keys=list("abcdef"),
                 label_matrix=np.ones((6, 1), np.float32), pixel_files=files_then_fail())
    _assert_untouched(out, before)


@pytest.mark.parametrize("previous", [True, False])
def test_checkpoint_write_interrupted_keeps_the_previous_checkpoint(tmp_path, monkeypatch, previous):
    run = tmp_path / "run"
    run.mkdir()
    state = {"model": {"w": torch.zeros(64)}, "config": {"model": "resnet18"}, "labels": ["A"], "task": "binary",
             "epoch": 1}
    if previous:
        save_checkpoint(run / "last.pt", state)
    before = _listing(run)
    real = torch.save

    def half_then_fail(obj, where, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        Path(where).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise Injected("disk went away")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(Injected):
        save_checkpoint(run / "last.pt", {**state, "model": {"w": torch.ones(64)}, "epoch": 2})
    monkeypatch.undo()
    _assert_untouched(run, before)
    if previous:
        assert load_checkpoint(run / "last.pt")["epoch"] == 1
