"""The manifest table: its columns, its checks, and its Parquet file.

One row per selected image, sorted by `key`:
`key, source, path, patient_id, study_id, view, split` (pandas `str` dtype; `study_id` and `view`
are missing (NaN, `pd.isna`) where the source has none), one float32 column per label
(1.0 positive, 0.0 negative, NaN not usable), then `sex` ("F", "M" or missing, pandas `str`) and `age`
(float64 years, NaN missing; `manifests.demographics` has the rules). A manifest written before the two
demographic columns existed reads back with both all missing, so every reader sees them. The Parquet key-value metadata `b"cxr"` holds the JSON
of `Manifest.meta` (source, labels, options, tool version, raw root), so the file describes itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.atomic import atomic_path
from manifests.demographics import DEMOGRAPHIC_COLUMNS, MAX_AGE, SEXES
from manifests.errors import ManifestError

BASE_COLUMNS: tuple[str, ...] = ("key", "source", "path", "patient_id", "study_id", "view", "split")
RESERVED_COLUMNS: tuple[str, ...] = (*BASE_COLUMNS, *DEMOGRAPHIC_COLUMNS)   # no label may take these names
SPLITS: tuple[str, ...] = ("train", "valid", "test")
REJECT_COLUMNS: tuple[str, ...] = ("key", "path", "reason")
META_KEY = b"cxr"
KEY_PATTERN = r"[A-Za-z0-9_-]+"


@dataclass
class Manifest:
    table: pd.DataFrame        # one row per image: BASE_COLUMNS, one float32 column per label, sex, age
    labels: list[str]          # ordered label names (= the label columns, in order)
    rejects: pd.DataFrame = field(default_factory=lambda: empty_rejects())  # key, path, reason
    meta: dict = field(default_factory=dict)  # source, labels, options, version, raw root


def conform(table: pd.DataFrame, labels: list[str], sort: bool = True) -> pd.DataFrame:
    """BASE_COLUMNS + labels + sex, age with the contract's dtypes, then any other columns as they are (e.g.
    a shard set's `shard`, `shard_index`); sorted by key unless `sort=False`; fresh index.

    A table without `sex`/`age` (a manifest or shard set written before them) gets both, all missing."""
    missing = [c for c in (*BASE_COLUMNS, *labels) if c not in table.columns]
    if missing:
        raise ManifestError(f"manifest table lacks column(s): {', '.join(missing)}")
    out = pd.DataFrame({c: table[c].astype("str") for c in BASE_COLUMNS})
    for column in ("study_id", "view"):   # astype("str") turns None into NaN: keep missing missing
        out[column] = out[column].where(table[column].notna().to_numpy())
    for label in labels:
        out[label] = pd.to_numeric(table[label], errors="raise").astype(np.float32)
    sex = table["sex"] if "sex" in table.columns else pd.Series(np.nan, index=table.index)
    out["sex"] = pd.Series(sex.to_numpy(dtype=object), index=table.index, dtype="str").where(sex.notna().to_numpy())
    age = table["age"] if "age" in table.columns else pd.Series(np.nan, index=table.index)
    out["age"] = pd.to_numeric(age, errors="raise").astype(np.float64).to_numpy()
    for column in table.columns:
        if column not in out.columns:
            out[column] = table[column].to_numpy()
    return out.sort_values("key", kind="stable", ignore_index=True) if sort else out.reset_index(drop=True)


def check_table(table: pd.DataFrame, labels: list[str], origin: str = "manifest") -> None:
    """Raise ManifestError unless keys are unique and WebDataset-safe, splits valid, columns present."""
    missing = [c for c in (*BASE_COLUMNS, *labels) if c not in table.columns]
    if missing:
        raise ManifestError(f"{origin}: missing column(s): {', '.join(missing)}")
    for column in ("key", "source", "path", "patient_id", "split"):
        blank = table[column].isna() | (table[column].astype("str") == "")
        if blank.any():
            key = table["key"][blank].iloc[0]
            raise ManifestError(f"{origin}: empty {column} for key {key!r} ({int(blank.sum())} rows)")
    bad_key = ~table["key"].str.fullmatch(KEY_PATTERN)
    if bad_key.any():
        raise ManifestError(f"{origin}: key {table['key'][bad_key].iloc[0]!r} has characters outside [A-Za-z0-9_-]")
    duplicated = table["key"].duplicated()
    if duplicated.any():
        raise ManifestError(f"{origin}: duplicate key {table['key'][duplicated].iloc[0]!r}")
    bad_split = ~table["split"].isin(SPLITS)
    if bad_split.any():
        row = table[bad_split].iloc[0]
        raise ManifestError(f"{origin}: split {row['split']!r} of key {row['key']!r} is not one of {', '.join(SPLITS)}")
    if "sex" in table.columns:
        bad_sex = (table["sex"].notna() & ~table["sex"].isin(SEXES)).to_numpy()
        if bad_sex.any():
            row = table[bad_sex].iloc[0]
            raise ManifestError(f"{origin}: sex {row['sex']!r} of key {row['key']!r} is not F, M or missing")
    if "age" in table.columns:
        age = table["age"].to_numpy(dtype=np.float64)
        bad_age = ~np.isnan(age) & ~((age >= 0) & (age <= MAX_AGE))
        if bad_age.any():
            row = table[bad_age].iloc[0]
            raise ManifestError(f"{origin}: age {row['age']!r} of key {row['key']!r} is not 0-{MAX_AGE:g} years or missing")


def audit_leakage(table: pd.DataFrame) -> None:
    """Raise ManifestError naming a patient found in two splits (and how many such patients exist)."""
    pairs = table[["patient_id", "split"]].drop_duplicates()
    shared = pairs["patient_id"].duplicated(keep=False)
    if not shared.any():
        return
    leaked = pairs[shared].sort_values(["patient_id", "split"], kind="stable")
    patient = leaked["patient_id"].iloc[0]
    splits = sorted(leaked.loc[leaked["patient_id"] == patient, "split"], key=_split_order)
    n = leaked["patient_id"].nunique()
    raise ManifestError(
        f"leakage: patient {patient!r} is in both {splits[0]} and {splits[1]}"
        + (f" ({n} patients span splits)" if n > 1 else "")
    )


def write_manifest(manifest: Manifest, path: str | os.PathLike, sort: bool = True) -> Path:
    """Check, audit and write the manifest atomically as Parquet with `b"cxr"` metadata. Returns the path.

    Rows are written sorted by key; `sort=False` keeps the table's order (a shard set's manifest is
    ordered by split and shard). Columns beyond BASE_COLUMNS + labels + sex, age are kept, after them.
    """
    table = conform(manifest.table, manifest.labels, sort=sort)
    check_table(table, manifest.labels)
    audit_leakage(table)
    meta = dict(manifest.meta, labels=list(manifest.labels))
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    metadata = {**(arrow.schema.metadata or {}), META_KEY: json.dumps(meta, sort_keys=True).encode()}
    return _write_parquet(arrow.replace_schema_metadata(metadata), Path(path))


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a manifest written by `write_manifest`, rows in file order, extra columns kept.

    Labels and meta come from its `b"cxr"` metadata; `rejects` is empty (they live in their own file).
    """
    source = Path(path)
    if not source.is_file():
        raise ManifestError(f"{source}: no such manifest file")
    try:
        arrow = pq.read_table(source)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{source}: not a readable Parquet file ({exc})") from None
    raw_meta = (arrow.schema.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise ManifestError(f"{source}: not a cxr manifest (no b'cxr' metadata)")
    meta = json.loads(raw_meta)
    labels = list(meta.get("labels", []))
    table = conform(arrow.to_pandas(), labels, sort=False)
    check_table(table, labels, origin=str(source))
    return Manifest(table=table, labels=labels, rejects=empty_rejects(), meta=meta)


def path_keys(paths: pd.Series) -> pd.Series:
    """Keys from relative paths: the path without extension; `/` and anything outside [A-Za-z0-9_-] become `_`."""
    stem = paths.str.replace(r"\.[^./]*$", "", regex=True)
    return stem.str.replace(r"[^A-Za-z0-9_-]", "_", regex=True)


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="str") for c in REJECT_COLUMNS})


