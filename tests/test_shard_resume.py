"""An interrupted build (kill -9, or a failure after N units) re-run gives the bytes of an uninterrupted one."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import cxrshards.build as build_module
from cxrshards.build import BuildConfig, build_shards
from manifests.options import ManifestOptions
from tests.test_shard_support import REPO, file_hashes


def copies_tree(kermany: Path, raw: Path, copies: int) -> Path:
    """A folder set of `copies` symlinks to each image of a Kermany-layout folder (12 x copies images)."""
    for cls in ("normal", "abnormal"):
        (raw / cls).mkdir(parents=True)
        for src in sorted((kermany / cls).glob("*.jpeg")):
            for c in range(copies):
                (raw / cls / f"c{c}_{src.name}").symlink_to(src)
    return raw


def comparable(folder: Path) -> dict[str, str]:
    """Hashes of every file; build.json only differs by --out (checked separately)."""
    return file_hashes(folder, skip=("build.json",))


def cli_build(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "shard", "build", "--source", "folder", "--raw", str(raw), "--out", str(out),
            "--name", "set", "--size", "96", "--shard-size", "2", "--quiet", *extra]


def test_kill_9_midway_then_rerun_is_byte_identical(tmp_path, phantom_kermany):
    raw = copies_tree(phantom_kermany, tmp_path / "raw", copies=4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(cli_build(raw, tmp_path / "ref", "--workers", "1"), env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli_build(raw, out, "--workers", "1"), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list((out / "set").glob("*.tar")):
            assert proc.poll() is None, "the build ended before its first shard file appeared"
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "set" / "dataset.json").exists(), "killed too late: the build had finished"
    done = len(list((out / "set").glob("*.tar")))
    assert 1 <= done < 24

    rerun = subprocess.run(cli_build(raw, out, "--workers", "2"), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    decoded = int(re.search(r"reused; (\d+) images in", rerun.stdout).group(1))
    assert decoded < 48, rerun.stdout   # the work finished before the kill was reused
    assert comparable(out / "set") == comparable(tmp_path / "ref" / "set")
    a, b = (json.loads((d / "set" / "build.json").read_text()) for d in (out, tmp_path / "ref"))
    assert {**a, "out": None, "workers": None} == {**b, "out": None, "workers": None}


def test_failure_after_some_pieces_then_rerun_reuses_them(tmp_path, phantom_kermany, monkeypatch):
    raw = copies_tree(phantom_kermany, tmp_path / "raw", copies=1)
    options = ManifestOptions(source="folder")
    config = BuildConfig(source="folder", raw=raw, out=tmp_path / "a", name="set", size=64, shard_size=4,
                         workers=1, quiet=True)
    reference = build_shards(replace(config, out=tmp_path / "ref"), options)

    calls = {"n": 0}
    real_run_piece = build_module.run_piece

    def failing(task):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected failure")
        return real_run_piece(task)

    monkeypatch.setattr(build_module, "run_piece", failing)
    with pytest.raises(RuntimeError, match="injected"):
        build_shards(config, options)
    monkeypatch.undo()
    assert not (tmp_path / "a" / "set" / "dataset.json").exists()
    assert list((tmp_path / "a" / "set" / ".progress").glob("*-*.json"))   # finished shards recorded

    result = build_shards(config, options)
    assert result.shards_reused >= 1 and result.images < 12
    assert comparable(result.path) == comparable(reference.path)


def test_a_corrupted_finished_shard_is_rebuilt_on_resume(tmp_path, phantom_kermany, monkeypatch):
    raw = copies_tree(phantom_kermany, tmp_path / "raw", copies=1)
    options = ManifestOptions(source="folder")
    config = BuildConfig(source="folder", raw=raw, out=tmp_path / "a", name="set", size=64, shard_size=3,
                         format="wds", workers=1, quiet=True)
    reference = build_shards(replace(config, out=tmp_path / "ref"), options)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "_finish", stop)   # interrupted after every shard, before the card
    with pytest.raises(KeyboardInterrupt):
        build_shards(config, options)
    monkeypatch.undo()
    tar = tmp_path / "a" / "set" / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = build_shards(config, options)
    assert result.shards_built == 1 and result.shards_reused == len(reference.card["files"]) - 1
    assert comparable(result.path) == comparable(reference.path)


# --- resume trusts nothing stale: sources changed after an interrupted build ---------------------------


def copied_tree(kermany: Path, raw: Path) -> list[Path]:
    """Writable copies of the 12 JPEGs of a Kermany-layout folder (a folder set); returns them sorted."""
    for cls in ("normal", "abnormal"):
        (raw / cls).mkdir(parents=True)
        for src in sorted((kermany / cls).glob("*.jpeg")):
            shutil.copyfile(src, raw / cls / src.name)
    return sorted(raw.rglob("*.jpeg"))


def requantize(path: Path) -> None:
    """Other pixels, same size: raise the JPEG's first quantisation value (the DC step of table 0)."""
    data = bytearray(path.read_bytes())
    at = data.index(b"\xff\xdb") + 5
    data[at] = data[at] + 7 if data[at] < 200 else data[at] - 7
    path.write_bytes(bytes(data))


