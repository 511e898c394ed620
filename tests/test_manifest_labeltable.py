"""`--source table` (manifests/labeltable.py): any CSV or Parquet of labels, one or more rows per image."""
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
from manifests.table import read_manifest
from tests.test_shard_support import check_set

_register()
runner = CliRunner()

# RSNA Pneumonia's stage_2_train_labels.csv: one row per box, Target 0 rows without a box.
RSNA = """patientId,x,y,width,height,Target
0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0
00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1
00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1
00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,1
00704310-78a8-4b38-8475-49f4573b2dbb,695.0,575.0,162.0,137.0,1
00aecb01-a116-45a2-956c-08d2fa55433f,,,,,0
"""
RSNA_IDS = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00436515-870c-4b36-a041-de91049b9ab4",
            "00704310-78a8-4b38-8475-49f4573b2dbb", "00aecb01-a116-45a2-956c-08d2fa55433f"]

# A VinDr-CXR / PadChest-style table: a split column and labels written as words, numbers and -1.
VINDR = """image_id,patient,study,view,Split,Aortic enlargement,Cardiomegaly,Nodule/Mass
img/a1.png,p1,s1,PA,Train,true,no,1.0
img/a2.png,p1,s1,L,TRAIN,False,YES,0.0
img/b1.png,p2,s2,PA,validate,-1,0,
img/c1.png,p3,s3,AP,Val,yes,-1,-1.0
img/d1.png,p4,s4,PA,test,0,1,1
img/e1.png,p5,,,Test,,,
"""
VINDR_LABELS = ["Aortic enlargement", "Cardiomegaly", "Nodule/Mass"]


def options(table: Path | str, **kw) -> ManifestOptions:
    return ManifestOptions(source="table", table=str(table), **kw)


def vindr(raw: Path, text: str = VINDR, **kw):
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "labels.csv").write_text(text)
    kw = {"path_col": "image_id", "patient_col": "patient", "study_col": "study", "view_col": "view",
          "split_col": "Split", "label_cols": tuple(VINDR_LABELS), **kw}
    return build_manifest(raw, options(raw / "labels.csv", **kw))


def by_key(manifest) -> pd.DataFrame:
    return manifest.table.set_index("key")


def test_rsna_box_rows_become_one_image_each(tmp_path):
    raw = tmp_path / "raw"
    (raw / "stage_2_train_images").mkdir(parents=True)
    for name in RSNA_IDS[:3]:                             # the fourth file is not there (yet)
        (raw / "stage_2_train_images" / f"{name}.dcm").write_bytes(b"")
    (tmp_path / "stage_2_train_labels.csv").write_text(RSNA)
    manifest = build_manifest(raw, options(tmp_path / "stage_2_train_labels.csv", path_col="patientId",
                                           patient_col="patientId", label_cols=("Target",),
                                           path_format="stage_2_train_images/{}.dcm"))
    table = manifest.table
    assert table["path"].tolist() == [f"stage_2_train_images/{i}.dcm" for i in RSNA_IDS]
    assert table["key"].tolist() == [f"stage_2_train_images_{i}" for i in RSNA_IDS]
    assert table["patient_id"].tolist() == RSNA_IDS
    assert table["Target"].tolist() == [0.0, 1.0, 1.0, 0.0] and table["Target"].dtype == np.float32
    assert table["study_id"].isna().all() and table["view"].isna().all()
    assert manifest.labels == ["Target"] and len(manifest.rejects) == 0
    assert manifest.meta["table_rows"] == 6 and manifest.meta["images_found"] == 3


