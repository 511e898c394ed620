"""CheXpert rules on tiny trees written in the release's layout (CheXpert-v1.0-small/{train,valid,test}.csv)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import _register, app
from manifests.build import ManifestOptions, build_manifest
from manifests.errors import ManifestError
from manifests.table import read_manifest, reject_counts
from manifests.vocab import CHEXPERT_LABELS
from tests.test_shard_support import check_set

_register()
runner = CliRunner()

DATASET = "CheXpert-v1.0-small"
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def row(folder: str, patient: int, study: int, view: int, side: str = "Frontal", ap_pa: str = "AP",
        **cells: str) -> dict:
    """One CSV row as the release writes it; `cells` by label with spaces as underscores (blank otherwise)."""
    name = f"view{view}_{side.lower()}.jpg"
    values = {label: cells.get(label.replace(" ", "_"), "") for label in CHEXPERT_LABELS}
    return {"Path": f"{DATASET}/{folder}/patient{patient:05d}/study{study}/{name}", "Sex": "Female", "Age": "68",
            "Frontal/Lateral": side, "AP/PA": ap_pa if side == "Frontal" else "", **values}


TRAIN = [
    row("train", 1, 1, 1, No_Finding="1.0", Support_Devices="1.0"),
    row("train", 2, 2, 1, "Frontal", "PA", Cardiomegaly="-1.0", Lung_Opacity="1.0", Edema="0.0"),
    row("train", 2, 2, 2, "Lateral", Cardiomegaly="-1.0", Lung_Opacity="1.0"),
    row("train", 2, 1, 1, "Frontal", "LL", Fracture="1.0"),
    row("train", 3, 1, 1, "Frontal", "", Pleural_Effusion="-1.0"),
    *[row("train", p, 1, 1, "Frontal", "AP", Atelectasis="1.0") for p in range(4, 24)],
]
VALID = [row("valid", 64541, 1, 1, Cardiomegaly="1.0", **{label.replace(" ", "_"): "0.0"
                                                          for label in CHEXPERT_LABELS if label != "Cardiomegaly"}),
         row("valid", 64541, 1, 2, "Lateral", Cardiomegaly="1.0"),
         row("valid", 64542, 1, 1, "Frontal", "PA", Edema="1.0")]
TEST = [row("test", 64741, 1, 1, Pneumonia="1.0"), row("test", 64742, 1, 1, "Frontal", "RL")]


def write_csv(path: Path, rows: list[dict], columns: list[str] = HEADER) -> None:
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def write_tree(root: Path, train=TRAIN, valid=VALID, test=None, folder: str = DATASET, images: bool = False) -> Path:
    """root/<folder>/{train,valid[,test]}.csv (+ empty image files when `images`); returns root/<folder>."""
    dataset = root / folder
    dataset.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("valid.csv", valid), ("test.csv", test)):
        if rows is None:
            continue
        write_csv(dataset / name, rows)
        for r in rows if images else ():
            image = dataset / r["Path"].split("/", 1)[1]
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"")
    return dataset


def by_key(manifest) -> pd.DataFrame:
    return manifest.table.set_index("key")


# ---- labels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, uncertain", [("zeros", 0.0), ("ones", 1.0), ("ignore", np.nan)])
def test_labels_one_zero_blank_and_each_uncertain_policy(tmp_path, policy, uncertain):
    write_tree(tmp_path)
    manifest = build_manifest(tmp_path, ManifestOptions(source="chexpert", uncertain=policy))
    assert manifest.labels == list(CHEXPERT_LABELS)
    table = by_key(manifest)
    expected = dict.fromkeys(CHEXPERT_LABELS, 0.0)            # blank -> 0
    expected.update({"Cardiomegaly": uncertain, "Lung Opacity": 1.0, "Edema": 0.0})
    got = table.loc["train_patient00002_study2_view1_frontal", list(CHEXPERT_LABELS)]
    np.testing.assert_array_equal(got.to_numpy(np.float64), np.array(list(expected.values())))
    first = table.loc["train_patient00001_study1_view1_frontal", list(CHEXPERT_LABELS)]
    assert [label for label in CHEXPERT_LABELS if first[label] == 1.0] == ["No Finding", "Support Devices"]
    valid = table.loc["valid_patient64541_study1_view1_frontal", list(CHEXPERT_LABELS)]
    assert [label for label in CHEXPERT_LABELS if valid[label] == 1.0] == ["Cardiomegaly"]
    assert (table[list(CHEXPERT_LABELS)].dtypes == np.float32).all()


# ---- ids, views, paths ---------------------------------------------------------------------------------


def test_patient_study_and_view_come_from_path_and_view_columns(tmp_path):
    write_tree(tmp_path)
    table = by_key(build_manifest(tmp_path, ManifestOptions(source="chexpert")))
    assert len(table) == len(TRAIN) + len(VALID)
    expect = {   # key: (patient_id, study_id, view)
        "train_patient00002_study2_view1_frontal": ("patient00002", "patient00002/study2", "PA"),
        "train_patient00002_study2_view2_lateral": ("patient00002", "patient00002/study2", "LATERAL"),
        "train_patient00002_study1_view1_frontal": ("patient00002", "patient00002/study1", "LL"),
        "valid_patient64541_study1_view2_lateral": ("patient64541", "patient64541/study1", "LATERAL"),
    }
    for key, (patient, study, view) in expect.items():
        assert tuple(table.loc[key, ["patient_id", "study_id", "view"]]) == (patient, study, view), key
    assert pd.isna(table.loc["train_patient00003_study1_view1_frontal", "view"])   # frontal, AP/PA blank
    assert set(table["source"]) == {"chexpert"}


def test_views_ap_pa_keep_frontal_images_only_and_reject_the_rest(tmp_path):
    write_tree(tmp_path)
    every = build_manifest(tmp_path, ManifestOptions(source="chexpert"))
    frontal = build_manifest(tmp_path, ManifestOptions(source="chexpert", views=("AP", "PA")))
    assert set(frontal.table["view"]) == {"AP", "PA"}
    assert reject_counts(frontal.rejects) == {"view LATERAL not selected": 2, "view LL not selected": 1,
                                              "view blank not selected": 1}
    assert sorted(frontal.rejects["key"]) == sorted(set(every.table["key"]) - set(frontal.table["key"]))
    # views never move a patient
    merged = frontal.table.merge(every.table, on="key", suffixes=("", "_all"))
    assert (merged["split"] == merged["split_all"]).all() and len(merged) == len(frontal.table)


def test_views_outside_chexperts_values_are_an_error(tmp_path):
    write_tree(tmp_path)
    with pytest.raises(ManifestError, match=r"--views FRONTAL: not a CheXpert view \(choose from AP, PA, LL, RL"):
        build_manifest(tmp_path, ManifestOptions(source="chexpert", views=("AP", "FRONTAL")))
    # a CheXpert view that these tables lack is no error (RL is rare)
    assert set(build_manifest(tmp_path, ManifestOptions(source="chexpert", views=("AP", "RL"))).table["view"]) == {"AP"}


@pytest.mark.parametrize("raw_is", ["parent", "dataset", "renamed parent"])
def test_paths_resolve_below_raw_whether_raw_is_the_dataset_folder_or_its_parent(tmp_path, raw_is):
    folder = "chexpert-small-copy" if raw_is == "renamed parent" else DATASET
    dataset = write_tree(tmp_path, folder=folder, images=True)
    raw = dataset if raw_is == "dataset" else tmp_path
    manifest = build_manifest(raw, ManifestOptions(source="chexpert"))
    prefix = "" if raw_is == "dataset" else folder + "/"
    table = by_key(manifest)
    assert table.loc["train_patient00001_study1_view1_frontal", "path"] == \
        prefix + "train/patient00001/study1/view1_frontal.jpg"
    assert table.loc["valid_patient64542_study1_view1_frontal", "path"] == \
        prefix + "valid/patient64542/study1/view1_frontal.jpg"
    assert all((raw / p).is_file() for p in table["path"])
    assert manifest.meta["dataset_folder"] == (prefix.rstrip("/") or ".")


# ---- splits --------------------------------------------------------------------------------------------


def test_auto_without_test_csv_tests_on_valid_csv_and_draws_valid_from_train_patients(tmp_path):
    write_tree(tmp_path)
    options = ManifestOptions(source="chexpert", valid_fraction=0.25, seed=4)
    table = build_manifest(tmp_path, options).table
    from_valid = table["key"].str.startswith("valid_")
    assert (table["split"][from_valid] == "test").all()
    assert set(table["split"][~from_valid]) == {"train", "valid"}
    patients = table[~from_valid].drop_duplicates("patient_id")["split"].value_counts()
    assert patients["valid"] == 6 and patients["train"] == 17      # 23 train.csv patients, a quarter valid
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    again = build_manifest(tmp_path, options).table
    other = build_manifest(tmp_path, ManifestOptions(source="chexpert", valid_fraction=0.25, seed=5)).table
    assert again["split"].tolist() == table["split"].tolist()
    assert other["split"].tolist() != table["split"].tolist()


@pytest.mark.parametrize("split", ["auto", "official"])
def test_with_test_csv_each_file_is_its_split(tmp_path, split):
    write_tree(tmp_path, test=TEST)
    table = build_manifest(tmp_path, ManifestOptions(source="chexpert", split=split)).table
    folder = table["path"].str.split("/").str[1]
    assert (folder.map({"train": "train", "valid": "valid", "test": "test"}) == table["split"]).all()
    assert table["split"].value_counts().to_dict() == {"train": len(TRAIN), "valid": len(VALID), "test": len(TEST)}
    with pytest.raises(ManifestError, match=r"test.csv: with test.csv, valid is valid.csv, so --valid-fraction 0.3 "
                                            r"would be ignored"):
        build_manifest(tmp_path, ManifestOptions(source="chexpert", split=split, valid_fraction=0.3))


def test_random_is_70_10_20_by_patient_over_every_file(tmp_path):
    write_tree(tmp_path, test=TEST)        # 23 + 2 + 2 = 27 patients -> 19 / 3 / 5 (cut at rounded fractions)
    table = build_manifest(tmp_path, ManifestOptions(source="chexpert", split="random", seed=1)).table
    assert (table.groupby("patient_id")["split"].nunique() == 1).all()
    patients = table.drop_duplicates("patient_id")["split"].value_counts().to_dict()
    assert patients == {"train": 19, "valid": 3, "test": 5}
    assert len(table) == len(TRAIN) + len(VALID) + len(TEST)


@pytest.mark.parametrize("split", ["auto", "official"])
def test_leakage_audit_names_a_patient_found_in_two_files(tmp_path, split):
    valid = VALID + [row("valid", 7, 3, 1)]      # patient00007 is also in train.csv (line 10)
    write_tree(tmp_path, valid=valid)
    message = r"leakage: patient 'patient00007' is in both train.csv \(line 10\) and valid.csv \(line 5\)$"
    with pytest.raises(ManifestError, match=message):
        build_manifest(tmp_path, ManifestOptions(source="chexpert", split=split))


# ---- errors --------------------------------------------------------------------------------------------


def _replace(rows: list[dict], at: int, **change) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[at].update(change)
    return rows


@pytest.mark.parametrize("setup, message", [
    (lambda root: write_tree(root, train=_replace(TRAIN, 2, Edema="2.0")),
     r"train.csv: line 4: 'Edema' is 2, expected 1, 0, -1 or blank"),
    (lambda root: write_tree(root, valid=_replace(VALID, 1, Fracture="yes")),
     r"valid.csv: line 3: 'Fracture' is 'yes', expected 1, 0, -1 or blank"),
    (lambda root: write_tree(root, train=_replace(TRAIN, 3, Path=f"{DATASET}/train/patient00002/s1/view1_frontal.jpg")),
     r"train.csv: line 5: 'Path' is '.*/s1/view1_frontal.jpg', expected \[DATASET/\]DIR/patientNNNNN/studyN/NAME.EXT"),
    (lambda root: write_tree(root, train=_replace(TRAIN, 0, Path=f"{DATASET}/../patient00001/study1/view1_frontal.jpg")),
     r"train.csv: line 2: 'Path' is '.*/\.\./patient00001/study1/view1_frontal.jpg', expected .*no '\.\.'"),
    (lambda root: write_tree(root, train=_replace(TRAIN, 0, Path="../train/patient00001/study1/view1_frontal.jpg")),
     r"train.csv: line 2: 'Path' is '\.\./train/patient00001/study1/view1_frontal.jpg'"),
    (lambda root: write_tree(root, train=_replace(TRAIN, 1, Path="/data/train/patient00002/study2/view1_frontal.jpg")),
     r"train.csv: line 3: 'Path' is '/data/train/patient00002/study2/view1_frontal.jpg', .*not absolute"),
    (lambda root: write_tree(root, train=_replace(TRAIN, 4, **{"Frontal/Lateral": "Oblique"})),
     r"train.csv: line 6: 'Frontal/Lateral' is 'Oblique', expected Frontal or Lateral"),
    (lambda root: write_tree(root, train=TRAIN + [TRAIN[1]]),
     rf"train.csv: duplicate Path '{DATASET}/train/patient00002/study2/view1_frontal.jpg' on lines 3 and 27"),
    (lambda root: (write_tree(root), (root / DATASET / "valid.csv").unlink()), r"no valid.csv beside train.csv"),
    (lambda root: root.mkdir(exist_ok=True), r"no train.csv here or in a folder below"),
    (lambda root: (write_tree(root), write_tree(root, folder="CheXpert-v1.0")),
     r"several CheXpert folders \(CheXpert-v1.0, CheXpert-v1.0-small\); pass one of them as --raw"),
    (lambda root: (write_tree(root), write_csv(root / DATASET / "valid.csv", VALID, HEADER[:4] + HEADER[5:])),
     r"valid.csv: missing column\(s\) 'AP/PA'"),
])
def test_bad_tables_are_one_line_errors_naming_file_line_column_value(tmp_path, setup, message):
    setup(tmp_path / "raw")
    with pytest.raises(ManifestError, match=message) as caught:
        build_manifest(tmp_path / "raw", ManifestOptions(source="chexpert"))
    assert "\n" not in str(caught.value)


def test_a_path_in_two_files_is_a_duplicate_key_error_under_random(tmp_path):
    write_tree(tmp_path, test=TEST + [dict(TRAIN[0], Path=TRAIN[0]["Path"])])
    with pytest.raises(ManifestError, match=r"key 'train_patient00001_study1_view1_frontal' .* on train.csv line 2 "
                                            r"and test.csv line 4"):
        build_manifest(tmp_path, ManifestOptions(source="chexpert", split="random"))


# ---- through the CLI -----------------------------------------------------------------------------------


def cxr(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def test_cli_manifest_build_and_info(tmp_path):
    write_tree(tmp_path / "raw", test=TEST)
    out, rejects = tmp_path / "chexpert.parquet", tmp_path / "rejects.parquet"
    result = cxr("manifest", "build", "--source", "chexpert", "--raw", tmp_path / "raw", "--out", out,
                 "--views", "AP,PA", "--uncertain", "ignore", "--rejects", rejects)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert manifest.meta["source"] == "chexpert" and manifest.labels == list(CHEXPERT_LABELS)
    assert len(manifest.table) == len(TRAIN) + len(VALID) + len(TEST) - 5
    assert pd.isna(manifest.table.set_index("key").loc["train_patient00002_study2_view1_frontal", "Cardiomegaly"])
    assert len(pd.read_parquet(rejects)) == 5
    assert re.search(r"view LATERAL not selected\s+│\s+2", result.output)

    info = cxr("manifest", "info", out)
    assert info.exit_code == 0, info.output
    assert f"source chexpert, {len(manifest.table)} images, 14 labels" in info.output
    assert re.search(r"Support Devices\s+│", info.output)


def test_cli_error_is_one_line(tmp_path):
    write_tree(tmp_path / "raw", train=_replace(TRAIN, 0, Edema="maybe"))
    result = cxr("manifest", "build", "--source", "chexpert", "--raw", tmp_path / "raw", "--out", tmp_path / "m.parquet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {tmp_path / 'raw' / DATASET / 'train.csv'}: line 2: 'Edema' is 'maybe', "
                                     "expected 1, 0, -1 or blank")


def _jpeg(path: Path, seed: int, size: tuple[int, int]) -> None:
    """A smooth non-square grayscale film with some noise, as an 8-bit JPEG (as CheXpert ships)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    image = 120 + 70 * np.sin(x / (9 + seed)) * np.cos(y / 13) + 0.2 * y + rng.normal(0, 2, (h, w))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "L").save(path, quality=95)


