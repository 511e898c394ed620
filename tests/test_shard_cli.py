"""`cxr shard build | verify | info` as a user runs them."""
from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from cli.app import _register, app
from tests.test_shard_faults import faulty_nih_tree
from tests.test_shard_support import file_hashes

_register()
runner = CliRunner()


def cxr(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_build_info_verify_round_trip(tmp_path, phantom_kermany, monkeypatch):
    raw = phantom_kermany
    monkeypatch.setenv("CXR_SHARDS", str(tmp_path / "root"))
    result = cxr("shard", "build", "--source", "folder", "--raw", raw, "--size", 48, "--shard-size", 5,
                 "--workers", 1, "--patient-pattern", r"(person\d+)_", "--label", "Pneumonia", "--quiet")
    assert result.exit_code == 0, result.output
    path = tmp_path / "root" / "folder-48"   # ROOT from $CXR_SHARDS, NAME = SOURCE-SIZE
    assert "wrote" in result.output and (path / "dataset.json").is_file()
    card = json.loads((path / "dataset.json").read_text())
    assert card["build"]["manifest options"]["patient_pattern"] == r"(person\d+)_"
    assert card["build"]["shard options"]["shard_size"] == 5

    info = cxr("shard", "info", "folder-48")
    assert info.exit_code == 0, info.output
    for text in ("Pneumonia", "train-000000.tar", "train.h5", "splits", "build options", "folder"):
        assert text in info.output

    ok = cxr("shard", "verify", path)
    assert ok.exit_code == 0 and "ok" in ok.output
    tar = path / "test-000000.tar"
    data = bytearray(tar.read_bytes())
    data[600] ^= 0x04   # inside the first member's data
    tar.write_bytes(bytes(data))
    bad = cxr("shard", "verify", path)
    assert bad.exit_code == 1
    assert "test-000000.tar: sha256" in bad.output


def test_reject_limit_exits_1_after_writing_everything(tmp_path):
    raw, expected = faulty_nih_tree(tmp_path / "raw")
    result = cxr("shard", "build", "--source", "nih", "--raw", raw, "--out", tmp_path / "out", "--size", 32,
                 "--workers", 1, "--ratios", "6:2:2", "--quiet")
    assert result.exit_code == 1
    assert "5 of 11 images rejected" in result.output and "--max-reject-fraction" in result.output
    path = tmp_path / "out" / "nih-32"
    assert (path / "dataset.json").is_file() and (path / "train.h5").is_file()
    assert set(pd.read_parquet(path / "rejects.parquet")["key"]) == set(expected)
    again = cxr("shard", "build", "--source", "nih", "--raw", raw, "--out", tmp_path / "out", "--size", 32,
                "--workers", 1, "--ratios", "6:2:2", "--quiet", "--max-reject-fraction", "0.5")
    assert again.exit_code == 0, again.output


def test_manifest_file_gives_the_same_shards(tmp_path, phantom_kermany):
    raw = phantom_kermany
    common = ["--size", 40, "--shard-size", 4, "--workers", 1, "--quiet", "--seed", 3]
    made = cxr("manifest", "build", "--source", "folder", "--raw", raw, "--seed", 3, "--out", tmp_path / "m.parquet")
    assert made.exit_code == 0, made.output
    a = cxr("shard", "build", "--manifest", tmp_path / "m.parquet", "--out", tmp_path, "--name", "a", *common)
    b = cxr("shard", "build", "--source", "folder", "--raw", raw, "--out", tmp_path, "--name", "b", *common)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    shards = lambda name: {k: v for k, v in file_hashes(tmp_path / name).items() if k.endswith((".tar", ".h5"))}
    assert shards("a") == shards("b") and len(shards("a")) >= 4

    refused = cxr("shard", "build", "--manifest", tmp_path / "m.parquet", "--views", "PA", "--out", tmp_path)
    assert refused.exit_code == 1 and "--views cannot be used with --manifest" in refused.output
    missing = cxr("shard", "build", "--source", "folder", "--out", tmp_path)
    assert missing.exit_code == 1 and "--raw" in missing.output
    changed = cxr("shard", "build", "--source", "folder", "--raw", raw, "--out", tmp_path, "--name", "b",
                  *common[:-2], "--seed", 4, "--fit", "crop")
    assert changed.exit_code == 1 and "--fit: was 'pad', now 'crop'" in changed.output
