"""Broken and unusual inputs: each image is converted or listed in rejects.parquet with its reason, nothing
else is lost; the reject limit fails the build after everything is written; verify names bad files."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from cxrshards.build import BuildConfig, RejectLimitError, build_shards
from cxrshards.verify import verify_shards
from manifests.options import ManifestOptions
from tests.raw_trees import gray_png, phantom_film
from tests.test_shard_support import NIH_HEADER, NIH_ROWS, check_set

SIZE = 64


def _row(name: str, patient: int) -> str:
    return f"{name},No Finding,0,{patient},50,F,PA,1,1,0.1,0.1"


def faulty_nih_tree(raw):
    """An NIH-layout tree of phantom PNGs (8-bit gray, under the names and table rows of three real images)
    plus crafted ones: RGB, RGBA, 16-bit (converted) and broken files (rejected)."""
    images = raw / "images"
    images.mkdir(parents=True)
    rows = []
    for name in ("00000001_000.png", "00000002_000.png", "00000013_003.png"):
        (images / name).write_bytes(gray_png(phantom_film(name, 256, 256)))
        rows.append(NIH_ROWS[name])
    rng = np.random.default_rng(7)
    gray = phantom_film("crafted", 260, 300)
    rgb = np.dstack([gray, np.roll(gray, 5, axis=1), 255 - gray])
    rgba = np.dstack([rgb, rng.integers(0, 256, gray.shape, dtype=np.uint8)])   # alpha must be ignored
    sixteen = (gray.astype(np.uint16) * 97 + 1000).astype(np.uint16)         # 1000..25735: scaled by its range
    good = {"00000100_000.png": rgb, "00000101_000.png": rgba, "00000102_000.png": sixteen}
    for name, img in good.items():
        assert cv2.imwrite(str(images / name), img)
    png = cv2.imencode(".png", gray)[1].tobytes()
    broken = {
        "00000103_000.png": ("corrupt", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()),
        "00000104_000.png": ("truncated", png[: len(png) // 2]),
        "00000105_000.png": ("zero bytes", b""),
        "00000106_000.png": ("missing", None),
        "00000107_000.png": ("corrupt", png[:100] + bytes(2000) + png[-100:]),   # header and IEND intact
    }
    for name, (_, data) in broken.items():
        if data is not None:
            (images / name).write_bytes(data)
    names = [*good, *broken]
    rows += [_row(name, 100 + i) for i, name in enumerate(names)]
    (raw / "Data_Entry_2017_v2020.csv").write_text(NIH_HEADER + "\n" + "\n".join(rows) + "\n")
    return raw, {name.removesuffix(".png"): reason for name, (reason, _) in broken.items()}


def test_broken_inputs_are_rejected_with_their_reason_and_nothing_else_is_lost(tmp_path):
    raw, expected = faulty_nih_tree(tmp_path / "raw")
    config = BuildConfig(source="nih", raw=raw, out=tmp_path / "out", size=SIZE, shard_size=3, workers=2,
                         max_reject_fraction=0.5, quiet=True)
    result = build_shards(config, ManifestOptions(source="nih", ratios=(0.6, 0.2, 0.2)))
    rejects = pd.read_parquet(result.path / "rejects.parquet")
    assert dict(zip(rejects["key"], rejects["reason"])) == expected
    assert set(rejects.columns) == {"key", "path", "reason"}
    table = check_set(result.path, raw, size=SIZE, expect=11 - len(expected))
    assert set(table["key"]) | set(expected) == {f"000000{n}" for n in ("01_000", "02_000", "13_003")} | {
        f"00000{100 + i}_000" for i in range(8)}
    assert result.card["rejects"] == len(expected) and result.card["pixel_rejects"] == len(expected)
    assert result.rejects == {"corrupt": 2, "missing": 1, "truncated": 1, "zero bytes": 1}
    assert result.reject_fraction == pytest.approx(5 / 11)
    # a rejected sample leaves a hole in its own shard: every other sample keeps the shard it was planned for
    clean = BuildConfig(source="nih", raw=raw, out=tmp_path / "ref", size=SIZE, shard_size=3, workers=1,
                        max_reject_fraction=1.0, quiet=True)
    for key in expected:   # make the broken files readable: same plan, nothing rejected
        (raw / "images" / f"{key}.png").unlink(missing_ok=True)
        cv2.imwrite(str(raw / "images" / f"{key}.png"), np.full((40, 40), 9, np.uint8))
    full = pd.read_parquet(build_shards(clean, ManifestOptions(source="nih", ratios=(0.6, 0.2, 0.2))).path
                           / "manifest.parquet").set_index("key")
    assert (full.loc[table["key"], "shard"].to_numpy() == table["shard"].to_numpy()).all()


def test_reject_limit_fails_after_writing_everything(tmp_path):
    raw, expected = faulty_nih_tree(tmp_path / "raw")
    config = BuildConfig(source="nih", raw=raw, out=tmp_path / "out", size=SIZE, shard_size=4, workers=1, quiet=True)
    with pytest.raises(RejectLimitError, match=r"5 of 11 images rejected \(45\.45% > --max-reject-fraction 1\.00%") as info:
        build_shards(config, ManifestOptions(source="nih", ratios=(0.6, 0.2, 0.2)))
    path = info.value.result.path
    assert (path / "dataset.json").is_file() and (path / "rejects.parquet").is_file()
    assert verify_shards(path).ok
    check_set(path, raw, size=SIZE, expect=6)


def test_verify_names_a_flipped_byte_and_a_missing_file(tmp_path, phantom_kermany):
    raw = phantom_kermany
    result = build_shards(BuildConfig(source="folder", raw=raw, out=tmp_path, size=48, shard_size=4, workers=1,
                                      quiet=True), ManifestOptions(source="folder"))
    assert verify_shards(result.path).ok
    tar = result.path / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0x01   # inside the first member's data
    tar.write_bytes(bytes(data))
    h5 = result.path / "test.h5"
    data = bytearray(h5.read_bytes())
    data[len(data) // 2] ^= 0x80
    h5.write_bytes(bytes(data))
    (result.path / "valid-000000.tar").unlink()
    report = verify_shards(result.path)
    bad = sorted({p.split(":")[0] for p in report.problems})
    assert bad == ["test.h5", "train-000001.tar", "valid-000000.tar"], report.problems
    assert any("valid-000000.tar: missing" == p for p in report.problems)
    # a card that lies about a count is named too
    card = json.loads((result.path / "dataset.json").read_text())
    card["files"][0]["count"] += 1
    (result.path / "dataset.json").write_text(json.dumps(card))
    assert any(p.startswith(card["files"][0]["file"] + ": holds") for p in verify_shards(result.path).problems)
    # and one that gives a wrong size (a remote reader would ask for the wrong byte range)
    card["files"][0]["count"] -= 1
    card["files"][0]["bytes"] += 512
    (result.path / "dataset.json").write_text(json.dumps(card))
    name = card["files"][0]["file"]
    assert [p for p in verify_shards(result.path).problems if p.startswith(name)] == \
        [f"{name}: {card['files'][0]['bytes'] - 512} bytes, dataset.json says {card['files'][0]['bytes']}"]
