"""No patient in two splits, whatever the source: every manifest is written by `manifests.table.write_manifest`
(the `cxr manifest build` file and every shard set's manifest.parquet alike), and that writer refuses a table
in which a patient spans splits. Checked for each source on a raw tree in its real layout: NIH, MIMIC-CXR-JPG,
CheXpert, a class-folder set (Kermany's layout), a cardiomegaly folder set, a label table and DICOM class
folders. Where a source's own split can put a patient in two splits (official lists, split folders, a split
column) the build is refused before anything is written."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import phantom
from cxrshards.build import BuildConfig, build_shards
from cxrshards.card import write_located_manifest
from manifests.build import build_manifest
from manifests.errors import CxrError, ManifestError
from manifests.options import ManifestOptions
from manifests.table import META_KEY, write_manifest
from tests.test_dicom import dicom_dataset, image, write as write_dicom
from tests.test_manifest_chexpert import TRAIN, VALID, row as chexpert_row, write_tree as write_chexpert

SOURCES = ("nih", "mimic", "chexpert", "folder", "cardiomegaly", "table", "dicom")


# --- raw trees in each source's layout -------------------------------------------------------------------


def table_tree(raw: Path, leak: bool = False) -> ManifestOptions:
    """A label table with a split column: 8 patients, 2-3 images each; `leak` moves one image of p1 to test."""
    rows = []
    for p in range(1, 9):
        split = "train" if p <= 5 else ("valid" if p == 6 else "test")
        for i in range(1 + p % 3 + 1):
            rows.append((f"img/p{p}_{i}.png", f"p{p}", "test" if leak and (p, i) == (1, 1) else split, (p + i) % 2))
    raw.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["image", "patient", "Split", "Nodule"]).to_csv(raw / "labels.csv", index=False)
    return ManifestOptions(source="table", table=str(raw / "labels.csv"), path_col="image", patient_col="patient",
                           split_col="Split", label_cols=("Nodule",))


def dicom_tree(raw: Path, presplit: dict[int, str] | None = None) -> ManifestOptions:
    """12 DICOM files in class folders, patients P00..P05 from their PatientID tag (two files each);
    `presplit` puts file i under that split folder instead (RAW/SPLIT/CLASS/)."""
    for i in range(12):
        cls = "abnormal" if i % 3 == 0 else "normal"
        ds = dicom_dataset(image((24, 20), 0, 4095, np.uint16, seed=i), 12, PatientID=f"P{i // 2:02d}",
                           StudyInstanceUID=f"1.2.3.{i}", ViewPosition="PA")
        folder = raw / presplit[i] if presplit else raw
        write_dicom(folder / cls / f"img{i:02d}.dcm", ds)
    return ManifestOptions(source="folder")


def source_tree(source: str, raw: Path, kermany: Path) -> ManifestOptions:
    """A raw tree of `source` under `raw`, split its default way; returns the options that read it."""
    if source == "nih":
        phantom.write_nih(raw, n=40, image_size=16, seed=1)       # with its official lists
        return ManifestOptions(source="nih")
    if source == "mimic":
        phantom.write_mimic_tables(raw, n_images=300, seed=1)     # with its official split file
        return ManifestOptions(source="mimic")
    if source == "chexpert":
        write_chexpert(raw)
        return ManifestOptions(source="chexpert")
    if source == "folder":
        shutil.copytree(kermany, raw)
        return ManifestOptions(source="folder", label="Pneumonia", patient_pattern=r"(person\d+)_")
    if source == "cardiomegaly":
        phantom.write_folder(raw, n=30, image_size=16, seed=1)
        return ManifestOptions(source="cardiomegaly", patient_pattern=r"person(\d+)_")
    if source == "table":
        return table_tree(raw)
    return dicom_tree(raw)


def leaked(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The table with one test image given to a train patient (what a split by image instead of by patient
    does); returns it and that patient."""
    table = table.copy()
    first_train = table.index[table["split"] == "train"][0]
    first_test = table.index[table["split"] == "test"][0]
    patient = table.at[first_train, "patient_id"]
    table.at[first_test, "patient_id"] = patient
    return table, patient


def leakage(patient: str) -> str:
    return rf"leakage: patient '{re.escape(patient)}' is in both train and test"


# --- every source: both writers refuse, and a shard build from such a manifest file is refused at once ------


