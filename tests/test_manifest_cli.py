"""`cxr manifest build|info`: documented options, summaries, and one-line errors (never a traceback)."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli.app import _register, app
from manifests.table import read_manifest

_register()
runner = CliRunner()

OPTIONS = ["--source", "--raw", "--out", "--seed", "--views", "--valid-fraction", "--labels", "--uncertain", "--split",
           "--fetch-list", "--label", "--ratios", "--patient-pattern", "--rejects"]
NIH_HEADER = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"


def cxr(*args: str):
    return runner.invoke(app, [str(a) for a in args], terminal_width=200)


def test_build_help_documents_every_option():
    result = cxr("manifest", "build", "--help")
    assert result.exit_code == 0
    for option in OPTIONS:
        row = re.compile(rf"^│\s+(\*\s+)?{option}\s+\S+\s+\w+")   # option, metavar, start of its help
        assert any(row.match(line) for line in result.output.splitlines()), f"{option} missing or without help"


def test_build_then_info_on_real_kermany(real_data, tmp_path):
    out, rejects, fetch = tmp_path / "k.parquet", tmp_path / "rejects.parquet", tmp_path / "fetch.txt"
    result = cxr("manifest", "build", "--source", "folder", "--label", "Pneumonia", "--raw",
                 real_data / "real" / "kermany", "--out", out, "--patient-pattern", r"person(\d+)_",
                 "--ratios", "6:2:2", "--rejects", rejects, "--fetch-list", fetch, "--seed", "3")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert len(manifest.table) == 12 and manifest.meta["options"]["ratios"] == pytest.approx([0.6, 0.2, 0.2])
    for split in ("train", "valid", "test"):
        assert re.search(rf"{split}\s+│\s+{(manifest.table['split'] == split).sum()}\s+│", result.output)
    assert "rejects: none" in result.output
    assert len(pd.read_parquet(rejects)) == 0
    assert len(fetch.read_text().splitlines()) == 12

    info = cxr("manifest", "info", out)
    assert info.exit_code == 0, info.output
    assert "source folder, 12 images, 1 labels" in info.output
    assert re.search(r"Pneumonia\s+│", info.output)


def test_build_prints_rejects_by_reason(tmp_path):
    raw = tmp_path / "raw"
    (raw / "normal").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.txt", "d.txt", "e.csv"):
        (raw / "normal" / name).write_bytes(b"")
    (raw / "abnormal").mkdir()
    (raw / "abnormal" / "f.png").write_bytes(b"")     # a folder set needs two classes
    result = cxr("manifest", "build", "--source", "folder", "--raw", raw, "--out", tmp_path / "m.parquet",
                 "--ratios", "1:0:0")
    assert result.exit_code == 0, result.output
    assert "rejects: 3" in result.output
    assert re.search(r"not an image file \(\.txt\)\s+│\s+2", result.output)
    assert re.search(r"not an image file \(\.csv\)\s+│\s+1", result.output)


def write_nih(raw: Path, rows: list[str], header: str = NIH_HEADER) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "Data_Entry_2017.csv").write_text("\n".join([header, *rows]) + "\n")
    return raw


GOOD = ["00000001_000.png,Cardiomegaly,0,1,57,M,PA", "00000002_000.png,No Finding,0,2,40,F,AP"]


@pytest.mark.parametrize("setup, args, message", [
    (lambda raw: raw.mkdir(), [], "no NIH table"),
    (lambda raw: write_nih(raw, GOOD, NIH_HEADER.replace("Finding Labels", "Findings")), [],
     r"Data_Entry_2017.csv: missing column\(s\) 'Finding Labels'"),
    (lambda raw: write_nih(raw, GOOD + ["00000003_000.png,Cardiomegaly|Flu,0,3,30,F,PA"], NIH_HEADER), [],
     r"Data_Entry_2017.csv: line 4: unknown finding 'Flu'"),
    (lambda raw: write_nih(raw, GOOD + [GOOD[0]], NIH_HEADER), [],
     r"Data_Entry_2017.csv: duplicate Image Index '00000001_000.png' on lines 2 and 4"),
    (lambda raw: write_nih(raw, GOOD), ["--ratios", "7:1"], r"--ratios '7:1' must be three"),
    (lambda raw: write_nih(raw, GOOD), ["--uncertain", "maybe"], r"--uncertain 'maybe' is not one of"),
    (lambda raw: write_nih(raw, GOOD), ["--split", "study-digit"], r"--split study-digit applies to --source mimic"),
])
def test_bad_input_is_a_one_line_error(tmp_path, setup, args, message):
    raw = tmp_path / "raw"
    setup(raw)
    result = cxr("manifest", "build", "--source", "nih", "--raw", raw, "--out", tmp_path / "m.parquet", *args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "m.parquet").exists()


def test_bad_split_value_in_mimic_split_file_is_a_one_line_error(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\nd1,10000001,50000001,AP\n")
    labels = ",".join(["subject_id", "study_id", *read_labels()])
    (raw / "mimic-cxr-2.0.0-negbio.csv").write_text(f"{labels}\n10000001,50000001" + ",1.0" * 14 + "\n")
    (raw / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id,study_id,subject_id,split\nd1,50000001,10000001,dev\n")
    result = cxr("manifest", "build", "--source", "mimic", "--raw", raw, "--out", tmp_path / "m.parquet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {raw / 'mimic-cxr-2.0.0-split.csv'}: line 2: split 'dev' is not train, "
                                     "validate or test")


def test_info_on_a_file_that_is_not_a_manifest(tmp_path):
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "plain.parquet")
    result = cxr("manifest", "info", tmp_path / "plain.parquet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not a cxr manifest" in result.stderr


def read_labels() -> list[str]:
    from manifests.vocab import MIMIC_LABELS
    return list(MIMIC_LABELS)


def test_class_folders_from_the_command_line(tmp_path):
    raw = tmp_path / "raw"
    for cls in ("NORMAL", "PNEUMONIA", "COVID"):
        (raw / cls).mkdir(parents=True)
        (raw / cls / f"{cls}-1.png").write_bytes(b"")
    result = cxr("manifest", "build", "--source", "folder", "--raw", raw, "--out", tmp_path / "m.parquet")
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "m.parquet").labels == ["COVID", "PNEUMONIA"]
    result = cxr("manifest", "build", "--source", "folder", "--raw", raw, "--out", tmp_path / "x.parquet",
                 "--label", "Pneumonia")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.strip() == (f"error: {raw}: --label names the one positive class folder, but there are 2 "
                                     "(COVID, PNEUMONIA), each its own label")
