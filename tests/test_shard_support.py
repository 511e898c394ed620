"""Helpers for the shard build tests (an independent pixel reference, stock readers, tiny raw trees),
plus the tests of the byte-level writers they rely on."""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image

from cxrshards.pixels import preprocess
from cxrshards.writers import sample_members, tar_end, tar_member, write_h5

REPO = Path(__file__).resolve().parents[1]
NIH_ROWS = {  # hand-copied from the real table (tests/data/nih/Data_Entry_2017_v2020.csv.gz holds them)
    "00000001_000.png": "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
    "00000002_000.png": "00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171",
    "00000013_003.png": "00000013_003.png,Pleural_Thickening,28,13,60,M,AP,2996,2544,0.139,0.139",
    "00027426_000.png": "00027426_000.png,No Finding,0,27426,53,M,PA,2992,2991,0.143,0.143",
}
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


# --- an independent pixel reference: PIL only ----------------------------------------------------------


def reference(path: Path, size: int, fit: str) -> np.ndarray:
    """PIL open, convert('L') (16-bit: own min..max scaling first), PIL BOX resize, numpy pad/crop."""
    im = Image.open(path)
    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.int64)
        lo, hi = int(a.min()), int(a.max())
        im = Image.fromarray(np.floor((a - lo) * 255.0 / max(1, hi - lo) + 0.5).astype(np.uint8))
    else:
        im = im.convert("L")
    w, h = im.size
    if fit == "squash":
        return np.asarray(im.resize((size, size), Image.BOX))
    if fit == "crop":
        s = min(w, h)
        x, y = (w - s) // 2, (h - s) // 2
        return np.asarray(im.crop((x, y, x + s, y + s)).resize((size, size), Image.BOX))
    nh, nw = (size, max(1, round(w * size / h))) if h >= w else (max(1, round(h * size / w)), size)
    out = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(im.resize((nw, nh), Image.BOX))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


# Tolerance: PIL's BOX filter weights each source pixel whole (by its centre), OpenCV's INTER_AREA by its
# exact fractional coverage, so single pixels on sharp edges or noise differ by tens of levels while the
# images agree closely overall. Measured at 64-224 px over every fit: real images >= 41 dB, mean |diff|
# <= 1.22; phantoms >= 40 dB, <= 1.35; with the JPEG codec (quality 95) on top >= 39 dB, <= 1.8.
MIN_PSNR = {"png": 38.0, "raw": 38.0, "jpeg": 37.0}
MAX_MEAN_ABS = {"png": 1.6, "raw": 1.6, "jpeg": 2.0}


def assert_close_to_reference(img: np.ndarray, path: Path, size: int, fit: str, codec: str, where: str) -> None:
    ref = reference(path, size, fit)
    assert img.shape == ref.shape == (size, size), where
    value = psnr(img, ref)
    mean_abs = float(np.mean(np.abs(img.astype(np.int64) - ref)))
    assert value >= MIN_PSNR[codec] and mean_abs <= MAX_MEAN_ABS[codec], f"{where}: PSNR {value:.1f} dB, mean |diff| {mean_abs:.2f}"


# --- reading a shard set back with stock tools -----------------------------------------------------------


def file_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `folder` (relative names), hidden files included."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def located_manifest(set_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(set_dir / "manifest.parquet")


def stock_wds(set_dir: Path, split: str) -> list[dict]:
    """Samples of a split through stock `webdataset.WebDataset(urls, shardshuffle=False).decode('l8')`."""
    import webdataset as wds

    card = json.loads((set_dir / "dataset.json").read_text())
    urls = [str(set_dir / f["file"]) for f in card["files"] if f["split"] == split and f["file"].endswith(".tar")]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8"))


def stock_h5(set_dir: Path, split: str) -> dict:
    with h5py.File(set_dir / f"{split}.h5", "r") as h5:
        return {"images": h5["images"][:], "labels": h5["labels"][:],
                "keys": [k.decode() for k in h5["keys"][:]], "attrs": dict(h5.attrs),
                "chunks": h5["images"].chunks, "compression": h5["images"].compression}


