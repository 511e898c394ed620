"""Class folders of any name (NORMAL/PNEUMONIA, COVID-19 Radiography) and DICOM files in folder sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from manifests.build import ManifestOptions, build_manifest
from manifests.errors import ManifestError
from manifests.table import reject_counts

COVID = {"COVID": 6, "Normal": 10, "Lung_Opacity": 8, "Viral Pneumonia": 5}


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")          # never opened: a manifest lists png/jpg files, it does not read them


def class_tree(raw: Path, counts: dict[str, int], sub: str = "") -> Path:
    for cls, n in counts.items():
        for i in range(n):
            touch(raw / cls / sub / f"{cls}-{i}.png")
    return raw


def write_dicom(path: Path, patient: str | None, study: str = "1.2.3", view: str | None = "PA") -> Path:
    """A small valid DICOM file (preamble, file meta, 4x4 16-bit image)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path.name)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if patient is not None:
        ds.PatientID = patient
    ds.StudyInstanceUID = study
    if view is not None:
        ds.ViewPosition = view
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_normal_pneumonia_gives_one_label_named_after_the_folder(tmp_path):
    raw = class_tree(tmp_path, {"NORMAL": 12, "PNEUMONIA": 8})
    manifest = build_manifest(raw, ManifestOptions(source="folder"))
    assert manifest.labels == ["PNEUMONIA"]
    table = manifest.table.set_index("key")
    assert table.loc["PNEUMONIA_PNEUMONIA-0", "PNEUMONIA"] == 1.0 and table.loc["NORMAL_NORMAL-0", "PNEUMONIA"] == 0.0
    assert table["PNEUMONIA"].sum() == 8
    assert manifest.meta["classes"] == {"NORMAL": None, "PNEUMONIA": "PNEUMONIA"}


def test_covid_radiography_gives_three_one_hot_labels_in_name_order(tmp_path):
    raw = class_tree(tmp_path, COVID, sub="images")
    for cls in COVID:                      # the database's lung masks sit beside the images
        touch(raw / cls / "masks" / f"{cls}-0.png")
    touch(raw / "COVID.metadata.xlsx")     # outside the class folders: not part of the dataset
    manifest = build_manifest(raw, ManifestOptions(source="folder", seed=3))
    assert manifest.labels == ["COVID", "Lung_Opacity", "Viral Pneumonia"]
    table = manifest.table
    values = table[manifest.labels].to_numpy()
    assert set(values.sum(axis=1)) == {0.0, 1.0}                     # one-hot, Normal all zero
    assert dict(zip(manifest.labels, values.sum(axis=0))) == {"COVID": 6, "Lung_Opacity": 8, "Viral Pneumonia": 5}
    row = table.set_index("key").loc["Viral_Pneumonia_images_Viral_Pneumonia-2"]
    assert row["Viral Pneumonia"] == 1.0 and row["COVID"] == 0.0 and row["Lung_Opacity"] == 0.0
    assert table.set_index("key").loc["Normal_images_Normal-0", manifest.labels].sum() == 0.0
    assert reject_counts(manifest.rejects) == {"segmentation mask (masks/ folder)": 4}
    # stratified by class: each class is cut 7:1:2 on its own
    cls = table["path"].str.split("/").str[0]
    assert table[cls == "Normal"]["split"].value_counts().to_dict() == {"train": 7, "valid": 1, "test": 2}
    assert table[cls == "COVID"]["split"].value_counts().to_dict() == {"train": 4, "valid": 1, "test": 1}


def test_without_a_negative_folder_every_image_is_positive_for_one_label(tmp_path):
    raw = class_tree(tmp_path, {"COVID": 3, "Viral Pneumonia": 4})
    manifest = build_manifest(raw, ManifestOptions(source="folder"))
    assert manifest.labels == ["COVID", "Viral Pneumonia"]
    assert (manifest.table[manifest.labels].sum(axis=1) == 1.0).all()


def test_negative_names_another_folder_in_any_case(tmp_path):
    raw = class_tree(tmp_path, {"Healthy": 5, "TB": 4, "Normal": 3})
    manifest = build_manifest(raw, ManifestOptions(source="folder", negative="HEALTHY"))
    assert manifest.labels == ["Normal", "TB"]
    table = manifest.table.set_index("key")
    assert table.loc["Healthy_Healthy-0", ["Normal", "TB"]].sum() == 0.0
    assert table.loc["Normal_Normal-0", "Normal"] == 1.0
    found = r"\(found: Healthy, Normal, TB\)"
    with pytest.raises(ManifestError, match=r"--negative 'sick' matches no class folder " + found):
        build_manifest(raw, ManifestOptions(source="folder", negative="sick"))


