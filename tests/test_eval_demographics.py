"""`--demographics FILE` (trainer/evaluation/demographics.py): a patient table joined onto predictions."""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from manifests.errors import CxrError
from trainer.evaluation.demographics import join_demographics
from trainer.evaluation.subgroups import subgroup_metrics
from trainer.metrics import EvalError

# MIMIC-IV hosp/patients.csv.gz as released: subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod.
PATIENTS = """subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod
10000032,F,52,2180,2014 - 2016,2180-09-09
10000048,F,23,2126,2008 - 2010,
10000068,M,19,2160,2008 - 2010,
10000084,M,72,2160,2017 - 2019,2161-02-13
10000032,F,52,2180,2014 - 2016,2180-09-09
"""


def mimic_predictions() -> pd.DataFrame:
    """As the pipeline hands them over for a MIMIC-CXR set: patient_id is the subject_id as written."""
    return pd.DataFrame({
        "key": ["d1", "d2", "d3", "d4", "d5"], "set": "mimic-224",
        "patient_id": ["10000032", "10000048", "10000032", "19999999", "10000084"], "split": "test",
        "view": "AP", "sex": pd.Series([None] * 5, dtype="str"), "age": np.nan,
        "Edema": np.float32([1, 0, 0, 1, np.nan]), "prob_Edema": np.float32([0.9, 0.1, 0.2, 0.3, 0.5]),
    })


def write_gz(path, text: str):
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    return path


def test_mimic_iv_patients_table_works_as_it_is(tmp_path):
    path = write_gz(tmp_path / "patients.csv.gz", PATIENTS)
    joined = join_demographics(mimic_predictions(), path)
    assert joined["sex"].tolist()[:3] == ["F", "F", "F"] and pd.isna(joined["sex"].iloc[3])
    assert joined["sex"].iloc[4] == "M"
    assert joined["age"].tolist()[:3] == [52.0, 23.0, 52.0] and np.isnan(joined["age"].iloc[3])
    assert joined["anchor_year_group"].iloc[1] == "2008 - 2010"
    assert joined["key"].tolist() == ["d1", "d2", "d3", "d4", "d5"]                   # rows and order unchanged
    assert joined.attrs["demographics"] == {
        "file": str(path), "key": "subject_id", "columns": ["sex", "age", "anchor_year", "anchor_year_group", "dod"],
        "set": None, "patients_matched": 3, "patients_unmatched": 1, "images_matched": 4, "images_unmatched": 1}
    plain = tmp_path / "patients.csv"
    plain.write_text(PATIENTS)
    pd.testing.assert_frame_equal(join_demographics(mimic_predictions(), plain), joined)


def test_an_unmatched_patient_keeps_its_own_values_and_replaced_columns_take_the_tables(tmp_path):
    predictions = mimic_predictions()
    predictions["sex"] = pd.Series(["M", "M", "M", "F", "F"], dtype="str")
    joined = join_demographics(predictions, write_gz(tmp_path / "patients.csv.gz", PATIENTS))
    assert joined["sex"].tolist() == ["F", "F", "F", "F", "M"]


def test_a_patient_whose_rows_disagree_is_an_error_naming_the_patient(tmp_path):
    path = write_gz(tmp_path / "patients.csv.gz", PATIENTS + "10000048,M,23,2126,2008 - 2010,\n")
    with pytest.raises(EvalError) as err:
        join_demographics(mimic_predictions(), path)
    assert str(err.value) == (f"{path}: patient '10000048' (subject_id) has rows that disagree on 'gender': "
                              "'F' and 'M'")


def test_a_missing_key_column_names_the_file_and_the_column(tmp_path):
    path = tmp_path / "people.csv"
    path.write_text("pid,race\n10000032,White\n")
    with pytest.raises(EvalError, match=f"^{path}: no column 'subject_id' \\(a MIMIC-IV patients table has it; "
                                        "for another table give --demographics-key COL\\) \\(has: pid, race\\)$"):
        join_demographics(mimic_predictions(), path)
    with pytest.raises(EvalError, match=f"^{path}: no column 'patient' \\(has: pid, race\\)$"):
        join_demographics(mimic_predictions(), path, key="patient")


def test_another_table_by_key_gives_usable_group_columns(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    predictions = pd.DataFrame({"key": [f"k{i}" for i in range(n)], "set": "s", "patient_id": (np.arange(n) // 2).astype(str),
                                "split": "test", "Edema": (rng.random(n) < 0.4).astype(np.float32)})
    predictions["prob_Edema"] = (0.3 * predictions["Edema"] + 0.7 * rng.random(n)).astype(np.float32)
    people = pd.DataFrame({"pid": np.arange(n // 2), "race": np.where(np.arange(n // 2) % 4 == 0, "Black", "White"),
                           "insurance": "Medicaid", "Sex": np.where(np.arange(n // 2) % 2, "Male", "Female")})
    people.to_parquet(tmp_path / "people.parquet")
    joined = join_demographics(predictions, tmp_path / "people.parquet", key="pid")
    assert joined["race"].iloc[0] == "Black" and joined["sex"].iloc[2] == "M"      # integer ids matched as text
    result = subgroup_metrics(joined, ["Edema"], ["race", "sex"], {}, n_boot=20, seed=0, calibration=False)
    race = result["columns"][0]
    assert [g["value"] for g in race["groups"]] == ["Black", "White"]
    assert race["groups"][0]["images"] == int((joined["race"] == "Black").sum()) == 100


def test_bad_values_and_clashing_columns_are_one_line_errors(tmp_path):
    path = tmp_path / "patients.csv"
    path.write_text(PATIENTS.replace("10000068,M", "10000068,X"))
    with pytest.raises(CxrError, match=f"^{path}: line 4: column 'gender': value 'X' is not a sex"):
        join_demographics(mimic_predictions(), path)
    path.write_text("subject_id,split\n10000032,train\n")
    with pytest.raises(EvalError, match="column 'split' would replace the predictions' own 'split'"):
        join_demographics(mimic_predictions(), path)
    path.write_text("subject_id,Edema\n10000032,1\n")
    with pytest.raises(EvalError, match="column 'Edema' would replace"):
        join_demographics(mimic_predictions(), path)
    with pytest.raises(EvalError, match="--demographics: no file"):
        join_demographics(mimic_predictions(), tmp_path / "nope.csv")


def test_set_name_restricts_the_join_to_one_sets_rows(tmp_path):
    predictions = pd.concat([mimic_predictions(), mimic_predictions().assign(set="nih-224")], ignore_index=True)
    joined = join_demographics(predictions, write_gz(tmp_path / "patients.csv.gz", PATIENTS), set_name="mimic-224")
    assert joined["sex"].iloc[0] == "F" and pd.isna(joined["sex"].iloc[5])
