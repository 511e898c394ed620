"""MIMIC-CXR-JPG cohort rules on hand-made tables written in the release's CSV layouts."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manifests.build import ManifestOptions, build_manifest
from manifests.errors import ManifestError
from manifests.table import reject_counts
from manifests.vocab import MIMIC_LABELS

META_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]


def dicom(tag: str) -> str:
    """A dicom_id in the release's format whose text order follows `tag`."""
    return f"{tag:0<8}-bde0afdd-112c0b34-7bc16630-4e384014"


A, B, C, D, E, F, G, H, I, J, K, L = (dicom(t) for t in ("0a", "0b", "0c", "0d", "0e", "0f", "10", "11", "12", "13",
                                                          "14", "15"))
# (dicom_id, subject_id, study_id, ViewPosition)
IMAGES = [
    # subject 1: its lowest study has no AP image; the next study has two AP images; a later one another
    (B, "10000001", "50000002", "PA"),
    (C, "10000001", "50000002", "LATERAL"),
    (D, "10000001", "50000005", "AP"),
    (A, "10000001", "50000005", "AP"),            # lowest dicom_id of the chosen study -> selected
    (E, "10000001", "50000009", "AP"),
    # subject 2: only 'AP AXIAL' and a blank view -> left out
    (F, "10000002", "51000000", "AP AXIAL"),
    (G, "10000002", "51000000", ""),
    # subject 3: its chosen study has no row in the label table -> left out
    (H, "10000003", "52000007", "AP"),
    # subject 4: uncertain labels; study_id ends in 8
    (I, "10000004", "53000008", "AP"),
    # subject 5: study ids compared as text: '100000001' < '59999999'
    (J, "10000005", "59999999", "AP"),
    (K, "10000005", "100000001", "AP"),
    # subject 6: a plain one
    (L, "10000006", "54000001", "AP"),
]
# study_id -> {label: cell text}; every other label cell is blank
LABELS = {
    "50000002": {"No Finding": "1.0"},
    "50000005": {"Cardiomegaly": "1.0", "Edema": "0.0"},
    "50000009": {"Edema": "1.0"},
    "51000000": {"No Finding": "1.0"},
    "53000008": {"Atelectasis": "-1.0", "Cardiomegaly": "1.0", "Edema": "0.0", "Pneumonia": "-1.0"},
    "59999999": {"Fracture": "1.0"},
    "100000001": {"Support Devices": "1.0"},
    "54000001": {"No Finding": "1.0"},
}
SPLIT = {A: "train", I: "test", K: "validate", L: "train"}
SELECTED = {A, I, K, L}


def _write(path: Path, frame: pd.DataFrame, gz: bool) -> None:
    text = frame.to_csv(index=False)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)


def write_mimic(raw: Path, images=IMAGES, labels=LABELS, split=SPLIT, gz=False, kind="negbio") -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    meta = pd.DataFrame([{
        "dicom_id": d, "subject_id": s, "study_id": st, "PerformedProcedureStepDescription": "CHEST (PORTABLE AP)",
        "ViewPosition": v, "Rows": 3056, "Columns": 2544, "StudyDate": 21800506, "StudyTime": 213014.531,
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PORTABLE AP)", "ViewCodeSequence_CodeMeaning": "antero-posterior",
        "PatientOrientationCodeSequence_CodeMeaning": "Erect"} for d, s, st, v in images], columns=META_COLUMNS)
    _write(raw / "mimic-cxr-2.0.0-metadata.csv", meta, gz)
    subject_of = {st: s for _, s, st, _ in images}
    rows = [{"subject_id": subject_of[st], "study_id": st, **{lab: cells.get(lab, "") for lab in MIMIC_LABELS}}
            for st, cells in labels.items()]
    columns = ["subject_id", "study_id", *MIMIC_LABELS]
    _write(raw / f"mimic-cxr-2.0.0-{kind}.csv", pd.DataFrame(rows, columns=columns), gz)
    if split is not None:
        ids = {d: (s, st) for d, s, st, _ in images}
        frame = pd.DataFrame([{"dicom_id": d, "study_id": ids[d][1], "subject_id": ids[d][0], "split": sp}
                              for d, sp in split.items()])
        _write(raw / "mimic-cxr-2.0.0-split.csv", frame, gz)
    return raw