@pytest.mark.parametrize("policy, uncertain", [("zeros", 0.0), ("ones", 1.0), ("ignore", np.nan)])
def test_vindr_like_words_numbers_uncertain_and_split_column(tmp_path, policy, uncertain):
    manifest = vindr(tmp_path / "raw", uncertain=policy)
    t = by_key(manifest)
    u = uncertain
    expected = {"img_a1": [1, 0, 1], "img_a2": [0, 1, 0], "img_b1": [u, 0, 0], "img_c1": [1, u, u],
                "img_d1": [0, 1, 1], "img_e1": [0, 0, 0]}
    got = {k: t.loc[k, VINDR_LABELS].tolist() for k in expected}
    np.testing.assert_array_equal(np.array(list(got.values()), dtype=np.float32),
                                  np.array(list(expected.values()), dtype=np.float32))
    assert t["split"].to_dict() == {"img_a1": "train", "img_a2": "train", "img_b1": "valid", "img_c1": "valid",
                                    "img_d1": "test", "img_e1": "test"}
    assert t.loc["img_a2", "view"] == "L" and t.loc["img_c1", "study_id"] == "s3"
    assert pd.isna(t.loc["img_e1", "study_id"]) and pd.isna(t.loc["img_e1", "view"])


def test_duplicate_rows_take_the_maximum_per_label_after_the_uncertain_policy(tmp_path):
    text = ("path,pid,A,B,C\n"
            "x.png,p,0,-1,-1\n"
            "x.png,p,1,0,\n"
            "x.png,p,0,,-1\n"
            "y.png,q,-1,-1,0\n")
    ones = vindr(tmp_path / "a", text, path_col="path", patient_col="pid", study_col=None, view_col=None,
                 split_col=None, label_cols=("A", "B", "C"), uncertain="ones", ratios=(1, 0, 0))
    assert by_key(ones).loc["x", ["A", "B", "C"]].tolist() == [1.0, 1.0, 1.0]
    ignore = vindr(tmp_path / "b", text, path_col="path", patient_col="pid", study_col=None, view_col=None,
                   split_col=None, label_cols=("A", "B", "C"), uncertain="ignore", ratios=(1, 0, 0))
    x = by_key(ignore).loc["x", ["A", "B", "C"]].tolist()
    y = by_key(ignore).loc["y", ["A", "B", "C"]].tolist()
    assert x == [1.0, 0.0, 0.0]                            # NaN only where every row is uncertain: none here
    assert np.isnan(y[0]) and np.isnan(y[1]) and y[2] == 0.0


def test_parquet_gives_the_same_manifest_as_csv(tmp_path):
    raw = tmp_path / "raw"
    csv = vindr(raw)
    frame = pd.DataFrame({
        "image_id": ["img/a1.png", "img/a2.png", "img/b1.png", "img/c1.png", "img/d1.png", "img/e1.png"],
        "patient": ["p1", "p1", "p2", "p3", "p4", "p5"],
        "study": ["s1", "s1", "s2", "s3", "s4", None], "view": ["PA", "L", "PA", "AP", "PA", None],
        "Split": ["train", "train", "VALID", "val", "test", "test"],
        "Aortic enlargement": pd.array([1, 0, -1, 1, 0, None], dtype="Int64"),     # nullable integers
        "Cardiomegaly": ["No", "yes", "0", "-1", "1.0", None],                      # text
        "Nodule/Mass": [1.0, 0.0, np.nan, -1.0, 1.0, np.nan],                        # floats
    })
    frame.to_parquet(raw / "labels.parquet")
    pq = build_manifest(raw, options("labels.parquet", path_col="image_id", patient_col="patient", study_col="study",
                                     view_col="view", split_col="Split", label_cols=tuple(VINDR_LABELS)))
    pd.testing.assert_frame_equal(pq.table, csv.table)


def test_parquet_booleans_and_integer_ids(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"file": ["a.png", "b.png"], "subject": [17, 200000001], "study": [50414267.0, np.nan],
                  "Effusion": [True, False]}).to_parquet(raw / "t.parquet")
    manifest = build_manifest(raw, options(raw / "t.parquet", path_col="file", patient_col="subject",
                                           study_col="study", label_cols=("Effusion",), ratios=(1, 0, 0)))
    assert manifest.table["patient_id"].tolist() == ["17", "200000001"]
    assert manifest.table["study_id"].iloc[0] == "50414267" and pd.isna(manifest.table["study_id"].iloc[1])
    assert manifest.table["Effusion"].tolist() == [1.0, 0.0]


