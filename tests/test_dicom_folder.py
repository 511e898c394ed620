"""A folder set of DICOM files end to end: patients from PatientID, pixels by the DICOM rules in the shards."""
from __future__ import annotations

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli.app import _register, app
from cxrshards import open_shards
from cxrshards.pixels import fit_resize
from tests.test_dicom import dicom_dataset, image, reference, write

_register()


def test_dicom_class_folders_build_shards_with_patients_from_the_header(tmp_path):
    raw, expected = tmp_path / "raw", {}
    for i in range(12):
        cls = "abnormal" if i % 3 == 0 else "normal"
        stored = image((40, 52), 0, 4095, np.uint16, seed=i)
        tags = {"PatientID": f"P{i // 2:02d}", "StudyInstanceUID": f"1.2.3.{i}", "ViewPosition": "AP"}
        if i % 2:
            tags.update(PhotometricInterpretation="MONOCHROME1", WindowCenter=2000, WindowWidth=3000)
        ds = dicom_dataset(stored, 12, **{k: v for k, v in tags.items() if k != "PhotometricInterpretation"},
                           photometric=tags.get("PhotometricInterpretation", "MONOCHROME2"))
        name = f"{cls}/img{i:02d}" + (".dcm" if i % 4 else "")      # some known only by DICM at byte 128
        write(raw / name, ds)
        expected[name] = (fit_resize(reference(ds, stored), 32, "pad"), f"P{i // 2:02d}")
    result = CliRunner().invoke(app, ["shard", "build", "--source", "folder", "--raw", str(raw), "--size", "32",
                                      "--out", str(tmp_path / "shards"), "--workers", "1", "--quiet",
                                      "--codec", "png", "--max-reject-fraction", "0"])
    assert result.exit_code == 0, result.output
    shard_dir = tmp_path / "shards" / "folder-32"
    table = pd.read_parquet(shard_dir / "manifest.parquet")
    assert len(table) == 12 and set(table["view"]) == {"AP"}
    by_path = table.set_index("path")
    for name, (_pixels, patient) in expected.items():
        assert by_path.loc[name, "patient_id"] == patient
    assert table.groupby("patient_id")["split"].nunique().max() == 1      # patient-disjoint by PatientID
    keys = dict(zip(table["key"], table["path"]))
    seen = 0
    for split in table["split"].unique():
        for img, _labels, key in open_shards(shard_dir, split, shuffle=False):
            np.testing.assert_array_equal(img[0].numpy(), expected[keys[key]][0])
            seen += 1
    assert seen == 12
