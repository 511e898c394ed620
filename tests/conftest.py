"""Shared test fixtures. Real data lives in ../shared/data (CI has ../shared beside the clone)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real test data missing: expected {SHARED_DATA} (../shared/data beside the repo)"
    return SHARED_DATA