def test_parquet_errors_name_the_row_index(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"file": ["a.png", "b.png", "c.png"], "subject": ["1", "2", "3"],
                  "Effusion": ["yes", "no", "perhaps"]}).to_parquet(raw / "t.parquet")
    with pytest.raises(ManifestError) as err:
        build_manifest(raw, options(raw / "t.parquet", path_col="file", patient_col="subject",
                                    label_cols=("Effusion",)))
    assert str(err.value) == (f"{raw / 't.parquet'}: row index 2: column 'Effusion': value 'perhaps' is not a label "
                              "(expected 1, 0, -1, blank, 1.0/0.0, true/false or yes/no)")


def test_stratified_seeded_patient_split(tmp_path):
    rows = ["path,patient,Finding"]
    for p in range(60):                                     # 20 positive patients, 40 negative, 3 images each
        rows += [f"p{p:02d}/{i}.png,p{p:02d},{int(p % 3 == 0)}" for i in range(3)]
    text = "\n".join(rows) + "\n"
    kw = {"path_col": "path", "patient_col": "patient", "study_col": None, "view_col": None, "split_col": None,
          "label_cols": ("Finding",)}
    for seed in range(4):                                   # exact for every seed, not by luck
        table = vindr(tmp_path / f"s{seed}", text, seed=seed, **kw).table
        per_patient = table.groupby("patient_id")["split"].nunique()
        assert (per_patient == 1).all()                      # patient-disjoint
        first = table.drop_duplicates("patient_id")
        assert first[first["Finding"] == 1]["split"].value_counts().to_dict() == {"train": 14, "valid": 2, "test": 4}
        assert first[first["Finding"] == 0]["split"].value_counts().to_dict() == {"train": 28, "valid": 4, "test": 8}
    table = vindr(tmp_path / "a", text, seed=5, **kw).table
    shuffled = "\n".join([rows[0], *reversed(rows[1:])]) + "\n"
    again = vindr(tmp_path / "b", shuffled, seed=5, **kw).table
    pd.testing.assert_series_equal(again["split"], table["split"])   # row order does not matter, the seed does
    other = vindr(tmp_path / "c", text, seed=6, **kw).table
    assert not other["split"].equals(table["split"])


def test_split_column_in_any_case(tmp_path):
    text = "path,pid,A,fold\n" + "".join(
        f"{v}.png,{v},1,{v}\n" for v in ("train", "TRAIN", "Valid", "VAL", "vAlIdAtE", "Test", " test "))
    table = vindr(tmp_path / "raw", text, path_col="path", patient_col="pid", study_col=None, view_col=None,
                  split_col="fold", label_cols=("A",)).table
    assert dict(zip(table["key"], table["split"])) == {
        "train": "train", "TRAIN": "train", "Valid": "valid", "VAL": "valid", "vAlIdAtE": "valid", "Test": "test",
        "test_": "test"}


def test_table_path_resolves_against_cwd_then_raw(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "labels.csv").write_text("f,p,A\nraw.png,1,1\n")
    (tmp_path / "labels.csv").write_text("f,p,A\ncwd.png,1,1\n")
    monkeypatch.chdir(tmp_path)
    kw = {"path_col": "f", "patient_col": "p", "label_cols": ("A",), "ratios": (1, 0, 0)}
    assert build_manifest(raw, options("labels.csv", **kw)).table["path"].tolist() == ["cwd.png"]
    (tmp_path / "labels.csv").unlink()
    assert build_manifest(raw, options("labels.csv", **kw)).table["path"].tolist() == ["raw.png"]


OK_HEAD = "file,pid,study,view,split,A,B\n"