def test_label_names_the_one_positive_folder(tmp_path):
    raw = class_tree(tmp_path, {"normal": 4, "PNEUMONIA": 4})
    manifest = build_manifest(raw, ManifestOptions(source="folder", label="Pneumonia"))
    assert manifest.labels == ["Pneumonia"] and manifest.table["Pneumonia"].sum() == 4


def test_label_with_several_positive_folders_is_an_error(tmp_path):
    raw = class_tree(tmp_path, COVID)
    with pytest.raises(ManifestError, match=r"--label names the one positive class folder, but there are 3 "
                                            r"\(COVID, Lung_Opacity, Viral Pneumonia\)"):
        build_manifest(raw, ManifestOptions(source="folder", label="Pneumonia"))


def test_abnormal_alone_keeps_the_cardiomegaly_label(tmp_path):
    raw = class_tree(tmp_path, {"normal": 4, "Abnormal": 3})
    assert build_manifest(raw, ManifestOptions(source="folder")).labels == ["Cardiomegaly"]
    cardio = build_manifest(raw, ManifestOptions(source="cardiomegaly"))
    assert cardio.labels == ["Cardiomegaly"] and cardio.table["Cardiomegaly"].sum() == 3
    class_tree(tmp_path, {"PNEUMONIA": 1})
    with pytest.raises(ManifestError, match="--source cardiomegaly reads normal/ and abnormal/ only, found PNEUMONIA"):
        build_manifest(raw, ManifestOptions(source="cardiomegaly"))


def test_pre_split_folders_with_different_classes_and_spellings(tmp_path):
    class_tree(tmp_path / "train", {"NORMAL": 3, "PNEUMONIA": 3, "COVID": 2})
    class_tree(tmp_path / "val", {"normal": 1, "Pneumonia": 1})
    class_tree(tmp_path / "test", {"Normal": 2, "pneumonia": 2, "covid": 1})
    manifest = build_manifest(tmp_path, ManifestOptions(source="folder"))
    assert manifest.labels == ["COVID", "PNEUMONIA"]      # union; the spelling that sorts first
    table = manifest.table.set_index("key")
    assert table.loc["val_Pneumonia_Pneumonia-0", ["split", "PNEUMONIA", "COVID"]].tolist() == ["valid", 1.0, 0.0]
    assert table.loc["test_covid_covid-0", ["split", "COVID"]].tolist() == ["test", 1.0]
    assert table.loc["val_normal_normal-0", ["PNEUMONIA", "COVID"]].sum() == 0.0
    assert manifest.meta["layout"] == "pre-split"


@pytest.mark.parametrize("files, message", [
    (["normal/a.png"], r"one class folder only \(normal\)"),
    (["train/normal/a.png", "train/PNEUMONIA/b.png", "chest_xray/x.png"],
     r"holds both split folders \(train\) and other folders \(chest_xray\)"),
    (["view/a.png", "normal/b.png"], "class folder 'view' would name a label like the manifest column"),
])
def test_bad_class_folders_are_one_line_errors(tmp_path, files, message):
    for name in files:
        touch(tmp_path / name)
    with pytest.raises(ManifestError, match=message):
        build_manifest(tmp_path, ManifestOptions(source="folder"))


def test_hidden_folders_are_not_classes(tmp_path):
    raw = class_tree(tmp_path, {"NORMAL": 2, "PNEUMONIA": 2, ".ipynb_checkpoints": 1, "__MACOSX": 1})
    assert build_manifest(raw, ManifestOptions(source="folder")).labels == ["PNEUMONIA"]


# --- DICOM files ------------------------------------------------------------------------------


def dicom_tree(raw: Path) -> Path:
    """12 patients, 2 DICOM studies each (one per class folder for even patients)."""
    for p in range(12):
        for s in range(2):
            cls = "PNEUMONIA" if p % 2 == 0 and s == 1 else "NORMAL"
            write_dicom(raw / cls / f"p{p}_s{s}.dcm", patient=f"PAT{p:03d}", study=f"1.2.{p}.{s}",
                        view=("AP", "PA")[s])
    return raw