def keep_stamp(path: Path, change) -> None:
    """Run change(path), then put the old mtime back (`touch -d` to the old time)."""
    st = path.stat()
    change(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def interrupt(config: BuildConfig, options: ManifestOptions, mode: str, monkeypatch) -> None:
    """A build stopped mid-way: after 3 pieces (`pieces`), or with every shard done but no card (`finish`)."""
    if mode == "pieces":
        calls = {"n": 0}
        real_run_piece = build_module.run_piece

        def failing(task):
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt
            return real_run_piece(task)

        monkeypatch.setattr(build_module, "run_piece", failing)
    else:
        def stop(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(build_module, "_finish", stop)
    with pytest.raises(KeyboardInterrupt):
        build_shards(config, options)
    monkeypatch.undo()
    assert not (config.out / config.name / "dataset.json").exists()


@pytest.mark.parametrize("mode", ["pieces", "finish"])
def test_resume_after_sources_changed_equals_a_clean_build_of_the_new_sources(tmp_path, phantom_kermany, monkeypatch,
                                                                              mode):
    files = copied_tree(phantom_kermany, tmp_path / "raw")
    options = ManifestOptions(source="folder")
    config = BuildConfig(source="folder", raw=tmp_path / "raw", out=tmp_path / "a", name="set", size=64,
                         shard_size=4, workers=1, quiet=True)
    old = build_shards(replace(config, out=tmp_path / "old"), options)
    interrupt(config, options, mode, monkeypatch)

    # every source changes: half keep their size (new pixels, newer mtime), half keep their mtime (the
    # contents of another image, so another size)
    for path in files[0::2]:
        requantize(path)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    swapped = files[1::2]
    blobs = [p.read_bytes() for p in swapped]
    for path, blob in zip(swapped, blobs[1:] + blobs[:1]):
        assert len(blob) != path.stat().st_size
        keep_stamp(path, lambda p, b=blob: p.write_bytes(b))

    resumed = build_shards(config, options)
    clean = build_shards(replace(config, out=tmp_path / "clean"), options)
    assert comparable(clean.path) != comparable(old.path)   # the change shows in the shards
    assert comparable(resumed.path) == comparable(clean.path)
    assert resumed.images == len(files) and resumed.shards_reused == 0


def test_a_change_keeping_size_and_mtime_is_caught_by_verify_sources(tmp_path, phantom_kermany, monkeypatch):
    files = copied_tree(phantom_kermany, tmp_path / "raw")
    options = ManifestOptions(source="folder")
    config = BuildConfig(source="folder", raw=tmp_path / "raw", out=tmp_path / "a", name="set", size=64,
                         shard_size=4, workers=1, quiet=True, verify_sources=True)
    old = build_shards(replace(config, out=tmp_path / "old"), options)
    interrupt(config, options, "finish", monkeypatch)
    interrupt(replace(config, out=tmp_path / "b"), options, "finish", monkeypatch)
    changed = files[3]
    keep_stamp(changed, requantize)

    blind = build_shards(replace(config, out=tmp_path / "b", verify_sources=False), options)
    assert comparable(blind.path) == comparable(old.path)   # size and mtime alone cannot see this change

    resumed = build_shards(config, options)
    clean = build_shards(replace(config, out=tmp_path / "clean"), options)
    assert comparable(clean.path) != comparable(old.path)
    assert comparable(resumed.path) == comparable(clean.path)
    assert resumed.shards_built == 1 and resumed.shards_reused == len(list(clean.path.glob("*.tar"))) - 1
    assert resumed.images <= 4
