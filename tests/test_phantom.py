"""Phantom trees: real layouts and tables, determinism, and findings that show in the pixels."""
from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import phantom
from phantom import make_demo_data, render_chest, write_folder, write_mimic, write_mimic_tables, write_nih
from manifests.errors import CxrError
from manifests.vocab import MIMIC_LABELS, NIH_LABELS

NIH_NAME = re.compile(r"^\d{8}_\d{3}\.png$")
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_gz_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"dicom_id": str, "ViewPosition": str}, keep_default_na=False, na_values=[""])


# --- NIH ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nih")
    write_nih(root, n=160, image_size=64, seed=3)
    return root


def test_nih_table_header_and_columns_are_the_real_ones(nih_tree, real_data):
    with gzip.open(real_data / "nih" / "Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        real_header = fh.readline().rstrip("\n")
    text = (nih_tree / "Data_Entry_2017_v2020.csv").read_text()
    assert text.split("\n", 1)[0] == real_header == phantom.NIH_HEADER
    assert text.endswith("\n") and "\r" not in text
    real = pd.read_csv(real_data / "nih" / "Data_Entry_2017_v2020.csv.gz", nrows=5)
    ours = pd.read_csv(nih_tree / "Data_Entry_2017_v2020.csv")
    assert list(ours.columns) == list(real.columns)  # 11 fields: two names hold a comma, as in the release
    assert [str(t) for t in ours.dtypes] == [str(t) for t in real.dtypes]
    assert len(ours) == 160 and ours["Image Index"].is_unique and ours["Image Index"].is_monotonic_increasing


def test_nih_rows_images_and_lists(nih_tree):
    table = pd.read_csv(nih_tree / "Data_Entry_2017_v2020.csv")
    names = table["Image Index"].tolist()
    assert all(NIH_NAME.match(n) for n in names)
    assert (table["Patient ID"].astype(int).map("{:08d}".format) == table["Image Index"].str[:8]).all()
    assert (table["Follow-up #"].map("{:03d}".format) == table["Image Index"].str[9:12]).all()
    per_patient = table.groupby("Patient ID")["Follow-up #"].agg(["count", "min", "max"])
    assert per_patient["count"].max() >= 3 and (per_patient["min"] == 0).all()
    assert (per_patient["max"] == per_patient["count"] - 1).all()
    assert set(table["View Position"]) == {"PA", "AP"} and set(table["Patient Gender"]) <= {"M", "F"}
    for name in names:  # Kaggle layout, 8-bit gray PNG
        path = nih_tree / "images_001" / "images" / name
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)
    tokens = {t for labels in table["Finding Labels"] for t in labels.split("|")}
    assert tokens <= set(NIH_LABELS) and "No Finding" in tokens
    assert tokens - {"No Finding"} == set(phantom.NIH_PREVALENCE)
    assert not any("No Finding" in labels and labels != "No Finding" for labels in table["Finding Labels"])
    assert all(labels.split("|") == sorted(labels.split("|")) for labels in table["Finding Labels"])

    train_val = (nih_tree / "train_val_list.txt").read_text().split("\n")
    test = (nih_tree / "test_list.txt").read_text().split("\n")
    assert sorted(train_val + test) == sorted(names) and not set(train_val) & set(test)
    assert {n[:8] for n in train_val}.isdisjoint({n[:8] for n in test})  # patient-disjoint
    assert 0.1 < len(test) / len(names) < 0.35


def test_nih_folder_numbering_follows_kaggle():
    assert [phantom.nih_folder(i) for i in (0, 4998, 4999, 14998, 14999)] == [
        "images_001", "images_001", "images_002", "images_002", "images_003"]


def test_nih_manifest_builds_from_the_phantom(nih_tree):
    from manifests.build import build_manifest
    from manifests.options import ManifestOptions

    manifest = build_manifest(nih_tree, ManifestOptions(source="nih"))
    assert len(manifest.table) == 160
    test = set((nih_tree / "test_list.txt").read_text().split("\n"))
    assert set(manifest.table.loc[manifest.table["split"] == "test", "key"] + ".png") == test


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mimic_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mimic")
    write_mimic(root, n=120, image_size=96, seed=5)
    return root


