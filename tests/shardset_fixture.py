"""TEST FIXTURE: tiny shard sets written by hand, exactly in the on-disk format of DESIGN.md section 2.

Not the builder (that is `cxrshards.build`): this writes known pixels and labels so reader tests can check
what comes back without depending on the builder. Pixels and labels are pure functions of the key.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

LABELS = ("Atelectasis", "Cardiomegaly", "No Finding")
EXT = {"png": "png", "jpeg": "jpg", "raw": "npy"}


def make_key(split: str, i: int) -> str:
    return f"{split}_{i:05d}"


def source_image(key: str, size: int) -> np.ndarray:
    """The pixels stored for `key` before the codec: smooth blobs plus noise, uint8 size x size."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    low = rng.integers(0, 256, (4, 4)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_LINEAR)
    img += rng.normal(0, 8, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(img: np.ndarray, codec: str) -> bytes:
    if codec == "png":
        return cv2.imencode(".png", img)[1].tobytes()
    if codec == "jpeg":
        return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    buf = io.BytesIO()
    np.save(buf, img, allow_pickle=False)
    return buf.getvalue()


def expected_pixels(key: str, size: int, codec: str) -> np.ndarray:
    """What a reader must return for `key`: the stored pixels after the codec round trip."""
    img = source_image(key, size)
    if codec == "jpeg":
        return cv2.imdecode(np.frombuffer(encode(img, codec), np.uint8), cv2.IMREAD_GRAYSCALE)
    return img


def label_row(key: str, labels=LABELS) -> np.ndarray:
    """Labels of `key`: 1.0, 0.0 or NaN (not usable)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()) + 1)
    vals = rng.choice(np.array([0.0, 1.0, np.nan], dtype=np.float32), size=len(labels), p=[0.5, 0.35, 0.15])
    return vals.astype(np.float32)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o444, 0, 0, "", ""
    return ti


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_shard_set(root: Path, name: str = "fx-16", *, counts: dict[str, int] | None = None, size: int = 16,
                   codec: str = "png", formats: tuple[str, ...] = ("wds", "hdf5"), shard_size: int = 5,
                   labels: tuple[str, ...] = LABELS, seed: int = 0) -> Path:
    """Write ROOT/NAME with `counts` samples per split; returns the shard set directory."""
    counts = {"train": 23, "valid": 7, "test": 5} if counts is None else counts
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    tables, files, split_cards = [], [], {}
    for split, n in counts.items():
        keys = sorted(make_key(split, i) for i in range(n))
        keys = [keys[i] for i in np.random.default_rng([seed, 0x5EED]).permutation(n)]
        rows = []
        for pos, key in enumerate(keys):
            rows.append({"key": key, "source": "nih", "path": f"images/{key}.png",
                         "patient_id": f"p{key[-4:-1]}", "study_id": None, "view": "PA", "split": split,
                         **dict(zip(labels, label_row(key, labels))),
                         "shard": f"{split}-{pos // shard_size:06d}.tar" if "wds" in formats else None,
                         "shard_index": pos % shard_size if "wds" in formats else -1,
                         "h5_index": pos if "hdf5" in formats else -1})
        table = pd.DataFrame(rows, columns=["key", "source", "path", "patient_id", "study_id", "view", "split",
                                            *labels, "shard", "shard_index", "h5_index"])
        for lab in labels:
            table[lab] = table[lab].astype(np.float32)
        table["shard_index"] = table["shard_index"].astype(np.int64)
        table["h5_index"] = table["h5_index"].astype(np.int64)
        tables.append(table)
        if "wds" in formats:
            for s in range(0, n, shard_size):
                path = out / f"{split}-{s // shard_size:06d}.tar"
                with tarfile.open(path, "w") as tar:
                    for key in keys[s:s + shard_size]:
                        lab = dict(zip(labels, (None if np.isnan(v) else float(v) for v in label_row(key, labels))))
                        meta = json.dumps({"key": key, "labels": lab, "split": split,
                                           "patient_id": f"p{key[-4:-1]}"}).encode()
                        members = {f"{key}.{EXT[codec]}": encode(source_image(key, size), codec),
                                   f"{key}.json": meta}
                        for member in sorted(members):
                            tar.addfile(_tarinfo(member, len(members[member])), io.BytesIO(members[member]))
                files.append({"file": path.name, "split": split, "count": len(keys[s:s + shard_size]),
                              "bytes": path.stat().st_size, "sha256": _sha256(path)})
        if "hdf5" in formats:
            path = out / f"{split}.h5"
            with h5py.File(path, "w") as h5:
                images = h5.create_dataset("images", (n, size, size), np.uint8, chunks=(1, size, size))
                for i, key in enumerate(keys):
                    images[i] = expected_pixels(key, size, codec)
                h5.create_dataset("labels", data=np.stack([label_row(k, labels) for k in keys])
                                  if n else np.zeros((0, len(labels)), np.float32))
                h5.create_dataset("keys", data=keys, dtype=h5py.string_dtype("utf-8"))
                h5.attrs["labels"] = json.dumps(list(labels))
                h5.attrs["size"] = size
                h5.attrs["split"] = split
            files.append({"file": path.name, "split": split, "count": n, "bytes": path.stat().st_size,
                          "sha256": _sha256(path)})
        split_cards[split] = {"count": n, "patients": int(table["patient_id"].nunique())}
    manifest = pd.concat(tables, ignore_index=True)
    meta = {"source": "nih", "labels": list(labels), "options": {}, "version": "0.1.0"}
    arrow = pa.Table.from_pandas(manifest, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), b"cxr": json.dumps(meta).encode()})
    pq.write_table(arrow, out / "manifest.parquet")
    card = {"format_version": 1, "name": name, "source": "nih", "size": size, "codec": codec,
            "jpeg_quality": 95, "fit": "pad", "formats": list(formats), "labels": list(labels),
            "splits": split_cards, "pixel_mean": 0.5, "pixel_std": 0.25, "build": {}, "tool_version": "0.1.0",
            "rejects": 0, "manifest_sha256": _sha256(out / "manifest.parquet"), "files": files}
    (out / "dataset.json").write_text(json.dumps(card, indent=2))
    return out
