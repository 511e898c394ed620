"""Shared test fixtures.

Real data lives in `$CXR_TEST_DATA`, default `../shared/data` beside the repo (CI has it there). A bare
clone without it still passes: every test that needs the real files asks for `shared_data`, which skips
with a one-line reason naming where the files were looked for.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
# what the tests read (see ../shared/data/README.md)
REAL_FILES = ("nih/Data_Entry_2017_v2020.csv.gz", "nih/train_val_list.txt", "nih/test_list.txt", "real/nih-1024",
              "real/nih-512", "real/kermany")


def real_data_root() -> Path:
    """`$CXR_TEST_DATA` (relative to the working directory) when set, else ../shared/data beside the repo."""
    given = os.environ.get("CXR_TEST_DATA")
    return Path(given).expanduser().resolve() if given else DEFAULT_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = real_data_root()
    missing = [name for name in REAL_FILES if not (root / name).exists()]
    if missing:
        pytest.skip(f"real test data not found: no {missing[0]} in {root} (set CXR_TEST_DATA; default ../shared/data)")
    return root