def test_mimic_tables_have_the_real_columns(mimic_tree):
    meta = read_gz_csv(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert list(meta.columns) == [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
        "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning"]
    for name in ("negbio", "chexpert"):
        labels = read_gz_csv(mimic_tree / f"mimic-cxr-2.0.0-{name}.csv.gz")
        assert list(labels.columns) == ["subject_id", "study_id", *MIMIC_LABELS]
    split = read_gz_csv(mimic_tree / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert tuple(MIMIC_LABELS) == phantom.MIMIC_LABEL_COLUMNS
    assert len(meta) == len(split) == 120
    # gzip without a timestamp: the same tables give the same bytes
    assert (mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()[4:8] == b"\0\0\0\0"


def test_mimic_rows_images_and_labels(mimic_tree):
    meta = read_gz_csv(mimic_tree / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert meta["dicom_id"].map(lambda d: bool(DICOM_ID.match(d))).all() and meta["dicom_id"].is_unique
    assert meta["subject_id"].between(10_000_000, 19_999_999).all()
    assert meta["study_id"].between(50_000_000, 59_999_999).all()
    assert meta.groupby("study_id")["subject_id"].nunique().max() == 1
    assert meta.groupby("subject_id")["study_id"].nunique().max() >= 2  # several studies per subject
    assert {"AP", "PA", "LATERAL"} <= set(meta["ViewPosition"].dropna())
    for row in meta.itertuples():
        path = mimic_tree / phantom.mimic_path(row.subject_id, row.study_id, row.dicom_id)
        assert path.relative_to(mimic_tree).as_posix() == (
            f"files/p{str(row.subject_id)[:2]}/p{row.subject_id}/s{row.study_id}/{row.dicom_id}.jpg")
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.size == (row.Columns, row.Rows) and max(im.size) == 96 and im.size[0] != im.size[1]
    assert (meta["StudyDate"].astype(str).str.len() == 8).all()

    negbio = read_gz_csv(mimic_tree / "mimic-cxr-2.0.0-negbio.csv.gz")
    values = negbio[list(MIMIC_LABELS)].to_numpy()
    assert set(np.unique(values[~np.isnan(values)])) <= {-1.0, 0.0, 1.0}
    assert np.isnan(values).any() and (values == -1.0).any() and (values == 1.0).any()
    never = [c for c in MIMIC_LABELS if c not in phantom.MIMIC_PREVALENCE and c != "No Finding"]
    assert not np.isin(negbio[never].to_numpy(), (1.0, -1.0)).any()
    assert negbio["study_id"].is_unique
    missing = set(meta["study_id"]) - set(negbio["study_id"])
    assert 1 <= len(missing) <= 0.1 * meta["study_id"].nunique()  # a few studies have no label row
    split = read_gz_csv(mimic_tree / "mimic-cxr-2.0.0-split.csv.gz")
    assert set(split["split"]) == {"train", "validate", "test"}
    assert split.groupby("subject_id")["split"].nunique().max() == 1  # split by subject
    assert list(split["dicom_id"]) == list(meta["dicom_id"])


def test_mimic_manifest_builds_from_the_phantom(mimic_tree):
    from manifests.build import build_manifest
    from manifests.options import ManifestOptions

    manifest = build_manifest(mimic_tree, ManifestOptions(source="mimic"))
    table = manifest.table
    assert len(table) > 20 and table["patient_id"].is_unique and set(table["view"]) == {"AP"}
    for rel in table["path"]:
        assert (mimic_tree / rel).is_file()


def test_mimic_tables_alone_have_real_proportions(tmp_path):
    card = write_mimic_tables(tmp_path, n_images=30_000, seed=1)
    meta = read_gz_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(meta) == 30_000 and not list(tmp_path.glob("files"))
    assert card["subjects"] == meta["subject_id"].nunique() and card["studies"] == meta["study_id"].nunique()
    assert 1.5 < 30_000 / card["studies"] < 1.8      # real: 377,110 / 227,835 = 1.66 images per study
    assert 5.0 < 30_000 / card["subjects"] < 6.6     # real: 377,110 / 65,379 = 5.8 images per subject
    views = meta["ViewPosition"].fillna("").value_counts(normalize=True)
    assert 0.33 < views["AP"] < 0.45 and {"LL", "", "AP AXIAL"} <= set(views.index)
    assert set(meta["Rows"]) <= {3056, 3050, 2544, 2539, 2022}
    split = read_gz_csv(tmp_path / "mimic-cxr-2.0.0-split.csv.gz")
    assert (split["split"] == "train").mean() > 0.95
    assert json.loads((tmp_path / "phantom.json").read_text())["tables_only"] is True


# --- folder sets -------------------------------------------------------------------------------


def test_folder_layout(tmp_path):
    card = write_folder(tmp_path, n=40, image_size=80, seed=2)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*") if p.name != "phantom.json")
    assert len(files) == 40
    assert {f.split("/")[0] for f in files} == {"normal", "abnormal"}
    assert {f.rsplit(".", 1)[1] for f in files} == {"png", "jpg"}
    classes: dict[str, set[str]] = {}
    for f in files:
        assert re.match(r"^(normal|abnormal)/person\d{4}_\d{4}\.(png|jpg)$", f)
        classes.setdefault(re.search(r"person(\d+)_", f).group(1), set()).add(f.split("/")[0])
        with Image.open(tmp_path / f) as im:
            assert im.mode == "L" and im.size[0] == 80 and 60 <= im.size[1] <= 76
    assert all(len(c) == 1 for c in classes.values())  # one patient, one class
    assert card["counts"]["abnormal"] == len([f for f in files if f.startswith("abnormal/")])
    with pytest.raises(CxrError):
        write_folder(tmp_path / "x", n=2, image_size=64, label="Headache")


# --- the entry point, phantom.json, determinism ------------------------------------------------


@pytest.mark.parametrize("source", phantom.SOURCES)
def test_same_arguments_write_byte_identical_trees(tmp_path, source):
    a = make_demo_data(source, tmp_path / "a", n=14, image_size=48, seed=7)
    b = make_demo_data(source, tmp_path / "b", n=14, image_size=48, seed=7)
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    tree_a, tree_b = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert tree_a == tree_b
    make_demo_data(source, tmp_path / "c", n=14, image_size=48, seed=8)
    assert tree_bytes(tmp_path / "c") != tree_a


@pytest.mark.parametrize("source", phantom.SOURCES)
def test_phantom_json_records_the_drawing(tmp_path, source):
    card = make_demo_data(source, tmp_path, n=6, image_size=40, seed=1)
    saved = json.loads((tmp_path / "phantom.json").read_text())
    assert saved == {k: v for k, v in card.items() if k != "out"}
    assert (saved["source"], saved["n"], saved["seed"], saved["image_size"]) == (source, 6, 1, 40)
    drawn = saved["labels_drawn"]
    if source == "cardiomegaly":
        assert drawn == ["Cardiomegaly"]
    else:
        vocab = NIH_LABELS if source == "nih" else MIMIC_LABELS
        assert len(drawn) >= 5 and set(drawn) <= set(vocab)
        assert all(0.1 <= saved["prevalence"][k] <= 0.3 for k in drawn)


def test_out_folder_rules(tmp_path):
    make_demo_data("cardiomegaly", tmp_path / "t", n=12, image_size=32)
    make_demo_data("cardiomegaly", tmp_path / "t", n=5, image_size=32)  # an earlier phantom is replaced
    assert len([p for p in (tmp_path / "t").rglob("*.*") if p.name != "phantom.json"]) == 5
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CxrError, match="not empty"):
        make_demo_data("nih", tmp_path / "mine", n=3, image_size=32)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(CxrError):
        make_demo_data("chexpert", tmp_path / "u", n=3)
    with pytest.raises(CxrError):
        make_demo_data("nih", tmp_path / "u", n=0)


def test_cli_demo_data(tmp_path):
    from typer.testing import CliRunner

    from cli.app import _register, app

    _register()

    result = CliRunner().invoke(app, ["demo-data", "--source", "nih", "--out", str(tmp_path / "d"), "--n", "5",
                                      "--image-size", "32", "--seed", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "d" / "phantom.json").read_text())["seed"] == 4
    bad = CliRunner().invoke(app, ["demo-data", "--source", "xray", "--out", str(tmp_path / "e"), "--n", "5"])
    assert bad.exit_code == 1 and "unknown phantom source" in bad.output


# --- findings in the pixels --------------------------------------------------------------------


def _lower_zone(img: np.ndarray) -> float:
    """Mean of the lower lung zones minus the upper ones (the film's own brightness cancels)."""
    h, w = img.shape
    cols = np.r_[int(0.14 * w) : int(0.38 * w), int(0.62 * w) : int(0.86 * w)]
    lower = img[int(0.58 * h) : int(0.74 * h)][:, cols].astype(float).mean()
    upper = img[int(0.25 * h) : int(0.41 * h)][:, cols].astype(float).mean()
    return lower - upper


def _heart_width(img: np.ndarray) -> int:
    """Columns of the bright run through the centre, in the heart's row band."""
    h, w = img.shape
    profile = img[int(0.56 * h) : int(0.7 * h)].astype(float).mean(axis=0)
    inner = profile[int(0.2 * w) : int(0.85 * w)]
    bright = profile > (np.percentile(inner, 10) + np.percentile(inner, 90)) / 2
    left = right = w // 2
    while left > 0 and bright[left - 1]:
        left -= 1
    while right < w - 1 and bright[right + 1]:
        right += 1
    return right - left + 1


def _auc(pos: list[float], neg: list[float]) -> float:
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def test_findings_show_across_a_tree(nih_tree):
    table = pd.read_csv(nih_tree / "Data_Entry_2017_v2020.csv")
    imgs = [cv2.imread(str(nih_tree / "images_001" / "images" / n), cv2.IMREAD_GRAYSCALE) for n in table["Image Index"]]
    has = {k: table["Finding Labels"].str.contains(k).to_numpy() for k in ("Effusion", "Cardiomegaly")}
    zone = [_lower_zone(i) for i in imgs]
    width = [_heart_width(i) for i in imgs]
    eff, card = has["Effusion"], has["Cardiomegaly"]
    assert eff.sum() >= 10 and card.sum() >= 10
    assert _auc([z for z, e in zip(zone, eff) if e], [z for z, e in zip(zone, eff) if not e]) > 0.75
    assert _auc([w for w, c in zip(width, card) if c], [w for w, c in zip(width, card) if not c]) > 0.8
    assert np.mean([w for w, c in zip(width, card) if c]) > 1.2 * np.mean([w for w, c in zip(width, card) if not c])


@pytest.mark.parametrize("seed", range(4))
def test_each_finding_changes_the_same_patient(seed):
    size = 128
    base = render_chest(size, size, None, "PA", seed).astype(np.int32)
    assert np.array_equal(base, render_chest(size, size, {}, "PA", seed))

    def diff(name: str) -> np.ndarray:
        return render_chest(size, size, {name: 1.0}, "PA", seed).astype(np.int32) - base

    lower, upper = slice(int(0.55 * size), int(0.8 * size)), slice(int(0.12 * size), int(0.45 * size))
    assert diff("Effusion")[lower].mean() > 2 and diff("Pleural Effusion")[lower].max() > 25
    assert _heart_width(base.astype(np.uint8) + diff("Cardiomegaly").astype(np.uint8)) > _heart_width(
        base.astype(np.uint8))
    assert diff("Pneumothorax")[upper].min() < -15 and diff("Pneumothorax")[upper].mean() < 0
    for name in ("Nodule", "Mass"):
        assert diff(name).max() > 20
    for name in ("Edema", "Lung Opacity", "Consolidation", "Atelectasis"):
        assert (diff(name) > 8).sum() > 40 and diff(name).mean() > 0.1, name
    devices = base + diff("Support Devices")
    assert devices.max() > base.max() + 20 and (devices > base + 60).sum() > 20  # very bright, thin


def test_render_rules():
    assert render_chest(300, 250, {"Effusion": 1}, "PA", 0).shape == (300, 250)
    big = render_chest(1200, 1000, None, "PA", 0)  # drawn at <= 512 px, then enlarged with fine grain
    assert big.shape == (1200, 1000) and big.dtype == np.uint8
    lateral = render_chest(128, 128, {"Cardiomegaly": 1.0}, "LATERAL", 0)
    assert not np.array_equal(lateral, render_chest(128, 128, {"Cardiomegaly": 1.0}, "PA", 0))
    assert set(phantom.NIH_PREVALENCE) | set(phantom.MIMIC_PREVALENCE) <= set(phantom.DRAWABLE)
    with pytest.raises(CxrError):
        render_chest(64, 64, {"Fracture": 1.0})
    # the drawing is dark outside the body, brighter in the mediastinum than in the lungs
    img = render_chest(128, 128, None, "PA", 1).astype(float)
    assert img[:, :4].mean() < 45 and img[50:70, 60:68].mean() > img[40:60, 25:40].mean() + 25
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "PNG")


def test_folder_heart_mask_is_where_the_enlarged_heart_was_drawn(tmp_path):
    """The mask `bench/cam_bench.py` scores Grad-CAM against: the pixels cardiomegaly changes in a written
    abnormal file (against the same patient drawn without it) lie inside it, and it is the larger heart."""
    from phantom.generator import _SRC_TAG, folder_heart_mask

    write_folder(tmp_path, 12, image_size=160, seed=3)
    abnormal = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "abnormal").glob("*.png"))
    assert abnormal
    for name in abnormal:
        img = cv2.imread(str(tmp_path / name), cv2.IMREAD_GRAYSCALE)
        h, w = img.shape
        index = int(re.search(r"_(\d+)\.png$", name).group(1)) - 1
        normal = render_chest(h, w, None, "PA", (3, _SRC_TAG["cardiomegaly"], index))
        changed = np.abs(img.astype(int) - normal.astype(int)) > 12
        mask = folder_heart_mask(name, h, w, seed=3)
        near = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert changed.sum() > 50 and (changed & near).sum() >= 0.97 * changed.sum(), name
        assert mask.sum() > folder_heart_mask(name.replace("abnormal/", "normal/"), h, w, seed=3).sum()
    with pytest.raises(CxrError, match="not a file name write_folder writes"):
        folder_heart_mask("abnormal/../x.png", 10, 10)
