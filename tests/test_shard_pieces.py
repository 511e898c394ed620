"""How a build cuts its work: pieces sized from the split sizes and the worker slots, largest first, and
output bytes that never depend on the cut."""
from __future__ import annotations

import math
from pathlib import Path

import cxrshards.build as build_module
from cxrshards.build import BuildConfig, _pieces, _Shard, build_shards
from tests.test_shard_build import kermany_options
from tests.test_shard_support import file_hashes


def shards_of(sizes: dict[str, int], shard_size: int) -> list[_Shard]:
    shards = []
    for split, n in sizes.items():
        for number, lo in enumerate(range(0, n, shard_size)):
            items = [(f"{split}{i}", f"{split}/{i}.png", b"{}") for i in range(lo, min(n, lo + shard_size))]
            shards.append(_Shard(stem=f"{split}-{number:06d}", split=split, items=items, shard_id=split))
    return shards


def test_pieces_keep_every_slot_busy_largest_first(tmp_path):
    config = BuildConfig(source="folder", raw=tmp_path, out=tmp_path).resolved()
    for sizes, shard_size, slots in (({"train": 112, "valid": 16, "test": 32}, 10_000, 2),   # 160 MIMIC-like
                                     ({"train": 448, "valid": 64, "test": 128}, 10_000, 16),
                                     ({"train": 7, "valid": 1, "test": 2}, 4, 2),
                                     ({"train": 5000, "valid": 700, "test": 1300}, 1000, 2)):
        shards = shards_of(sizes, shard_size)
        tasks = _pieces(shards, config, tmp_path, slots)
        total = sum(sizes.values())
        lengths = [len(t.items) for t in tasks]
        assert lengths == sorted(lengths, reverse=True)                      # largest first
        assert max(lengths) <= max(1, min(build_module.MAX_PIECE, math.ceil(total / (8 * slots))))
        assert len(tasks) >= min(total, 4 * slots)                           # enough to share out
        for shard in shards:   # a shard's pieces: near-equal, contiguous, every sample exactly once
            mine = sorted((t.start, t.items) for t in tasks if t.shard == shard.stem)
            assert [s for s, _ in mine] == shard.starts
            assert [x for _, items in mine for x in items] == shard.items
            assert max(len(i) for _, i in mine) - min(len(i) for _, i in mine) <= 1


def test_bytes_do_not_depend_on_how_shards_are_cut_into_pieces(tmp_path, phantom_kermany, monkeypatch):
    raw = phantom_kermany
    hashes = []
    for name, per_slot, most in (("whole", 1, 10_000), ("single", 10_000, 1), ("default", 8, 256)):
        monkeypatch.setattr(build_module, "PIECES_PER_SLOT", per_slot)
        monkeypatch.setattr(build_module, "MAX_PIECE", most)
        build_shards(BuildConfig(source="folder", raw=raw, out=tmp_path, name=name, size=64, shard_size=5,
                                 format="both", workers=2, quiet=True), kermany_options())
        hashes.append(file_hashes(Path(tmp_path) / name, skip=("build.json", "dataset.json", "README.md")))
    assert hashes[0] == hashes[1] == hashes[2] and len(hashes[0]) >= 6