def test_dicom_headers_give_patient_study_view_and_a_patient_disjoint_split(tmp_path):
    raw = dicom_tree(tmp_path)
    for seed in range(4):
        manifest = build_manifest(raw, ManifestOptions(source="folder", seed=seed))
        table = manifest.table.set_index("key")
        row = table.loc["PNEUMONIA_p4_s1"]
        assert (row["patient_id"], row["study_id"], row["view"], row["PNEUMONIA"]) == ("PAT004", "1.2.4.1", "PA", 1.0)
        assert table["patient_id"].nunique() == 12
        assert (table.groupby("patient_id")["split"].nunique() == 1).all()   # each patient in one split
        assert len(manifest.rejects) == 0
    # --patient-pattern replaces PatientID (study and view still come from the header)
    table = build_manifest(raw, ManifestOptions(source="folder", patient_pattern=r"p(\d+)_s")).table
    assert table.set_index("key").loc["NORMAL_p4_s0", ["patient_id", "study_id"]].tolist() == ["4", "1.2.4.0"]


def test_dicom_with_empty_patient_id_is_its_own_patient(tmp_path):
    write_dicom(tmp_path / "NORMAL" / "a.dicom", patient="", view=None)
    write_dicom(tmp_path / "NORMAL" / "b.DCM", patient=None)
    write_dicom(tmp_path / "PNEUMONIA" / "c.dcm", patient="  ")
    table = build_manifest(tmp_path, ManifestOptions(source="folder")).table.set_index("key")
    assert (table["patient_id"] == table.index).all()          # each its own patient (key)
    assert table["view"].isna()["NORMAL_a"] and table.loc["NORMAL_b", "view"] == "PA"


def test_dicm_magic_without_extension_is_a_dicom(tmp_path):
    uid_name = "1.2.840.113619.2.55.3.1"
    write_dicom(tmp_path / "NORMAL" / uid_name, patient="P1")
    write_dicom(tmp_path / "NORMAL" / "1.2.840.113619.2.55.3.2", patient="P2")
    write_dicom(tmp_path / "PNEUMONIA" / "IM0001", patient="P3", view="AP")
    (tmp_path / "PNEUMONIA" / "notes").write_bytes(b"x" * 200)          # no DICM at byte 128
    manifest = build_manifest(tmp_path, ManifestOptions(source="folder"))
    table = manifest.table.set_index("key")
    assert table.loc["NORMAL_1_2_840_113619_2_55_3_1", ["path", "patient_id"]].tolist() == [f"NORMAL/{uid_name}", "P1"]
    assert table.loc["PNEUMONIA_IM0001", ["patient_id", "view", "PNEUMONIA"]].tolist() == ["P3", "AP", 1.0]
    assert manifest.rejects[["path", "reason"]].to_dict("records") == [
        {"path": "PNEUMONIA/notes", "reason": "not an image file (no extension)"}]


def test_unreadable_dicom_header_is_a_reject_with_the_reason(tmp_path):
    good = write_dicom(tmp_path / "NORMAL" / "good.dcm", patient="P1")
    write_dicom(tmp_path / "PNEUMONIA" / "ok.dcm", patient="P2")
    data = good.read_bytes()
    (tmp_path / "NORMAL" / "truncated.dcm").write_bytes(data[:360])      # cut inside the header
    (tmp_path / "NORMAL" / "garbage").write_bytes(data[:132] + b"\xff" * 50)
    report = Dataset()
    report.PatientID = "P9"                                              # a DICOM without an image
    report.save_as(tmp_path / "PNEUMONIA" / "report.dcm", implicit_vr=True, little_endian=True)
    manifest = build_manifest(tmp_path, ManifestOptions(source="folder"))
    assert sorted(manifest.table["key"]) == ["NORMAL_good", "PNEUMONIA_ok"]
    no_pixels = "unreadable DICOM header (no Pixel Data after it: truncated, corrupt, or not an image)"
    assert dict(zip(manifest.rejects["path"], manifest.rejects["reason"])) == {
        "NORMAL/garbage": no_pixels, "NORMAL/truncated.dcm": no_pixels, "PNEUMONIA/report.dcm": no_pixels}


def test_real_kermany_folder_still_works(real_data):
    manifest = build_manifest(real_data / "real" / "kermany",
                              ManifestOptions(source="folder", patient_pattern=r"person(\d+)_"))
    assert manifest.labels == ["Cardiomegaly"] and len(manifest.table) == 12 and len(manifest.rejects) == 0
    assert manifest.table["Cardiomegaly"].sum() == 6
    assert manifest.meta["classes"] == {"abnormal": "Cardiomegaly", "normal": None}