def check_set(set_dir: Path, raw: Path, *, size: int, fit: str = "pad", codec: str = "png",
              formats: tuple[str, ...] = ("wds", "hdf5"), expect: int | None = None) -> pd.DataFrame:
    """Read every split back with stock webdataset and h5py; labels and keys must equal the manifest's,
    pixels the independent reference (and both formats each other). Returns the located manifest."""
    card = json.loads((set_dir / "dataset.json").read_text())
    table = located_manifest(set_dir)
    labels = card["labels"]
    if expect is not None:
        assert len(table) == expect
    ext = {"png": "png", "jpeg": "jpg", "raw": "npy"}[codec]
    for split in ("train", "valid", "test"):
        rows = table[table["split"] == split]
        assert card["splits"][split]["count"] == len(rows)
        wds_pixels = {}
        if "wds" in formats:
            rows_w = rows.assign(order=rows["shard"].str.slice(-10, -4).astype(int) * 10**6 + rows["shard_index"])
            rows_w = rows_w.sort_values("order")
            samples = stock_wds(set_dir, split)
            assert [s["__key__"] for s in samples] == rows_w["key"].tolist()
            for sample, (_, row) in zip(samples, rows_w.iterrows()):
                meta = sample["json"]
                assert meta["key"] == row["key"] and meta["split"] == split and meta["patient_id"] == row["patient_id"]
                for name in labels:
                    value = row[name]
                    assert (meta["labels"][name] is None) if np.isnan(value) else meta["labels"][name] == float(value)
                img = sample[ext]
                img = np.asarray(img)
                assert img.dtype == np.uint8 and img.shape == (size, size), (row["key"], img.dtype, img.shape)
                wds_pixels[row["key"]] = img
                assert_close_to_reference(img, raw / row["path"], size, fit, codec, f"{row['key']} ({split} tar)")
                # and exactly what `cxr predict` computes for the same file
                np.testing.assert_array_equal(img, preprocess(raw / row["path"], size, fit, codec, card["jpeg_quality"]))
        if "hdf5" in formats and len(rows):
            h5 = stock_h5(set_dir, split)
            assert h5["chunks"] == (1, size, size) and h5["compression"] is None
            assert json.loads(h5["attrs"]["labels"]) == labels and int(h5["attrs"]["size"]) == size
            assert h5["attrs"]["split"] == split
            by_index = rows.sort_values("h5_index")
            assert by_index["h5_index"].tolist() == list(range(len(rows)))
            assert h5["keys"] == by_index["key"].tolist()
            np.testing.assert_array_equal(h5["labels"], by_index[labels].to_numpy(np.float32))
            for i, (_, row) in enumerate(by_index.iterrows()):
                img = h5["images"][i]
                if row["key"] in wds_pixels:
                    np.testing.assert_array_equal(img, wds_pixels[row["key"]])
                else:
                    assert_close_to_reference(img, raw / row["path"], size, fit, codec, f"{row['key']} ({split}.h5)")
                    np.testing.assert_array_equal(img, preprocess(raw / row["path"], size, fit, codec, card["jpeg_quality"]))
        elif "hdf5" not in formats:
            assert not (set_dir / f"{split}.h5").exists()
    return table


# --- tiny raw trees ----------------------------------------------------------------------------------------


def real_nih_tree(real: Path, raw: Path) -> Path:
    """An NIH-layout raw root: the 3 real 1024 px images and one 512 px one (symlinks) + their table rows."""
    images = raw / "images_001" / "images"
    images.mkdir(parents=True)
    sources = sorted((real / "real" / "nih-1024").glob("*.png")) + [real / "real" / "nih-512" / "00027426_000.png"]
    for src in sources:
        (images / src.name).symlink_to(src)
    (raw / "Data_Entry_2017_v2020.csv").write_text(NIH_HEADER + "\n" + "".join(NIH_ROWS[s.name] + "\n" for s in sources))
    return raw


# --- tests of the writers -----------------------------------------------------------------------------------


def test_joined_tar_pieces_equal_one_tarfile_write():
    files = [("a", {"json": b'{"k":1}', "png": b"x" * 700}), ("b_2", {"json": b"{}", "png": b"y" * 512}),
             ("c" * 120, {"npy": b"z" * 3, "json": b"{}"})]   # a name over 100 characters needs a PAX header
    pieces = [sample_members(k, f) for k, f in files]
    joined = b"".join(pieces)
    joined += tar_end(len(joined))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in files:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(members[ext]), 0, 0o444, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(members[ext]))
    assert joined == buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        names = [(m.name, m.mode, m.mtime, m.uid, m.uname) for m in tar.getmembers()]
    assert names[0] == ("a.json", 0o444, 0, 0, "") and names[-1][0] == "c" * 120 + ".npy"
    assert len(tar_member("x", b"")) == 512


def test_h5_writer_is_byte_deterministic(tmp_path):
    size, keys = 8, ["k1", "k2", "k3"]
    pixels = np.arange(3 * size * size, dtype=np.uint8)
    (tmp_path / "p.u8").write_bytes(pixels.tobytes())
    labels = np.array([[1, 0], [np.nan, 1], [0, 0]], np.float32)
    shas = []
    for name in ("a.h5", "b.h5"):
        shas.append(write_h5(tmp_path / name, split="train", size=size, labels=["x", "y"], keys=keys,
                             label_matrix=labels, pixel_files=[(tmp_path / "p.u8", 3)], block=2))
        import time

        time.sleep(1.1)   # HDF5 would store a different modification time if it tracked times
    assert shas[0] == shas[1]
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    h5 = stock_h5(tmp_path, "a")
    np.testing.assert_array_equal(h5["images"].ravel(), pixels)
    assert h5["keys"] == keys and h5["chunks"] == (1, size, size)