@pytest.mark.parametrize("text, kw, message", [
    (OK_HEAD + "a.png,1,s,PA,train,1,0\nb.png,2,s,PA,train,maybe,0\n", {},
     r"labels.csv: line 3: column 'A': value 'maybe' is not a label \(expected 1, 0, -1, blank"),
    (OK_HEAD + "a.png,1,s,PA,train,1,2\n", {}, r"labels.csv: line 2: column 'B': value 2 is not a label"),
    (OK_HEAD + "a.png,1,s,PA,train,1,NA\n", {}, r"labels.csv: line 2: column 'B': value 'NA' is not a label"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n", {"label_cols": ("A", "Edema", "Mass")},
     r"labels.csv: missing column\(s\) 'Edema', 'Mass' \(has: file, pid, study, view, split, A, B\)"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\nb.png,2,s,PA,dev,1,0\nc.png,3,s,PA,,1,0\nd.png,4,s,PA,dev,0,0\n", {},
     r"labels.csv: column 'split': split value\(s\) '', 'dev' \(first on line 3\) are not train, valid, val, "
     r"validate or test"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n,2,s,PA,train,1,0\n", {}, r"labels.csv: line 3: empty 'file'"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\nb.png, ,s,PA,train,1,0\n", {}, r"labels.csv: line 3: empty 'pid'"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n/etc/x.png,2,s,PA,train,1,0\n", {},
     r"labels.csv: line 3: path '/etc/x.png' is not a file path inside --raw"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\nimg/../../x.png,2,s,PA,train,1,0\n", {},
     r"labels.csv: line 3: path 'img/../../x.png' is not a file path inside --raw"),
    (OK_HEAD + "a,1,s,PA,train,1,0\n", {"path_format": "../{}.png"},
     r"labels.csv: line 2: path '../a.png' is not a file path inside --raw"),
    (OK_HEAD + "a,1,s,PA,train,1,0\n", {"path_format": "{}/{}.png"}, r"--path-format '{}/{}.png' needs exactly one {}"),
    (OK_HEAD + "a,1,s,PA,train,1,0\n", {"path_format": "images/x.png"}, r"needs exactly one {}"),
    (OK_HEAD + "a b.png,1,s,PA,train,1,0\na_b.png,2,s,PA,train,1,0\n", {},
     r"labels.csv: a b.png and a_b.png would share the key 'a_b'"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\nb.png,2,s,PA,train,1,0\na.png,3,s,PA,train,0,0\n", {},
     r"labels.csv: rows for image 'a.png' disagree on patient: '1' \(line 2\) and '3' \(line 4\)"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\na.png,1,t,PA,train,0,0\n", {},
     r"rows for image 'a.png' disagree on study: 's' \(line 2\) and 't' \(line 3\)"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\na.png,1,s,,train,0,0\n", {},
     r"rows for image 'a.png' disagree on view: 'PA' \(line 2\) and blank \(line 3\)"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\na.png,1,s,PA,test,0,0\n", {},
     r"rows for image 'a.png' disagree on split: 'train' \(line 2\) and 'test' \(line 3\)"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\nb.png,1,s,PA,test,1,0\n", {}, r"leakage: patient '1' is in both train and test"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n", {"split": "random"}, r"--split random ignores --split-col 'split'"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n", {"split": "official", "split_col": None},
     r"--split official needs --split-col"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n", {"label_cols": ("A", "path")}, r"--label-cols 'path': a label cannot"),
    (OK_HEAD + "a.png,1,s,PA,train,1,0\n", {"table": "nothere.csv"}, r"--table: no file nothere.csv \(nor under "),
])
def test_bad_tables_are_one_line_errors(tmp_path, text, kw, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "labels.csv").write_text(text)
    kw = {"table": str(raw / "labels.csv"), "path_col": "file", "patient_col": "pid", "study_col": "study",
          "view_col": "view", "split_col": "split", "label_cols": ("A", "B"), **kw}
    with pytest.raises(ManifestError) as err:
        build_manifest(raw, ManifestOptions(source="table", **kw))
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def cxr(*args):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def test_cli_manifest_build_and_info(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text(RSNA)
    out = tmp_path / "rsna.parquet"
    result = cxr("manifest", "build", "--source", "table", "--raw", tmp_path, "--table",
                 tmp_path / "stage_2_train_labels.csv", "--path-col", "patientId", "--patient-col", "patientId",
                 "--label-cols", "Target", "--path-format", "stage_2_train_images/{}.dcm", "--ratios", "2:1:1",
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert "4 images, 1 labels" in result.output and "rejects: none" in result.output
    assert "only 0 of 4 images were found" in result.output and "images/<name>" not in result.output
    manifest = read_manifest(out)
    assert manifest.meta["source"] == "table" and manifest.table["Target"].sum() == 2
    info = cxr("manifest", "info", out)
    assert info.exit_code == 0, info.output
    assert "source table, 4 images, 1 labels" in info.output and re.search(r"Target\s+│", info.output)
    bad = cxr("manifest", "build", "--source", "table", "--raw", tmp_path, "--table", "stage_2_train_labels.csv",
              "--path-col", "patientId", "--patient-col", "patientId", "--label-cols", "Target,Opacity",
              "--out", tmp_path / "bad.parquet")
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.stderr.strip() == (f"error: {tmp_path / 'stage_2_train_labels.csv'}: missing column(s) 'Opacity' "
                                  "(has: patientId, x, y, width, height, Target)")
    twice = cxr("manifest", "build", "--source", "table", "--raw", tmp_path, "--table", "stage_2_train_labels.csv",
                "--path-col", "patientId", "--patient-col", "patientId", "--label-cols", "Target,x,Target",
                "--out", tmp_path / "twice.parquet")
    assert twice.exit_code == 1 and twice.stderr.strip() == "error: --label-cols names 'Target' twice"


def test_cli_shard_build_pixels_equal_the_reference(tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    rows = ["Image,Patient,Split,Effusion,Edema"]
    for i, (mode, shape) in enumerate([("L", (60, 40)), ("L", (33, 70)), ("RGB", (50, 50)), ("I;16", (45, 64)),
                                       ("L", (64, 64)), ("L", (30, 90))]):
        y, x = np.mgrid[0:shape[0], 0:shape[1]]
        smooth = (np.sin(x / (9 + i)) + np.cos(y / 11) + 2) / 4    # 0..1, no single-pixel noise
        if mode == "I;16":
            img = Image.fromarray((100 + smooth * 3900).astype(np.uint16))
        elif mode == "RGB":
            img = Image.fromarray(np.stack([smooth * 255, smooth[::-1] * 255, smooth.T[:, ::-1] * 255], -1)
                                  .astype(np.uint8))
        else:
            img = Image.fromarray((smooth * 255).astype(np.uint8))
        img.save(raw / "images" / f"im{i}.png")
        rows.append(f"im{i},pt{i // 2},{('train', 'valid', 'test')[i // 2]},{'yes' if i % 2 else 'no'},{i % 3 - 1}")
    rows.append("im9,pt9,train,1,1")                    # listed, but no file: a pixel reject
    (raw / "labels.csv").write_text("\n".join(rows) + "\n")
    result = cxr("shard", "build", "--source", "table", "--raw", raw, "--table", raw / "labels.csv",
                 "--path-col", "Image", "--path-format", "images/{}.png", "--patient-col", "Patient",
                 "--label-cols", "Effusion,Edema", "--split-col", "Split", "--uncertain", "ignore",
                 "--out", tmp_path / "out", "--size", 32, "--workers", 1, "--quiet", "--max-reject-fraction", "0.5")
    assert result.exit_code == 0, result.output
    set_dir = tmp_path / "out" / "table-32"
    table = check_set(set_dir, raw, size=32, expect=6)
    labels = table.set_index("key")[["Effusion", "Edema"]]
    assert labels.loc["images_im5"].tolist() == [1.0, 1.0] and labels.loc["images_im4"].tolist() == [0.0, 0.0]
    assert labels.loc["images_im0", "Effusion"] == 0.0 and np.isnan(labels.loc["images_im0", "Edema"])   # -1: ignore
    rejects = pd.read_parquet(set_dir / "rejects.parquet")
    assert rejects["key"].tolist() == ["images_im9"]
    card = json.loads((set_dir / "dataset.json").read_text())
    assert card["labels"] == ["Effusion", "Edema"] and card["source"] == "table"