def build(raw: Path, **options):
    return build_manifest(raw, ManifestOptions(source="mimic", **options))


def test_one_ap_image_per_subject_by_the_seed_rule(tmp_path):
    manifest = build(write_mimic(tmp_path))
    table = manifest.table.set_index("key")
    assert set(table.index) == SELECTED
    assert table.loc[A, "study_id"] == "50000005"            # lowest study *with an AP image*
    assert table.loc[K, "study_id"] == "100000001"           # lowest as text, not as a number
    assert table.loc[A, "path"] == f"files/p10/p10000001/s50000005/{A}.jpg"
    assert (table["view"] == "AP").all() and table["source"].eq("mimic").all()
    assert table.loc[A, "patient_id"] == "10000001"
    assert manifest.labels == list(MIMIC_LABELS)
    assert all(table[label].dtype == np.float32 for label in MIMIC_LABELS)


def test_every_other_image_is_rejected_with_its_reason(tmp_path):
    manifest = build(write_mimic(tmp_path))
    reasons = dict(zip(manifest.rejects["key"], manifest.rejects["reason"]))
    assert reasons == {
        B: "view PA not AP",
        C: "view LATERAL not AP",
        D: "not the lowest AP dicom_id of its study",
        E: "not the subject's lowest AP study",
        F: "view AP AXIAL not AP",
        G: "view blank not AP",
        H: "study has no row in mimic-cxr-2.0.0-negbio.csv",
        J: "not the subject's lowest AP study",
    }
    assert reject_counts(manifest.rejects)["not the subject's lowest AP study"] == 2
    assert set(manifest.rejects.loc[manifest.rejects["key"] == H, "path"]) == {f"files/p10/p10000003/s52000007/{H}.jpg"}


@pytest.mark.parametrize("policy, atelectasis, pneumonia", [("zeros", 0.0, 0.0), ("ones", 1.0, 1.0),
                                                              ("ignore", np.nan, np.nan)])
def test_uncertainty_policies(tmp_path, policy, atelectasis, pneumonia):
    row = build(write_mimic(tmp_path), uncertain=policy).table.set_index("key").loc[I]
    np.testing.assert_equal([row["Atelectasis"], row["Pneumonia"]], [atelectasis, pneumonia])
    assert row["Cardiomegaly"] == 1.0 and row["Edema"] == 0.0
    assert row["Lung Opacity"] == 0.0                        # blank is 0 under every policy


def test_chexpert_table_is_used_with_labels_chexpert(tmp_path):
    raw = write_mimic(tmp_path, labels={**LABELS, "50000005": {"Fracture": "1.0"}}, kind="chexpert")
    with pytest.raises(ManifestError, match="no mimic-cxr-2.0.0-negbio.csv"):
        build(raw)
    table = build(raw, labels="chexpert").table.set_index("key")
    assert table.loc[A, "Fracture"] == 1.0 and table.loc[A, "Cardiomegaly"] == 0.0


def test_official_split_file_maps_validate_to_valid(tmp_path):
    table = build(write_mimic(tmp_path)).table.set_index("key")
    assert table["split"].to_dict() == {A: "train", I: "test", K: "valid", L: "train"}
    assert build(tmp_path, split="official").table.equals(build(tmp_path).table)


def test_image_missing_from_the_split_file_is_rejected(tmp_path):
    manifest = build(write_mimic(tmp_path, split={A: "train", I: "test", K: "validate"}))
    assert L not in set(manifest.table["key"])
    assert reject_counts(manifest.rejects)["no row in mimic-cxr-2.0.0-split.csv"] == 1


