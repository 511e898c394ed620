"""How a build cuts its work: pieces sized from the split sizes and the worker slots, largest first, output
bytes that never depend on the cut, and a piece that is interrupted leaves no file under its final names."""
from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cxrshards.build as build_module
import cxrshards.tasks as tasks_module
from cxrshards.build import BuildConfig, _pieces, _Shard, build_shards
from cxrshards.tasks import PieceTask, run_piece
from cxrshards.writers import sample_json
from tests.test_shard_build import kermany_options
from tests.test_shard_support import REPO, file_hashes


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


# --- an interrupted piece -------------------------------------------------------------------------------


def piece_task(raw: Path, work: Path, **changes) -> PieceTask:
    """A piece of all 12 images of a Kermany-layout folder, both outputs (.tarpart and .u8)."""
    rels = sorted(p.relative_to(raw).as_posix() for p in raw.rglob("*.jpeg"))
    items = tuple((f"k{i:02d}", rel, sample_json(f"k{i:02d}", {"Pneumonia": 0.0}, "train", f"p{i}"))
                  for i, rel in enumerate(rels))
    fields = dict(shard="train-000000", start=0, items=items, raw=str(raw), size=32, fit="pad", codec="png",
                  jpeg_quality=95, wds=True, hdf5=True, work=str(work), shard_id="0" * 64)
    return PieceTask(**{**fields, **changes})


def finals(task: PieceTask) -> list[str]:
    return sorted(p.name for p in task.paths().values() if p.exists())


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_an_interrupted_piece_leaves_nothing_under_its_final_names(tmp_path, phantom_kermany, monkeypatch, stop):
    """A piece stopped after some of its images (Ctrl-C, a full disk): none of its three files exists, and no
    temporary is left behind either; a whole piece writes all three."""
    task = piece_task(phantom_kermany, tmp_path / "work")
    real_process = tasks_module.process_image
    done = []

    def stops_at_the_fifth(*args, **kwargs):
        if len(done) == 4:
            raise stop("interrupted")
        done.append(args[0])
        return real_process(*args, **kwargs)

    monkeypatch.setattr(tasks_module, "process_image", stops_at_the_fifth)
    with pytest.raises(stop):
        run_piece(task)
    assert len(done) == 4
    assert finals(task) == [] and list((tmp_path / "work").iterdir()) == []
    monkeypatch.undo()
    record = run_piece(task)
    assert finals(task) == sorted(p.name for p in task.paths().values()) and record["count"] == 12


def test_a_piece_killed_midway_leaves_nothing_under_its_final_names(tmp_path, phantom_kermany):
    """kill -9 in the middle of a piece: its temporaries may stay (the next build clears them), its final names
    never appear."""
    task = piece_task(phantom_kermany, tmp_path / "work")
    marker = tmp_path / "fifth"
    script = textwrap.dedent(f"""
        import pickle, sys, time
        from pathlib import Path
        import cxrshards.tasks as tasks
        real, seen = tasks.process_image, []
        def slow(*args, **kwargs):
            seen.append(args[0])
            if len(seen) == 5:
                Path({str(marker)!r}).write_text("")
                time.sleep(60)
            return real(*args, **kwargs)
        tasks.process_image = slow
        tasks.run_piece(pickle.loads(sys.stdin.buffer.read()))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        proc.stdin.write(pickle.dumps(task))
        proc.stdin.close()
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the piece ended before its fifth image"
            time.sleep(0.01)
        assert finals(task) == []
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert finals(task) == []
    assert all(p.name.endswith(".tmp") for p in (tmp_path / "work").iterdir())