def test_cli_shard_build_pixels_equal_the_reference(tmp_path, monkeypatch):
    train = [row("train", p, 1, 1, "Frontal", "AP" if p % 2 else "PA", Edema="1.0" if p % 3 else "-1.0")
             for p in range(1, 11)] + [row("train", 1, 1, 2, "Lateral", Edema="1.0")]
    valid = [row("valid", 64541, 1, 1, Edema="1.0"), row("valid", 64542, 1, 1, Edema="0.0")]
    dataset = write_tree(tmp_path / "raw", train=train, valid=valid)
    for i, r in enumerate(train + valid):
        _jpeg(dataset / r["Path"].split("/", 1)[1], i, (150 + 9 * i, 190 - 4 * i))
    monkeypatch.setenv("CXR_SHARDS", str(tmp_path / "shards"))
    result = cxr("shard", "build", "--source", "chexpert", "--raw", tmp_path / "raw", "--size", 32, "--views", "AP,PA",
                 "--uncertain", "ignore", "--valid-fraction", "0.2", "--shard-size", 4, "--workers", 1, "--quiet")
    assert result.exit_code == 0, result.output
    set_dir = tmp_path / "shards" / "chexpert-32"
    card = json.loads((set_dir / "dataset.json").read_text())
    assert card["labels"] == list(CHEXPERT_LABELS) and card["rejects"] == 1     # the lateral image
    table = check_set(set_dir, tmp_path / "raw", size=32, expect=12)
    assert table.set_index("key")["Edema"].isna().sum() == 3
