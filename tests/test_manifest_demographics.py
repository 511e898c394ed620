"""Sex and age in manifests (manifests/demographics.py): read from each source, never guessed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import _register, app
from manifests.build import ManifestOptions, build_manifest
from manifests.demographics import age_of, sex_of
from manifests.dicomheader import read_header
from manifests.errors import ManifestError
from manifests.table import read_manifest, write_manifest
from tests.conftest import TEST_DATA, full_nih_root
from tests.test_dicom import dicom_dataset, write as write_dicom
from tests.test_manifest_chexpert import TRAIN, VALID, row, write_csv, write_tree
from tests.test_manifest_mimic import write_mimic as write_mimic_tables
from tests.test_manifest_nih import HEADER as NIH_HEADER

_register()
runner = CliRunner()


def cxr(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def sexes(table: pd.DataFrame) -> dict:
    return {key: (sex if isinstance(sex, str) else None) for key, sex in table["sex"].items()}


def write_nih(raw: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """Data_Entry_2017.csv with (image, patient, age, sex) rows."""
    raw.mkdir(parents=True, exist_ok=True)
    lines = [NIH_HEADER] + [f"{img},No Finding,0,{pid},{age},{sex},PA,2048,2500,0.14,0.14" for img, pid, age, sex in rows]
    (raw / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")


NIH_ROWS = [("00000001_000.png", "1", "57", "M"), ("00000001_001.png", "1", "58", "M"),
            ("00000002_000.png", "2", "412", "F"), ("00000003_000.png", "3", "058Y", "F"),
            ("00000004_000.png", "4", "", "")]


def test_nih_sex_and_age_with_ages_above_120_made_missing_and_counted(tmp_path):
    write_nih(tmp_path, NIH_ROWS)
    manifest = build_manifest(tmp_path, ManifestOptions(source="nih"))
    table = manifest.table.set_index("key")
    assert sexes(table) == {"00000001_000": "M", "00000001_001": "M", "00000002_000": "F", "00000003_000": "F",
                            "00000004_000": None}
    assert table["age"].dtype == np.float64
    assert table.loc["00000001_000", "age"] == 57.0 and table.loc["00000003_000", "age"] == 58.0
    assert np.isnan(table.loc["00000002_000", "age"]) and np.isnan(table.loc["00000004_000", "age"])
    assert manifest.meta["demographics"] == {"sex_column": "Patient Gender", "age_column": "Patient Age",
                                             "max_age": 120.0, "ages_above_max": 1}
    back = read_manifest(write_manifest(manifest, tmp_path / "m.parquet"))
    pd.testing.assert_frame_equal(back.table, manifest.table)
    info = cxr("manifest", "info", tmp_path / "m.parquet")
    assert info.exit_code == 0, info.output
    assert "1 ages above 120 years in the table were made missing" in info.output
    assert re.search(r"train\s+│\s+\d+\s+│\s+\d+\s+│", info.output)


@pytest.mark.parametrize("column, value, message", [
    (2, "abc", "line 3: column 'Patient Age': value 'abc' is not an age"),
    (2, "-4", "line 3: column 'Patient Age': value '-4' is not an age"),
    (3, "X", "line 3: column 'Patient Gender': value 'X' is not a sex"),
])
def test_nih_bad_cells_name_file_line_column_and_value(tmp_path, column, value, message):
    rows = [list(r) for r in NIH_ROWS]
    rows[1][column] = value
    write_nih(tmp_path, [tuple(r) for r in rows])
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path, ManifestOptions(source="nih"))
    assert str(err.value).startswith(f"{tmp_path / 'Data_Entry_2017.csv'}: {message}"), str(err.value)


# the real NIH table: tests/data's cut (patients 1-1000 and 27426), and the whole release where it is
# (tests.conftest.full_nih_root); counted once from each file
REAL_NIH = [pytest.param(TEST_DATA / "nih", {"M": 1_862, "F": 1_802}, (11.0, 94.0), id="subset")]
if full_nih_root() is not None:
    REAL_NIH.append(pytest.param(full_nih_root() / "nih", {"M": 63_340, "F": 48_780}, (0.0, 95.0), id="full"))


@pytest.mark.parametrize("folder, sexes, ages", REAL_NIH)
def test_real_nih_table_sex_counts_and_ages(folder, sexes, ages, tmp_path):
    (tmp_path / "Data_Entry_2017_v2020.csv.gz").symlink_to(folder / "Data_Entry_2017_v2020.csv.gz")
    manifest = build_manifest(tmp_path, ManifestOptions(source="nih", split="random"))
    table = manifest.table
    assert table["sex"].value_counts().to_dict() == sexes
    assert table["age"].notna().all() and (table["age"].min(), table["age"].max()) == ages
    assert manifest.meta["demographics"]["ages_above_max"] == 0


def test_chexpert_sex_and_age_with_unknown_missing(tmp_path):
    train = [*TRAIN]
    train[0] = {**train[0], "Sex": "Male", "Age": "41"}
    train[1] = {**train[1], "Sex": "Unknown", "Age": "0"}
    train[2] = {**train[2], "Sex": "Unknown", "Age": "0"}
    train[3] = {**train[3], "Sex": "female", "Age": "130"}
    write_tree(tmp_path, train=train)
    manifest = build_manifest(tmp_path, ManifestOptions(source="chexpert"))
    table = manifest.table.set_index("key")
    first = table.loc["train_patient00001_study1_view1_frontal"]
    assert first["sex"] == "M" and first["age"] == 41.0
    unknown = table.loc["train_patient00002_study2_view1_frontal"]
    assert pd.isna(unknown["sex"]) and unknown["age"] == 0.0
    slip = table.loc["train_patient00002_study1_view1_frontal"]
    assert slip["sex"] == "F" and np.isnan(slip["age"])
    assert table.loc["valid_patient64541_study1_view1_frontal", "sex"] == "F"   # the fixture's Female
    assert manifest.meta["demographics"]["ages_above_max"] == 1


def test_chexpert_bad_sex_names_file_line_column_value(tmp_path):
    train = [*TRAIN]
    train[4] = {**train[4], "Sex": "Woman?"}
    dataset = write_tree(tmp_path, train=train)
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path, ManifestOptions(source="chexpert"))
    assert str(err.value) == (f"{dataset / 'train.csv'}: line 6: column 'Sex': value 'Woman?' is not a sex "
                              "(expected F, M, Female, Male, Unknown or blank)")


def test_chexpert_without_sex_and_age_columns_gives_missing(tmp_path):
    columns = [c for c in row("train", 1, 1, 1) if c not in ("Sex", "Age")]
    dataset = write_tree(tmp_path)
    write_csv(dataset / "train.csv", TRAIN, columns)
    write_csv(dataset / "valid.csv", VALID, columns)
    manifest = build_manifest(tmp_path, ManifestOptions(source="chexpert"))
    assert manifest.table["sex"].isna().all() and manifest.table["age"].isna().all()
    assert manifest.meta["demographics"]["sex_column"] is None


@pytest.mark.parametrize("text, years", [
    ("045Y", 45.0), ("006M", 0.5), ("010W", 70 / 365.25), ("003D", 3 / 365.25), ("", np.nan),
    ("garbage", np.nan), ("45", 45.0), (None, np.nan), ("412Y", 412.0),
])
def test_dicom_age_strings_become_years(text, years):
    assert age_of(text) == pytest.approx(years, nan_ok=True)


@pytest.mark.parametrize("text, sex", [("F", "F"), ("M ", "M"), ("O", None), ("", None), ("X1", None), (None, None)])
def test_dicom_sex_values(text, sex):
    assert sex_of(text) == sex


def test_dicom_headers_give_sex_and_age_to_folder_manifests(tmp_path):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    cases = {"normal/a.dcm": ("F", "006M"), "normal/b.dcm": ("M", "010W"), "abnormal/c.dcm": ("O", "003D"),
             "abnormal/d.dcm": ("M", "garbage"), "abnormal/e.dcm": ("F", "412Y")}
    for i, (name, (sex, age)) in enumerate(cases.items()):
        ds = dicom_dataset(pixels, 12, PatientID=f"P{i}", PatientSex=sex, PatientAge=age)
        write_dicom(tmp_path / name, ds)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "normal" / "f.png")
    header = read_header(tmp_path / "normal" / "a.dcm")
    assert header.sex == "F" and header.age == pytest.approx(0.5) and header.patient_id == "P0"
    manifest = build_manifest(tmp_path, ManifestOptions(source="cardiomegaly"))
    table = manifest.table.set_index("key")
    assert sexes(table) == {
        "abnormal_c": None, "abnormal_d": "M", "abnormal_e": "F", "normal_a": "F", "normal_b": "M", "normal_f": None}
    assert table.loc["normal_a", "age"] == pytest.approx(0.5)
    assert table.loc["normal_b", "age"] == pytest.approx(70 / 365.25)
    assert table.loc["abnormal_c", "age"] == pytest.approx(3 / 365.25)
    assert table[["age"]].loc[["abnormal_d", "abnormal_e", "normal_f"]].isna().all().all()
    assert manifest.meta["demographics"] == {"sex_column": "PatientSex", "age_column": "PatientAge",
                                             "max_age": 120.0, "ages_above_max": 1}


TABLE = """image,patient,Split,gender,years,Effusion
a.png,p1,train,F,61,1
a.png,p1,train,F,61,0
b.png,p2,train,male,006M,0
c.png,p3,valid,,,1
d.png,p4,test,Unknown,130,0
"""


def table_options(path: Path, **kw) -> ManifestOptions:
    kw = {"path_col": "image", "patient_col": "patient", "split_col": "Split", "label_cols": ("Effusion",),
          "sex_col": "gender", "age_col": "years", **kw}
    return ManifestOptions(source="table", table=str(path), **kw)


def test_table_sex_col_and_age_col(tmp_path):
    (tmp_path / "labels.csv").write_text(TABLE)
    manifest = build_manifest(tmp_path, table_options(tmp_path / "labels.csv"))
    table = manifest.table.set_index("key")
    assert sexes(table) == {"a": "F", "b": "M", "c": None, "d": None}
    assert table.loc["a", "age"] == 61.0 and table.loc["b", "age"] == 0.5
    assert np.isnan(table.loc["c", "age"]) and np.isnan(table.loc["d", "age"])
    assert manifest.meta["demographics"] == {"sex_column": "gender", "age_column": "years", "max_age": 120.0,
                                             "ages_above_max": 1}
    plain = build_manifest(tmp_path, table_options(tmp_path / "labels.csv", sex_col=None, age_col=None))
    assert plain.table["sex"].isna().all() and plain.table["age"].isna().all()


@pytest.mark.parametrize("change, message", [
    (("b.png,p2,train,male", "b.png,p2,train,mal"), "line 4: column 'gender': value 'mal' is not a sex"),
    (("006M", "6 months"), "line 4: column 'years': value '6 months' is not an age"),
    (("a.png,p1,train,F,61,0", "a.png,p1,train,M,61,0"), "rows for image 'a.png' disagree on sex: 'F' (line 2) "
                                                          "and 'M' (line 3)"),
])
def test_table_bad_values_name_file_line_column_value(tmp_path, change, message):
    (tmp_path / "labels.csv").write_text(TABLE.replace(*change))
    with pytest.raises(ManifestError) as err:
        build_manifest(tmp_path, table_options(tmp_path / "labels.csv"))
    assert str(err.value).startswith(f"{tmp_path / 'labels.csv'}: {message}"), str(err.value)


def test_table_parquet_bad_sex_names_the_row_index(tmp_path):
    frame = pd.DataFrame({"image": ["a.png", "b.png"], "patient": ["p1", "p2"], "Effusion": [1, 0],
                          "gender": ["F", "?"], "years": [40, 50]})
    frame.to_parquet(tmp_path / "labels.parquet")
    options = table_options(tmp_path / "labels.parquet", split_col=None)
    with pytest.raises(ManifestError, match=r"labels.parquet: row index 1: column 'gender': value '\?' is not a sex"):
        build_manifest(tmp_path, options)


def test_table_cli_sex_col_error_is_one_line(tmp_path):
    (tmp_path / "labels.csv").write_text(TABLE.replace("male", "mal"))
    result = cxr("manifest", "build", "--source", "table", "--raw", tmp_path, "--table", tmp_path / "labels.csv",
                 "--path-col", "image", "--patient-col", "patient", "--split-col", "Split", "--label-cols", "Effusion",
                 "--sex-col", "gender", "--age-col", "years", "--out", tmp_path / "m.parquet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {tmp_path / 'labels.csv'}: line 4: column 'gender': value 'mal' is not "
                                     "a sex (expected F, M, Female, Male, Unknown or blank)")
    ok = cxr("manifest", "build", "--source", "table", "--raw", tmp_path, "--table", tmp_path / "labels.csv",
             "--path-col", "image", "--patient-col", "patient", "--label-cols", "Effusion", "--sex-col", "gender",
             "--out", tmp_path / "m.parquet")
    assert ok.exit_code == 1 and "'mal' is not a sex" in ok.stderr
    other = cxr("manifest", "build", "--source", "nih", "--raw", tmp_path, "--sex-col", "gender",
                "--out", tmp_path / "m.parquet")
    assert other.exit_code == 1 and "--sex-col apply to --source table only, not nih" in other.stderr


def test_mimic_has_the_columns_all_missing(tmp_path):
    write_mimic_tables(tmp_path)
    manifest = build_manifest(tmp_path, ManifestOptions(source="mimic"))
    assert manifest.table["sex"].isna().all() and manifest.table["age"].isna().all()
    assert manifest.table["age"].dtype == np.float64
    assert manifest.meta["demographics"]["sex_column"] is None


def test_a_manifest_written_before_the_columns_reads_and_shows_as_missing(tmp_path):
    write_nih(tmp_path / "raw", NIH_ROWS)
    manifest = build_manifest(tmp_path / "raw", ManifestOptions(source="nih"))
    old = manifest.table.drop(columns=["sex", "age"])
    meta = {k: v for k, v in manifest.meta.items() if k != "demographics"}
    arrow = pa.Table.from_pandas(old, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**arrow.schema.metadata, b"cxr": json.dumps(meta).encode()})
    pq.write_table(arrow, tmp_path / "old.parquet")
    back = read_manifest(tmp_path / "old.parquet")
    assert back.table["sex"].isna().all() and back.table["age"].isna().all()
    pd.testing.assert_frame_equal(back.table.drop(columns=["sex", "age"]), old)
    info = cxr("manifest", "info", tmp_path / "old.parquet")
    assert info.exit_code == 0, info.output
    assert "not recorded (manifest written before sex and age were)" in info.output


def test_a_foreign_sex_value_in_a_manifest_file_is_refused(tmp_path):
    write_nih(tmp_path / "raw", NIH_ROWS)
    manifest = build_manifest(tmp_path / "raw", ManifestOptions(source="nih"))
    manifest.table["sex"] = manifest.table["sex"].replace({"F": "female"})
    with pytest.raises(ManifestError, match="sex 'female' of key '00000002_000' is not F, M or missing"):
        write_manifest(manifest, tmp_path / "m.parquet")


def test_shard_build_carries_sex_and_age_into_the_sets_manifest(tmp_path):
    raw = tmp_path / "raw"
    (raw / "img").mkdir(parents=True)
    rows = ["image,patient,Split,gender,years,Effusion"]
    for i in range(6):
        Image.fromarray(np.full((20, 20), 40 * i, np.uint8)).save(raw / "img" / f"i{i}.png")
        rows.append(f"img/i{i}.png,p{i},{('train', 'valid', 'test')[i // 2]},{'FM'[i % 2]},{20 + i},{i % 2}")
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    result = cxr("shard", "build", "--source", "table", "--raw", raw, "--table", raw / "labels.csv",
                 "--path-col", "image", "--patient-col", "patient", "--split-col", "Split", "--label-cols", "Effusion",
                 "--sex-col", "gender", "--age-col", "years", "--out", tmp_path / "out", "--size", 16,
                 "--workers", 1, "--quiet")
    assert result.exit_code == 0, result.output
    table = read_manifest(tmp_path / "out" / "table-16" / "manifest.parquet").table.set_index("key")
    assert table.loc["img_i0", "sex"] == "F" and table.loc["img_i5", "sex"] == "M"
    assert table["age"].to_dict() == {f"img_i{i}": 20.0 + i for i in range(6)} | {}
    assert {"shard", "shard_index", "h5_index"} <= set(table.columns)
