"""Folder datasets (the seed's cardiomegaly set, Kermany): class folders, patients, splits."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from manifests.build import ManifestOptions, build_manifest
from manifests.errors import ManifestError
from manifests.table import reject_counts


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")          # never opened: a manifest lists files, it does not read pixels


def flat_tree(raw: Path, normal: int = 20, abnormal: int = 10) -> Path:
    for i in range(normal):
        touch(raw / "normal" / f"img_{i:02d}.{('png', 'JPG', 'jpeg')[i % 3]}")
    for i in range(abnormal):
        touch(raw / "abnormal" / f"img_{i:02d}.png")
    touch(raw / "normal" / "notes.txt")
    touch(raw / "README.md")       # outside the class folders: not part of the dataset
    return raw


def test_split_is_stratified_by_class_and_seeded(tmp_path):
    raw = flat_tree(tmp_path)
    manifest = build_manifest(raw, ManifestOptions(source="cardiomegaly", seed=1))
    table = manifest.table
    assert manifest.labels == ["Cardiomegaly"]
    counts = table.groupby(["Cardiomegaly", "split"]).size().to_dict()
    assert counts == {(0.0, "train"): 14, (0.0, "valid"): 2, (0.0, "test"): 4,
                      (1.0, "train"): 7, (1.0, "valid"): 1, (1.0, "test"): 2}
    assert table["source"].eq("cardiomegaly").all() and table["study_id"].isna().all() and table["view"].isna().all()
    assert (table["patient_id"] == table["key"]).all()        # no pattern: each file is its own patient
    assert table.equals(build_manifest(raw, ManifestOptions(source="cardiomegaly", seed=1)).table)
    other = build_manifest(raw, ManifestOptions(source="cardiomegaly", seed=2)).table
    assert not table["split"].equals(other["split"])


def test_keys_paths_and_non_image_rejects(tmp_path):
    raw = flat_tree(tmp_path)
    touch(raw / "abnormal" / "a b.c.png")
    manifest = build_manifest(raw, ManifestOptions(source="folder", label="Pneumonia"))
    table = manifest.table.set_index("key")
    assert table.loc["normal_img_01", "path"] == "normal/img_01.JPG"
    assert table.loc["abnormal_a_b_c", "path"] == "abnormal/a b.c.png"
    assert table.loc["abnormal_img_00", "Pneumonia"] == 1.0 and table.loc["normal_img_00", "Pneumonia"] == 0.0
    assert reject_counts(manifest.rejects) == {"not an image file (.txt)": 1}
    assert list(manifest.rejects["path"]) == ["normal/notes.txt"]


def test_ratios_apply(tmp_path):
    raw = flat_tree(tmp_path)
    table = build_manifest(raw, ManifestOptions(source="folder", ratios=(0.5, 0.0, 0.5))).table
    assert table["split"].value_counts().to_dict() == {"train": 15, "test": 15}


def test_patient_pattern_keeps_a_patients_files_together_on_real_kermany(real_data):
    raw = real_data / "real" / "kermany"
    for seed in range(6):
        manifest = build_manifest(raw, ManifestOptions(source="folder", label="Pneumonia", seed=seed,
                                                       patient_pattern=r"person(\d+)_"))
        table = manifest.table.set_index("key")
        assert len(table) == 12 and len(manifest.rejects) == 0
        assert table.loc["abnormal_person1946_bacteria_4874", "patient_id"] == "1946"
        pair = table.loc[["abnormal_person1946_bacteria_4874", "abnormal_person1946_bacteria_4875"], "split"]
        assert pair.nunique() == 1
        assert table.loc["normal_NORMAL2-IM-1427-0001", "patient_id"] == "normal_NORMAL2-IM-1427-0001"
        assert table["Pneumonia"].sum() == 6
        assert table["patient_id"].nunique() == 11


def test_patient_pattern_matching_nothing_is_an_error(real_data):
    with pytest.raises(ManifestError, match=re.escape(r"--patient-pattern 'patient(\d+)' matches no file name")):
        build_manifest(real_data / "real" / "kermany",
                       ManifestOptions(source="folder", patient_pattern=r"patient(\d+)"))


def test_pre_split_layout_keeps_its_split(tmp_path):
    for split in ("train", "val", "test"):
        for cls in ("NORMAL", "abnormal"):
            touch(tmp_path / split / cls / f"{split}_{cls}.png")
    manifest = build_manifest(tmp_path, ManifestOptions(source="cardiomegaly"))
    table = manifest.table.set_index("key")
    assert table.loc["val_NORMAL_val_NORMAL", "split"] == "valid"
    assert table.loc["train_abnormal_train_abnormal", "split"] == "train"
    assert table.loc["test_abnormal_test_abnormal", "Cardiomegaly"] == 1.0
    assert manifest.meta["layout"] == "pre-split"


def test_pre_split_layout_with_a_patient_in_two_splits_fails_the_audit(tmp_path):
    touch(tmp_path / "train" / "normal" / "person7_a.png")
    touch(tmp_path / "test" / "abnormal" / "person7_b.png")
    with pytest.raises(ManifestError, match="leakage: patient '7' is in both train and test"):
        build_manifest(tmp_path, ManifestOptions(source="folder", patient_pattern=r"person(\d+)_"))


@pytest.mark.parametrize("files, message", [
    ([], "no class folder"),
    (["normal/a.png", "normal/a.jpg", "abnormal/b.png"], "would share the key 'normal_a'"),
    (["normal/a.txt", "abnormal/b.txt"], "no png/jpg/jpeg or DICOM image"),
    (["train/normal/a.png", "normal/b.png"], "holds both split folders"),
])
def test_bad_folders_are_one_line_errors(tmp_path, files, message):
    for name in files:
        touch(tmp_path / name)
    with pytest.raises(ManifestError, match=message):
        build_manifest(tmp_path, ManifestOptions(source="folder"))


def test_options_a_folder_set_ignores_are_refused():
    with pytest.raises(ManifestError, match="--views applies to --source nih and chexpert only"):
        ManifestOptions(source="folder", views=("PA",))
    with pytest.raises(ManifestError, match="--source cardiomegaly always labels Cardiomegaly"):
        ManifestOptions(source="cardiomegaly", label="Pneumonia")
