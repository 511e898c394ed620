"""Tables stay whole when output goes to a file or pipe (nohup, SLURM logs): no wrapping at 80 columns."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from manifests.build import ManifestOptions, build_manifest
from manifests.table import write_manifest

REPO = Path(__file__).resolve().parents[1]
LABEL = "A label name long enough that a table at eighty columns must wrap it"


def test_info_table_rows_are_not_wrapped_in_a_pipe(tmp_path):
    for cls in ("normal", "abnormal"):
        for i in range(5):
            path = tmp_path / "raw" / cls / f"{cls}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.full((8, 8), 9 * i, np.uint8))
    manifest = build_manifest(tmp_path / "raw", ManifestOptions(source="folder", label=LABEL))
    write_manifest(manifest, tmp_path / "m.parquet")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-m", "cli", "manifest", "info", str(tmp_path / "m.parquet")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if LABEL in line]
    assert len(rows) == 1, done.stdout
    assert rows[0].count("%") == 3, rows[0]   # the label and its three splits on one line