@pytest.mark.parametrize("source", SOURCES)
def test_every_manifest_writer_refuses_a_patient_in_two_splits(source, tmp_path, phantom_kermany):
    options = source_tree(source, tmp_path / "raw", phantom_kermany)
    manifest = build_manifest(tmp_path / "raw", options)
    assert {"train", "test"} <= set(manifest.table["split"])
    assert write_manifest(manifest, tmp_path / "clean.parquet").is_file()   # as built: patient-disjoint

    table, patient = leaked(manifest.table)
    with pytest.raises(ManifestError, match=leakage(patient)):
        write_manifest(replace(manifest, table=table), tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()

    located = table.assign(shard=None, shard_index=-1, h5_index=np.arange(len(table), dtype=np.int64))
    (tmp_path / "set").mkdir()
    with pytest.raises(ManifestError, match=leakage(patient)):
        write_located_manifest(tmp_path / "set" / "manifest.parquet", located, dict(manifest.meta, labels=manifest.labels))
    assert list((tmp_path / "set").iterdir()) == []

    # a manifest file written past the writer (by hand, another tool): refused before any pixel is read
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    meta = json.dumps(dict(manifest.meta, labels=manifest.labels)).encode()
    pq.write_table(arrow.replace_schema_metadata({**arrow.schema.metadata, META_KEY: meta}), tmp_path / "leaky.parquet")
    config = BuildConfig(manifest=tmp_path / "leaky.parquet", out=tmp_path / "shards", size=16, workers=1, quiet=True)
    with pytest.raises(CxrError, match=r"leaky\.parquet: " + leakage(patient)):
        build_shards(config)
    assert not (tmp_path / "shards").exists()


# --- sources whose own split can put a patient in two splits ----------------------------------------------


def leaky_tree(source: str, raw: Path, kermany: Path) -> ManifestOptions:
    """A raw tree whose own split (official lists, split folders, a split column) puts one patient in two
    splits. (MIMIC keeps one image per subject, so its split file cannot.)"""
    if source == "nih":
        phantom.write_nih(raw, n=40, image_size=16, seed=1)
        entries = pd.read_csv(raw / "Data_Entry_2017_v2020.csv")
        test = (raw / "test_list.txt").read_text().split()
        repeat = entries[entries.duplicated("Patient ID", keep=False) & ~entries["Image Index"].isin(test)]
        moved = repeat["Image Index"].iloc[1]     # one image of a train_val patient with several
        train_val = [n for n in (raw / "train_val_list.txt").read_text().split() if n != moved]
        (raw / "train_val_list.txt").write_text("\n".join(train_val))
        (raw / "test_list.txt").write_text("\n".join(sorted([*test, moved])))
        return ManifestOptions(source="nih")
    if source == "chexpert":
        write_chexpert(raw, valid=VALID + [chexpert_row("valid", 7, 3, 1)])   # patient00007 is in train.csv too
        return ManifestOptions(source="chexpert")
    if source == "folder":   # Kermany's layout pre-split, one file of person1946 under test/
        for path in sorted(kermany.rglob("*.jpeg")):
            split = "test" if path.name == "person1946_bacteria_4875.jpeg" or path.name.startswith("NORMAL2-IM-143") \
                else "train"
            (raw / split / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, raw / split / path.parent.name / path.name)
        return ManifestOptions(source="folder", label="Pneumonia", patient_pattern=r"(person\d+)_")
    if source == "cardiomegaly":
        phantom.write_folder(tmp := raw.with_name("flat"), n=30, image_size=16, seed=1)
        for i, path in enumerate(sorted(tmp.rglob("person*"))):
            split = "test" if i % 3 == 0 else "train"   # a patient's files fall in both
            (raw / split / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, raw / split / path.parent.name / path.name)
        return ManifestOptions(source="cardiomegaly", patient_pattern=r"person(\d+)_")
    if source == "table":
        return table_tree(raw, leak=True)
    return dicom_tree(raw, presplit={i: "test" if i in (3, 8, 9) else "train" for i in range(12)})   # P01: both


@pytest.mark.parametrize("source", [s for s in SOURCES if s != "mimic"])
def test_a_source_whose_own_split_puts_a_patient_in_two_splits_is_refused(source, tmp_path, phantom_kermany):
    options = leaky_tree(source, tmp_path / "raw", phantom_kermany)
    with pytest.raises(ManifestError, match=r"leakage: patient '[^']+' is in both"):
        build_manifest(tmp_path / "raw", options)
    out = tmp_path / "shards"
    with pytest.raises(ManifestError, match=r"leakage: patient '[^']+' is in both"):
        build_shards(BuildConfig(source=options.source, raw=tmp_path / "raw", out=out, size=16, workers=1,
                                 quiet=True), options)
    assert not out.exists()