def make_rejects(key, path, reason) -> pd.DataFrame:
    """A rejects frame from array-likes (or a scalar `reason` for every row)."""
    frame = pd.DataFrame({"key": pd.Series(key, dtype="str"), "path": pd.Series(path, dtype="str")})
    frame["reason"] = pd.Series(reason, index=frame.index, dtype="str") if not isinstance(reason, str) else reason
    frame["reason"] = frame["reason"].astype("str")
    return frame.reset_index(drop=True)


def concat_rejects(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate rejects frames in the order given (each in table order: rebuilds are identical)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return empty_rejects()
    return pd.concat(parts, ignore_index=True)[list(REJECT_COLUMNS)]


def reject_counts(rejects: pd.DataFrame) -> dict[str, int]:
    """{reason: count}, most frequent first (ties by reason)."""
    counts = rejects["reason"].value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {str(reason): int(n) for reason, n in ordered}


def write_rejects(rejects: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the rejects (key, path, reason) atomically as Parquet."""
    arrow = pa.Table.from_pandas(rejects[list(REJECT_COLUMNS)].astype("str"), preserve_index=False)
    return _write_parquet(arrow, Path(path))


def _write_parquet(arrow: pa.Table, final: Path) -> Path:
    if final.is_dir():
        raise ManifestError(f"{final}: is a folder, expected a file name")
    try:
        with atomic_path(final) as tmp:
            pq.write_table(arrow, tmp)
    except OSError as exc:
        raise ManifestError(f"{final}: cannot write ({exc.strerror or exc})") from None
    return final


def split_summary(table: pd.DataFrame, labels: list[str]) -> dict[str, dict]:
    """Per split: count, patients, positives and prevalence per label (the dataset card's `splits`).

    prevalence = positives / rows where the label is usable (not NaN); 0.0 when none is.
    """
    summary: dict[str, dict] = {}
    for split in SPLITS:
        rows = table[table["split"] == split]
        values = rows[labels].to_numpy(dtype=np.float32) if labels else np.zeros((len(rows), 0), np.float32)
        positives = (values == 1.0).sum(axis=0)
        usable = (~np.isnan(values)).sum(axis=0)
        summary[split] = {
            "count": int(len(rows)),
            "patients": int(rows["patient_id"].nunique()),
            "positives": {label: int(p) for label, p in zip(labels, positives)},
            "prevalence": {label: (float(p) / float(u) if u else 0.0)
                           for label, p, u in zip(labels, positives, usable)},
        }
    return summary


def demographics_summary(table: pd.DataFrame) -> dict[str, dict]:
    """Per split: sex counts (F, M, missing) and age summary (known, missing, min, median, max, mean).

    A table without the columns (a manifest written before them) counts every image as missing.
    """
    summary = {}
    for split in SPLITS:
        rows = table[table["split"] == split]
        sex = rows["sex"] if "sex" in rows else pd.Series(np.nan, index=rows.index, dtype="str")
        age = (rows["age"] if "age" in rows else pd.Series(np.nan, index=rows.index)).to_numpy(dtype=np.float64)
        known = age[~np.isnan(age)]
        summary[split] = {
            "sex": {"F": int((sex == "F").sum()), "M": int((sex == "M").sum()), "missing": int(sex.isna().sum())},
            "age": {"known": int(known.size), "missing": int(age.size - known.size),
                    "min": float(known.min()) if known.size else None,
                    "median": float(np.median(known)) if known.size else None,
                    "max": float(known.max()) if known.size else None,
                    "mean": float(known.mean()) if known.size else None},
        }
    return summary


def _split_order(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)
