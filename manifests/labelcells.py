"""Label cells of the released tables (MIMIC-CXR-JPG, CheXpert): one rule, in one place.

A cell is 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned), as text ("1.0", "-1")
or as a number. Blank and -1 follow `manifests.labels.apply_uncertain` (blank 0.0; -1 by `--uncertain`).
Any other cell is a ManifestError naming the file, the line, the column and the value.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from manifests.csvtable import line_of
from manifests.errors import ManifestError
from manifests.labels import apply_uncertain


def label_matrix(table: pd.DataFrame, labels: list[str] | tuple[str, ...], path: Path, uncertain: str) -> np.ndarray:
    """float32 (rows x labels) from the `labels` columns of `table` (row i = line i + 2 of `path`)."""
    values = np.column_stack([_label_values(table[label], label, path) for label in labels])
    bad = ~np.isnan(values) & ~np.isin(values, (1.0, 0.0, -1.0))
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ManifestError(f"{path}: line {line_of(row)}: {labels[column]!r} is {values[row, column]:g}, "
                            "expected 1, 0, -1 or blank")
    return apply_uncertain(values, uncertain)                       # blank -> 0, -1 -> the policy


def _label_values(column: pd.Series, label: str, path: Path) -> np.ndarray:
    """float64 values of one label column; a cell that is not a number is a ManifestError naming its line."""
    if column.dtype.kind == "f":
        return column.to_numpy(dtype=np.float64)
    text = column.str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    bad = (text.notna() & (text != "")).to_numpy() & np.isnan(values)
    if bad.any():
        at = bad.argmax()
        raise ManifestError(f"{path}: line {line_of(at)}: {label!r} is {text.iloc[at]!r}, expected 1, 0, -1 or blank")
    return values
