"""NIH ChestX-ray14 manifests: the real table with its official lists, and tiny tables.

The real table: tests/data/nih holds its rows of patients 1-1000 and 27426 with the official lists cut down to
them (3,664 images, 1,001 patients: tests/data/README.md), so a bare clone checks the real columns, names,
findings and lists. Where the whole 112,120-row release is (`tests.conftest.full_nih_root`: $CXR_TEST_DATA or
../shared/data) the same tests run on it too.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest

from manifests.build import ManifestOptions, build_manifest
from manifests.errors import ManifestError
from manifests.sampling import cap_sample
from manifests.table import reject_counts, write_manifest
from manifests.vocab import NIH_LABELS
from tests.conftest import TEST_DATA, full_nih_root

NIH_FILES = ("Data_Entry_2017_v2020.csv.gz", "train_val_list.txt", "test_list.txt")
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")


class Release(NamedTuple):
    folder: Path      # holds NIH_FILES
    images: int       # rows of its table
    patients: int
    cap: int          # a per-label cap below the train split's No Finding count


RELEASES = [pytest.param(Release(TEST_DATA / "nih", 3_664, 1_001, 1_000), id="subset")]
if full_nih_root() is not None:
    RELEASES.append(pytest.param(Release(full_nih_root() / "nih", 112_120, 30_805, 10_000), id="full"))


@pytest.fixture(scope="module", params=RELEASES)
def release(request) -> Release:
    return request.param


@pytest.fixture(scope="module")
def real_raw(release: Release, tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("nih")
    for name in NIH_FILES:
        os.symlink(release.folder / name, raw / name)
    return raw


@pytest.fixture(scope="module")
def real(real_raw: Path):
    return build_manifest(real_raw, ManifestOptions(source="nih"))


@pytest.fixture(scope="module")
def entries(release: Release) -> pd.DataFrame:
    return pd.read_csv(release.folder / "Data_Entry_2017_v2020.csv.gz", dtype=str)


def _names(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def test_real_table_gives_every_image_once(real, entries, release):
    table = real.table
    assert len(table) == len(entries) == release.images
    assert table["patient_id"].nunique() == release.patients
    assert table["key"].is_unique and table["key"].is_monotonic_increasing
    assert set(table["key"] + ".png") == set(entries["Image Index"])
    assert real.labels == list(NIH_LABELS)
    assert len(real.rejects) == 0
    assert table["study_id"].isna().all()
    assert set(table["view"]) == {"PA", "AP"}
    assert (table["path"] == "images/" + table["key"] + ".png").all()   # no images here: tables only


def test_real_test_split_is_exactly_the_official_test_list(real, release):
    table = real.table
    test = set(table.loc[table["split"] == "test", "key"] + ".png")
    assert test == _names(release.folder / "test_list.txt")
    train_val = set(table.loc[table["split"].isin(["train", "valid"]), "key"] + ".png")
    assert train_val == _names(release.folder / "train_val_list.txt")


def test_real_no_patient_in_two_splits_and_valid_is_a_tenth_of_train_val_patients(real):
    table = real.table
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    patients = table.drop_duplicates("patient_id")["split"].value_counts()
    assert patients["valid"] / (patients["valid"] + patients["train"]) == pytest.approx(0.1, abs=0.001)


def test_real_label_counts_equal_finding_labels(real, entries):
    table = real.table.set_index("key")
    findings = entries.set_index(entries["Image Index"].str.removesuffix(".png"))["Finding Labels"]
    findings = findings.reindex(table.index).str.split("|")
    for label in NIH_LABELS:
        expected = findings.map(lambda parts, label=label: label in parts)
        assert table[label].dtype == np.float32
        assert int(table[label].sum()) == int(expected.sum()), label
        assert ((table[label] == 1.0) == expected).all(), label


def test_real_cap_sample_keeps_every_hernia_and_caps_the_rest(real, release):
    table, labels, cap = real.table, real.labels, release.cap
    keys = cap_sample(table, labels, cap=cap, seed=0, epoch=0)
    assert keys == cap_sample(table, labels, cap=cap, seed=0, epoch=0)
    assert keys != cap_sample(table, labels, cap=cap, seed=0, epoch=1)
    chosen = table[table["key"].isin(keys)]
    train = table[table["split"] == "train"]
    assert set(chosen["split"]) == {"train"}
    assert chosen["Hernia"].sum() == train["Hernia"].sum() > 0
    assert train["No Finding"].sum() > cap and chosen["No Finding"].sum() >= cap


def test_real_views_filter_rejects_other_views(real_raw, real):
    manifest = build_manifest(real_raw, ManifestOptions(source="nih", views=("PA",)))
    assert set(manifest.table["view"]) == {"PA"}
    assert reject_counts(manifest.rejects) == {"view AP not selected": int((real.table["view"] == "AP").sum())}
    # the split of a patient does not depend on the views chosen
    merged = manifest.table.merge(real.table, on="key", suffixes=("", "_all"))
    assert (merged["split"] == merged["split_all"]).all()


# ---- tiny hand-made tables -------------------------------------------------------------------

ROWS = [
    ("00000001_000.png", "Cardiomegaly", "1", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA"),
    ("00000002_000.png", "No Finding", "2", "AP"),
    ("00000003_000.png", "Hernia", "3", "PA"),
    ("00000004_000.png", "Effusion|Mass", "4", "AP"),
]


def write_nih(raw: Path, rows=ROWS, name="Data_Entry_2017.csv", header=HEADER, gz=False) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"{img},{findings},0,{pid},50,M,{view},2048,2500,0.14,0.14"
                        for img, findings, pid, view in rows]
    text = "\n".join(lines) + "\n"
    if gz:
        path = raw / f"{name}.gz"
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path = raw / name
        path.write_text(text)
    return path


def write_list(path: Path, *keys: str) -> None:
    path.write_text("".join(f"{key}.png\n" for key in keys))


@pytest.mark.parametrize("split", ["random", "auto"])   # auto: no lists beside the table means random
def test_random_split_puts_each_patient_of_many_in_exactly_one_split(tmp_path, split):
    """The real table without its lists: 1,001 patients, 492 of them with several images, split at random
    by patient. Each patient lands in one split, the ratios are fractions of patients, and the manifest is
    written (its audit passes) and reads back with the same splits."""
    os.symlink(TEST_DATA / "nih" / "Data_Entry_2017_v2020.csv.gz", tmp_path / "Data_Entry_2017_v2020.csv.gz")
    for seed in (0, 1, 2):
        manifest = build_manifest(tmp_path, ManifestOptions(source="nih", split=split, seed=seed, ratios=(0.6, 0.2, 0.2)))
        table = manifest.table
        assert len(table) == 3_664 and (table.groupby("patient_id").size() > 1).sum() == 492
        assert (table.groupby("patient_id")["split"].nunique() == 1).all(), f"seed {seed}: a patient spans splits"
        per_split = table.drop_duplicates("patient_id")["split"].value_counts()
        assert per_split.to_dict() == {"train": 601, "valid": 200, "test": 200}   # of 1,001 patients
        written = write_manifest(manifest, tmp_path / f"m{seed}.parquet")
        back = pd.read_parquet(written)
        assert back["split"].tolist() == table["split"].tolist()


def test_tiny_table_without_lists_gets_a_seeded_patient_split(tmp_path):
    write_nih(tmp_path)
    manifest = build_manifest(tmp_path, ManifestOptions(source="nih", seed=3))
    table = manifest.table.set_index("key")
    assert list(table.index) == sorted(r[0][:-4] for r in ROWS)
    assert table.loc["00000001_001", "Emphysema"] == 1.0 and table.loc["00000001_001", "Cardiomegaly"] == 1.0
    assert table.loc["00000001_000", "split"] == table.loc["00000001_001", "split"]
    again = build_manifest(tmp_path, ManifestOptions(source="nih", seed=3))
    pd.testing.assert_frame_equal(manifest.table, again.table)


def test_gz_table_v2020_and_patient_sex_are_accepted(tmp_path):
    header = HEADER.replace("Patient Gender", "Patient Sex")
    write_nih(tmp_path, header=header, name="Data_Entry_2017_v2020.csv", gz=True)
    manifest = build_manifest(tmp_path, ManifestOptions(source="nih"))
    assert len(manifest.table) == len(ROWS)
    assert manifest.meta["table"] == "Data_Entry_2017_v2020.csv.gz"


@pytest.mark.parametrize("layout", ["images_001/images/{}", "images_002/{}", "images/{}", "{}"])
def test_path_points_at_the_image_in_any_images_layout(tmp_path, layout):
    write_nih(tmp_path)
    for img, *_ in ROWS:
        target = tmp_path / layout.format(img)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"")
    table = build_manifest(tmp_path, ManifestOptions(source="nih")).table
    assert (table["path"] == [layout.format(k + ".png") for k in table["key"]]).all()


def test_official_lists_reject_unlisted_rows_and_unknown_names(tmp_path):
    write_nih(tmp_path)
    write_list(tmp_path / "train_val_list.txt", "00000001_000", "00000001_001", "00000003_000", "99999999_000")
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    manifest = build_manifest(tmp_path, ManifestOptions(source="nih"))
    assert set(manifest.table.loc[manifest.table["split"] == "test", "key"]) == {"00000002_000"}
    assert reject_counts(manifest.rejects) == {
        "in neither train_val_list.txt nor test_list.txt": 1,
        "in train_val_list.txt but not in Data_Entry_2017.csv": 1,
    }
    assert set(manifest.rejects["key"]) == {"00000004_000", "99999999_000"}


def test_one_list_without_the_other_is_an_error(tmp_path):
    write_nih(tmp_path)
    (tmp_path / "test_list.txt").write_text("00000002_000.png\n")
    with pytest.raises(ManifestError, match="found test_list.txt but not train_val_list.txt"):
        build_manifest(tmp_path, ManifestOptions(source="nih"))
    assert len(build_manifest(tmp_path, ManifestOptions(source="nih", split="random")).table) == len(ROWS)


def test_patient_in_both_official_lists_fails_the_leakage_audit(tmp_path):
    write_nih(tmp_path)
    write_list(tmp_path / "train_val_list.txt", "00000001_000", "00000002_000", "00000003_000", "00000004_000")
    (tmp_path / "test_list.txt").write_text("00000001_001.png\n")
    with pytest.raises(ManifestError, match=r"patient '1' is in both train|patient '1' is in both valid"):
        build_manifest(tmp_path, ManifestOptions(source="nih"))


@pytest.mark.parametrize("rows, header, message", [
    (ROWS + [("00000005_000.png", "Cardiomegaly|Heart Attack", "5", "PA")], HEADER,
     r"Data_Entry_2017.csv: line 7: unknown finding 'Heart Attack' in 'Finding Labels'"),
    (ROWS + [("00000002_000.png", "No Finding", "2", "AP")], HEADER,
     r"Data_Entry_2017.csv: duplicate Image Index '00000002_000.png' on lines 4 and 7"),
    (ROWS, HEADER.replace("Patient ID", "Patient"), r"Data_Entry_2017.csv: missing column\(s\) 'Patient ID'"),
    ([("00000001.000.png", "Hernia", "1", "PA")], HEADER, r"line 2: Image Index '00000001.000.png' is not NAME.png"),
])
def test_bad_tables_name_file_line_and_problem(tmp_path, rows, header, message):
    write_nih(tmp_path, rows=rows, header=header)
    with pytest.raises(ManifestError, match=message):
        build_manifest(tmp_path, ManifestOptions(source="nih"))


def test_missing_table_and_unknown_view_are_errors(tmp_path):
    with pytest.raises(ManifestError, match="no NIH table"):
        build_manifest(tmp_path, ManifestOptions(source="nih"))
    write_nih(tmp_path)
    with pytest.raises(ManifestError, match="--views LL matches no image"):
        build_manifest(tmp_path, ManifestOptions(source="nih", views=("LL",)))
