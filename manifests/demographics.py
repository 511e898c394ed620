"""Sex and age of every image: read from the source, never guessed. One rule per column, in one place.

- `sex` is "F", "M" or missing. Cells, stripped, any case: F, Female -> F; M, Male -> M; blank, Unknown,
  U, O, Other -> missing (a value that says "not F or M" is not a bad value). Anything else is bad.
- `age` is years as a float, or missing (NaN). Cells: a number >= 0 (57, 57.0) is years; a DICOM age
  string (Value Representation AS: three digits and a unit, "045Y", "006M", "010W", "003D") becomes
  years (months / 12, weeks * 7 / 365.25, days / 365.25); blank and Unknown are missing. Anything else
  (a negative number, "abc") is bad.
- An age above `MAX_AGE` (120) years is missing and counted: the 2017 NIH table holds ages such as 412,
  typing slips of the real age. `ages_above_max` is how many such cells a table had.
- Tables (NIH, CheXpert, `--source table`) stop at a bad cell with a ManifestError naming the file, the
  line (or row index), the column and the value (`parse_sex` / `parse_age` with the caller's `where`).
  DICOM headers (one file at a time) make a bad value missing: `sex_of` / `age_of`, no error; the
  caller then applies `drop_ages_above_max` to the column.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.errors import ManifestError

DEMOGRAPHIC_COLUMNS: tuple[str, ...] = ("sex", "age")
SEXES: tuple[str, ...] = ("F", "M")
MAX_AGE = 120.0
SEX_WORDS: dict[str, str | None] = {"f": "F", "female": "F", "m": "M", "male": "M",
                                    "": None, "unknown": None, "u": None, "o": None, "other": None}
AGE_MISSING_WORDS = ("", "unknown")
AGE_STRING = re.compile(r"^(\d{3})([DWMY])$")
AGE_UNIT_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
SEX_EXPECTED = "expected F, M, Female, Male, Unknown or blank"
AGE_EXPECTED = "expected years >= 0, a DICOM age like 045Y/006M/010W/003D, Unknown or blank"

Where = Callable[[int], str]   # row position -> "line N" (CSV) or "row index N" (Parquet)


def sex_of(text: object) -> str | None:
    """"F", "M" or None for one cell; None also for a value outside the rules (DICOM: never an error)."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    return SEX_WORDS.get(str(text).strip().lower())


def age_of(text: object) -> float:
    """Years for one cell as written (NaN when missing or not an age; DICOM: never an error)."""
    years = _age_years(text)
    return np.nan if years is None else years


def drop_ages_above_max(values) -> tuple[np.ndarray, int]:
    """(float64 years with every age above MAX_AGE made NaN; how many were)."""
    values = np.asarray(values, dtype=np.float64)
    above = values > MAX_AGE
    return np.where(above, np.nan, values), int(above.sum())


def parse_sex(column: pd.Series, path: Path | str, name: str, where: Where) -> pd.Series:
    """"F"/"M"/missing per row (pandas str dtype); a bad cell is a ManifestError naming file, row, column, value."""
    codes, uniques = pd.factorize(column.astype("str").str.strip().str.lower(), use_na_sentinel=True)
    known = [u in SEX_WORDS for u in uniques]
    bad = ~np.array(known + [True], dtype=bool)[codes]
    if bad.any():
        at = int(bad.argmax())
        raise ManifestError(f"{path}: {where(at)}: column {name!r}: value {column.iloc[at]!r} is not a sex "
                            f"({SEX_EXPECTED})")
    mapped = np.array([SEX_WORDS[u] for u in uniques] + [None], dtype=object)[codes]
    return pd.Series(mapped, index=column.index, dtype="str")


def parse_age(column: pd.Series, path: Path | str, name: str, where: Where) -> tuple[pd.Series, int]:
    """(years per row, float64 NaN when missing; how many cells were above MAX_AGE and made missing).

    A bad cell is a ManifestError naming file, row, column and value.
    """
    if column.dtype.kind in "iuf":
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = values < 0
        shown = lambda at: f"{values[at]:g}"  # noqa: E731
    else:
        codes, uniques = pd.factorize(column.astype("str").str.strip(), use_na_sentinel=True)
        parsed = [_age_years(u) for u in uniques]
        bad = np.array([p is None for p in parsed] + [False], dtype=bool)[codes]
        values = np.array([np.nan if p is None else p for p in parsed] + [np.nan], dtype=np.float64)[codes]
        shown = lambda at: repr(column.iloc[at])  # noqa: E731
    if bad.any():
        at = int(bad.argmax())
        raise ManifestError(f"{path}: {where(at)}: column {name!r}: value {shown(at)} is not an age ({AGE_EXPECTED})")
    values, above = drop_ages_above_max(values)
    return pd.Series(values, index=column.index, dtype=np.float64), above


def missing_demographics(n: int, index=None) -> dict[str, pd.Series]:
    """{"sex": all missing, "age": all NaN} for a source that records neither (MIMIC-CXR, class folders)."""
    index = pd.RangeIndex(n) if index is None else index
    return {"sex": pd.Series(np.nan, index=index, dtype="str"), "age": pd.Series(np.nan, index=index, dtype=np.float64)}


def demographics_meta(sex_column: str | None, age_column: str | None, ages_above_max: int) -> dict:
    """The manifest meta's `demographics` entry: where sex and age were read, and the ages made missing."""
    return {"sex_column": sex_column, "age_column": age_column, "max_age": MAX_AGE, "ages_above_max": int(ages_above_max)}


def _age_years(text: object) -> float | None:
    """Years >= 0 of one cell, NaN when it is missing, None when it is not an age."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return np.nan
    if isinstance(text, (int, float, np.integer, np.floating)):
        return float(text) if text >= 0 else None
    cell = str(text).strip()
    if cell.lower() in AGE_MISSING_WORDS:
        return np.nan
    found = AGE_STRING.match(cell)
    if found:
        return int(found.group(1)) * AGE_UNIT_YEARS[found.group(2)]
    try:
        years = float(cell)
    except ValueError:
        return None
    return years if np.isfinite(years) and years >= 0 else None
