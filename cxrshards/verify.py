"""`verify_shards`: recompute every checksum and sample count of a shard set against its card and manifest."""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import pandas as pd
import pyarrow.parquet as pq

from cxrshards.card import CARD_NAME, MANIFEST_NAME, REJECTS_NAME
from cxrshards.writers import sha256_file
from manifests.errors import CxrError
from manifests.table import SPLITS

_SHARD_SUFFIXES = (".tar", ".h5")


@dataclass
class VerifyReport:
    """`problems` holds one line per bad file ('FILE: what is wrong'); empty means the set is intact."""

    path: Path
    files_checked: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(path: str | os.PathLike) -> VerifyReport:
    """Check dataset.json, manifest.parquet, rejects.parquet and every shard file of the set at `path`.

    Raises CxrError only when `path` is not a shard set at all; everything else is a reported problem.
    """
    root = Path(path)
    report = VerifyReport(path=root)
    card_path = root / CARD_NAME
    if not root.is_dir():
        raise CxrError(f"{root}: no such shard set folder")
    if not card_path.is_file():
        raise CxrError(f"{root} has no {CARD_NAME}: not a finished shard set (re-run its `cxr shard build`)")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as exc:
        report.problems.append(f"{CARD_NAME}: not valid JSON ({exc})")
        return report

    manifest = _check_manifest(root, card, report)
    _check_rejects(root, card, report)
    listed = set()
    for entry in card.get("files", []):
        name, split = entry.get("file", "?"), entry.get("split")
        listed.add(name)
        file = root / name
        report.files_checked += 1
        if not file.is_file():
            report.problems.append(f"{name}: missing")
            continue
        size = file.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:      # cards before the field have no "bytes"
            report.problems.append(f"{name}: {size} bytes, dataset.json says {entry['bytes']!r}")
        sha = sha256_file(file)
        if sha != entry.get("sha256"):
            report.problems.append(f"{name}: sha256 {sha[:12]}... does not match dataset.json ({str(entry.get('sha256'))[:12]}...)")
        rows = None
        if manifest is not None:
            column = "shard" if name.endswith(".tar") else "split"
            value = name if name.endswith(".tar") else split
            rows = manifest[manifest[column] == value]
        try:
            keys = _tar_keys(file) if name.endswith(".tar") else _h5_keys(file)
        except Exception as exc:  # noqa: BLE001 - any read failure is this file's problem
            report.problems.append(f"{name}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if len(keys) != entry.get("count"):
            report.problems.append(f"{name}: holds {len(keys)} samples, dataset.json says {entry.get('count')}")
        if rows is not None:
            order = "shard_index" if name.endswith(".tar") else "h5_index"
            expected = rows.sort_values(order)["key"].tolist()
            if keys != expected:
                report.problems.append(f"{name}: its {len(keys)} keys differ from manifest.parquet's "
                                       f"{len(expected)} for it (first: {_first_difference(keys, expected)})")
    for file in sorted(root.iterdir()):
        if file.suffix in _SHARD_SUFFIXES and file.name not in listed:
            report.problems.append(f"{file.name}: shard file not listed in dataset.json")
    return report


def _check_manifest(root: Path, card: dict, report: VerifyReport) -> pd.DataFrame | None:
    file = root / MANIFEST_NAME
    report.files_checked += 1
    if not file.is_file():
        report.problems.append(f"{MANIFEST_NAME}: missing")
        return None
    sha = sha256_file(file)
    if sha != card.get("manifest_sha256"):
        report.problems.append(f"{MANIFEST_NAME}: sha256 does not match dataset.json's manifest_sha256")
    try:
        table = pq.read_table(file, columns=["key", "split", "shard", "shard_index", "h5_index"]).to_pandas()
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"{MANIFEST_NAME}: unreadable ({type(exc).__name__}: {exc})")
        return None
    for split in SPLITS:
        n = int((table["split"] == split).sum())
        report.samples[split] = n
        expected = card.get("splits", {}).get(split, {}).get("count")
        if expected is not None and n != expected:
            report.problems.append(f"{MANIFEST_NAME}: {n} {split} rows, dataset.json says {expected}")
        for suffix in (".tar", ".h5"):
            total = sum(f.get("count", 0) for f in card.get("files", [])
                        if f.get("split") == split and str(f.get("file", "")).endswith(suffix))
            has = any(f.get("split") == split and str(f.get("file", "")).endswith(suffix) for f in card.get("files", []))
            if has and total != n:
                report.problems.append(f"dataset.json: its {split} {suffix} files hold {total} samples, "
                                       f"manifest.parquet has {n} {split} rows")
    return table


def _check_rejects(root: Path, card: dict, report: VerifyReport) -> None:
    file = root / REJECTS_NAME
    report.files_checked += 1
    if not file.is_file():
        report.problems.append(f"{REJECTS_NAME}: missing")
        return
    try:
        n = pq.read_metadata(file).num_rows
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"{REJECTS_NAME}: unreadable ({type(exc).__name__}: {exc})")
        return
    if "rejects" in card and n != card["rejects"]:
        report.problems.append(f"{REJECTS_NAME}: {n} rows, dataset.json says {card['rejects']}")


def _tar_keys(path: Path) -> list[str]:
    """Sample keys of a shard tar in order; each sample must be exactly one image member plus KEY.json."""
    keys: list[str] = []
    members: dict[str, list[str]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"member {member.name!r} is not a regular file")
            key, _, ext = member.name.partition(".")
            if not keys or key != keys[-1]:
                if key in members:
                    raise ValueError(f"sample {key!r} is split across the tar")
                keys.append(key)
                members[key] = []
            members[key].append(ext)
    for key in keys:
        exts = sorted(members[key])
        if len(exts) != 2 or "json" not in exts:
            raise ValueError(f"sample {key!r} has members {exts}, expected one image and json")
    return keys


def _h5_keys(path: Path) -> list[str]:
    with h5py.File(path, "r") as h5:
        n = {name: len(h5[name]) for name in ("images", "labels", "keys")}
        if len(set(n.values())) != 1:
            raise ValueError(f"datasets differ in length: {n}")
        return [k.decode() if isinstance(k, bytes) else str(k) for k in h5["keys"][:]]


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i}: {x!r} vs {y!r}"
    return f"lengths {len(a)} vs {len(b)}"
