"""Shared test fixtures: the few real files in `tests/data/`, phantom raw trees, and the optional full NIH table.

A bare clone runs every test (CUDA tests aside): nothing here reads outside the repository unless asked to.
- `real_data`: `tests/data/` (see its README.md): 3 NIH PNGs as released, 2 downscaled ones, 12 Kermany
  JPEGs, and the NIH table and official split lists cut down to patients 1-1000 and 27426. Fidelity tests
  (pixels of real files, real layouts) read these.
- `phantom_kermany`: a folder set in Kermany's exact layout, drawn by `phantom`: for behaviour tests
  (resume, faults, locks, pieces...) that need no real pixels. Made once per test process.
- `full_nih_root()`: the folder holding the whole 112,120-row NIH table and lists, when there is one:
  `$CXR_TEST_DATA`, else `../shared/data` beside the repo. Tests that check the whole table run on it
  in addition to the subset; without it they are not collected for it (no skip).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
DEFAULT_FULL_DATA = REPO.parent / "shared" / "data"
FULL_NIH_FILES = ("nih/Data_Entry_2017_v2020.csv.gz", "nih/train_val_list.txt", "nih/test_list.txt")


def full_nih_root() -> Path | None:
    """`$CXR_TEST_DATA` (relative to the working directory) when set, else ../shared/data beside the repo;
    None unless it holds the whole NIH table and both official lists."""
    given = os.environ.get("CXR_TEST_DATA")
    root = Path(given).expanduser().resolve() if given else DEFAULT_FULL_DATA
    return root if all((root / name).is_file() for name in FULL_NIH_FILES) else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """tests/data: the few real files the fidelity tests read (in the repository, always there)."""
    return TEST_DATA


@pytest.fixture(scope="session")
def phantom_kermany(tmp_path_factory) -> Path:
    """A phantom folder set in Kermany's layout (tests/raw_trees.py), shared by the tests of a process: a
    test that changes sources copies them first."""
    from tests.raw_trees import write_kermany

    return write_kermany(tmp_path_factory.mktemp("phantom-kermany"))
