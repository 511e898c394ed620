"""The manifest file (Parquet + b"cxr" metadata), the leakage audit, and per-label cap sampling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from manifests import __version__
from manifests.build import Manifest, ManifestOptions, build_manifest
from manifests.errors import ManifestError
from manifests.sampling import cap_sample
from manifests.table import BASE_COLUMNS, audit_leakage, read_manifest, write_manifest, write_rejects


def folder_raw(raw: Path) -> Path:
    for cls, n in (("normal", 12), ("abnormal", 8)):
        for i in range(n):
            path = raw / cls / f"person{i}_{cls}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    (raw / "normal" / "thumbs.db").write_bytes(b"")
    return raw


def test_write_then_read_restores_table_labels_and_meta(tmp_path):
    manifest = build_manifest(folder_raw(tmp_path / "raw"), ManifestOptions(source="cardiomegaly", seed=4))
    path = write_manifest(manifest, tmp_path / "out" / "m.parquet")
    back = read_manifest(path)
    pd.testing.assert_frame_equal(back.table, manifest.table)
    assert back.labels == ["Cardiomegaly"]
    assert back.meta["options"] == manifest.meta["options"]
    assert back.meta["version"] == __version__ and back.meta["source"] == "cardiomegaly"
    assert ManifestOptions.from_dict(back.meta["options"]) == ManifestOptions(source="cardiomegaly", seed=4)
    stored = json.loads(pq.read_schema(path).metadata[b"cxr"])
    assert stored["labels"] == ["Cardiomegaly"]
    assert list(back.table.columns) == [*BASE_COLUMNS, "Cardiomegaly", "sex", "age"]
    assert back.table["Cardiomegaly"].dtype == np.float32
    assert not list((tmp_path / "out").glob(".*tmp"))        # atomic: no temporary left behind


def test_same_options_give_byte_identical_files(tmp_path):
    raw = folder_raw(tmp_path / "raw")
    options = ManifestOptions(source="folder", seed=9, patient_pattern=r"person(\d+)_")
    write_manifest(build_manifest(raw, options), tmp_path / "a.parquet")
    write_manifest(build_manifest(raw, options), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_rejects_file_lists_what_was_left_out(tmp_path):
    manifest = build_manifest(folder_raw(tmp_path / "raw"), ManifestOptions(source="folder"))
    rejects = pd.read_parquet(write_rejects(manifest.rejects, tmp_path / "rejects.parquet"))
    assert rejects.to_dict("records") == [{"key": "normal_thumbs", "path": "normal/thumbs.db",
                                           "reason": "not an image file (.db)"}]


def test_leakage_audit_names_the_patient_and_both_splits(tmp_path):
    table = pd.DataFrame({"patient_id": ["p1", "p2", "p2", "p3"], "split": ["train", "train", "test", "valid"]})
    with pytest.raises(ManifestError, match="patient 'p2' is in both train and test"):
        audit_leakage(table)
    audit_leakage(table.iloc[[0, 1, 3]])


def test_write_refuses_a_leaking_or_malformed_table(tmp_path):
    manifest = build_manifest(folder_raw(tmp_path / "raw"), ManifestOptions(source="folder"))
    leaking = manifest.table.copy()
    leaking.loc[0, "patient_id"] = leaking.loc[1, "patient_id"]
    leaking.loc[0, "split"], leaking.loc[1, "split"] = "train", "test"
    with pytest.raises(ManifestError, match="leakage"):
        write_manifest(Manifest(leaking, manifest.labels, manifest.rejects, manifest.meta), tmp_path / "x.parquet")
    dotted = manifest.table.copy()
    dotted.loc[0, "key"] = "a.b"
    with pytest.raises(ManifestError, match=r"key 'a.b' has characters outside"):
        write_manifest(Manifest(dotted, manifest.labels, manifest.rejects, manifest.meta), tmp_path / "x.parquet")
    assert not (tmp_path / "x.parquet").exists()


def test_read_refuses_files_that_are_not_manifests(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest file"):
        read_manifest(tmp_path / "missing.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_manifest(tmp_path / "text.parquet")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "plain.parquet")
    with pytest.raises(ManifestError, match="not a cxr manifest"):
        read_manifest(tmp_path / "plain.parquet")


# ---- cap_sample ------------------------------------------------------------------------------

def cap_table() -> tuple[pd.DataFrame, list[str]]:
    """Train: 60 A-only, 5 B-only (rare), 10 A+B, 40 with no positive; plus 30 valid rows."""
    rows = ([(1, 0)] * 60 + [(0, 1)] * 5 + [(1, 1)] * 10 + [(0, 0)] * 40)
    splits = ["train"] * len(rows) + ["valid"] * 30
    rows += [(1, 0)] * 30
    values = np.array(rows, dtype=np.float32)
    values[3, 1] = np.nan                                   # a NaN label is not a positive
    table = pd.DataFrame({"key": [f"k{i:04d}" for i in range(len(rows))], "split": splits,
                          "A": values[:, 0], "B": values[:, 1]})
    return table, ["A", "B"]


def test_cap_sample_caps_each_label_and_keeps_rare_ones_whole():
    table, labels = cap_table()
    keys = cap_sample(table, labels, cap=20, seed=0, epoch=0)
    chosen = table[table["key"].isin(keys)]
    assert set(chosen["split"]) == {"train"}
    assert (chosen["B"] == 1).sum() == 15                    # 15 <= 20: kept whole
    assert 20 <= (chosen["A"] == 1).sum() <= 20 + 15         # A capped at 20, plus A+B rows kept for B
    assert ((chosen[labels] == 1).sum(axis=1) == 0).sum() == 20   # no-positive rows capped too
    assert keys == sorted(keys)                              # table order (sorted by key)


def test_cap_sample_is_a_pure_function_of_seed_and_epoch():
    table, labels = cap_table()
    first = cap_sample(table, labels, cap=20, seed=0, epoch=0)
    assert first == cap_sample(table.copy(), labels, cap=20, seed=0, epoch=0)
    shuffled = table.sample(frac=1.0, random_state=0)
    assert set(cap_sample(shuffled, labels, cap=20, seed=0, epoch=0)) == set(first)
    assert first != cap_sample(table, labels, cap=20, seed=0, epoch=1)
    assert first != cap_sample(table, labels, cap=20, seed=1, epoch=0)
    everything = cap_sample(table, labels, cap=1000, seed=0, epoch=0)
    assert everything == table.loc[table["split"] == "train", "key"].tolist()
    assert len(cap_sample(table, labels, cap=1000, seed=0, epoch=0, split="valid")) == 30
    with pytest.raises(ManifestError, match="cap must be a positive"):
        cap_sample(table, labels, cap=0, seed=0, epoch=0)


def test_extra_columns_and_row_order_survive_when_asked(tmp_path):
    manifest = build_manifest(folder_raw(tmp_path / "raw"), ManifestOptions(source="folder"))
    table = manifest.table.sort_values(["split", "key"], ignore_index=True)
    table["shard_index"] = np.arange(len(table), dtype=np.int64)
    path = write_manifest(Manifest(table, manifest.labels, manifest.rejects, manifest.meta), tmp_path / "s.parquet",
                          sort=False)
    back = read_manifest(path).table
    assert list(back["key"]) == list(table["key"]) and list(back["shard_index"]) == list(range(len(table)))
    keyed = write_manifest(Manifest(table, manifest.labels), tmp_path / "k.parquet")   # default: sorted by key
    assert read_manifest(keyed).table["key"].is_monotonic_increasing


def test_writing_onto_a_folder_is_a_one_line_error(tmp_path):
    manifest = build_manifest(folder_raw(tmp_path / "raw"), ManifestOptions(source="folder"))
    with pytest.raises(ManifestError, match="is a folder, expected a file name"):
        write_manifest(manifest, tmp_path)