def test_study_digit_split_puts_studies_ending_8_or_9_in_test(tmp_path):
    raw = write_mimic(tmp_path)
    table = build(raw, split="study-digit").table.set_index("key")
    assert table.loc[I, "split"] == "test"                   # 53000008
    assert set(table.drop(index=I)["split"]) <= {"train", "valid"}
    assert build(raw, split="study-digit").table.equals(build(raw, split="study-digit").table)


def test_without_split_file_auto_is_a_seeded_patient_split(tmp_path):
    raw = write_mimic(tmp_path, split=None)
    first = build(raw, seed=7).table
    assert first.equals(build(raw, seed=7).table)
    assert set(first["split"]) <= {"train", "valid", "test"}
    with pytest.raises(ManifestError, match="--split official needs mimic-cxr-2.0.0-split.csv"):
        build(raw, split="official")


def test_csv_and_csv_gz_give_the_same_manifest(tmp_path):
    plain = build(write_mimic(tmp_path / "plain")).table
    zipped = build(write_mimic(tmp_path / "gz", gz=True))
    assert {Path(t).suffix for t in zipped.meta["tables"]} == {".gz"}
    pd.testing.assert_frame_equal(plain, zipped.table)


def test_fetch_list_holds_the_selected_paths(tmp_path):
    raw = write_mimic(tmp_path / "raw")
    manifest = build(raw, fetch_list=str(tmp_path / "fetch.txt"))
    assert (tmp_path / "fetch.txt").read_text().splitlines() == sorted(manifest.table["path"])
    assert len(manifest.table) == len(SELECTED)


def test_ids_stay_text(tmp_path):
    images = [(dicom("01"), "10000007", "00012345", "AP")]
    raw = write_mimic(tmp_path, images=images, labels={"00012345": {"Edema": "1.0"}}, split=None)
    row = build(raw, ratios=(1.0, 0.0, 0.0)).table.iloc[0]
    assert row["study_id"] == "00012345" and row["Edema"] == 1.0 and row["split"] == "train"


@pytest.mark.parametrize("change, message", [
    (lambda raw: _drop_column(raw / "mimic-cxr-2.0.0-metadata.csv", "ViewPosition"),
     r"mimic-cxr-2.0.0-metadata.csv: missing column\(s\) 'ViewPosition'"),
    (lambda raw: _set_cell(raw / "mimic-cxr-2.0.0-negbio.csv", 2, "Edema", "2.0"),
     r"mimic-cxr-2.0.0-negbio.csv: line 4: 'Edema' is 2, expected 1, 0, -1 or blank"),
    (lambda raw: _set_cell(raw / "mimic-cxr-2.0.0-negbio.csv", 0, "Edema", "maybe"),
     r"mimic-cxr-2.0.0-negbio.csv: line 2: 'Edema' is 'maybe'"),
    (lambda raw: _set_cell(raw / "mimic-cxr-2.0.0-split.csv", 1, "split", "holdout"),
     r"mimic-cxr-2.0.0-split.csv: line 3: split 'holdout' is not train, validate or test"),
    (lambda raw: _set_cell(raw / "mimic-cxr-2.0.0-metadata.csv", 1, "dicom_id", B),
     rf"mimic-cxr-2.0.0-metadata.csv: duplicate dicom_id '{B}' on lines 2 and 3"),
    (lambda raw: (raw / "mimic-cxr-2.0.0-metadata.csv").unlink(), r"no mimic-cxr-2.0.0-metadata.csv\[.gz\]"),
])
def test_bad_tables_name_file_line_and_problem(tmp_path, change, message):
    raw = write_mimic(tmp_path)
    change(raw)
    with pytest.raises(ManifestError, match=message):
        build(raw)


def _drop_column(path: Path, column: str) -> None:
    pd.read_csv(path, dtype=str, keep_default_na=False).drop(columns=column).to_csv(path, index=False)


def _set_cell(path: Path, row: int, column: str, value: str) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(path, index=False)
