"""Reading the label tables (CSV: every value as text; Parquet: stored dtypes), every problem a ManifestError naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from manifests.errors import ManifestError


def find_table(raw: Path, names: list[str]) -> Path | None:
    """The first of `names` (relative to `raw`) that exists, each tried as given and with `.gz`."""
    for name in names:
        for candidate in (raw / name, raw / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_csv_table(path: Path, required: list[str], optional: list[str] = (), numeric: list[str] = (),
                   literal: bool = False) -> pd.DataFrame:
    """Read `required` (+ any present `optional`) columns of a .csv or .csv.gz as strings.

    `numeric` columns (a subset of `required`) are read as float64 when every cell parses; if one does
    not, the whole table comes back as strings so the caller can name the bad line.

    Ids stay text ('50414267' compares as text, leading zeros survive); blank cells become NaN.
    `literal=True`: only blank cells are missing ('NA', 'null', 'nan' stay text, for the caller to judge).
    Row i of the frame is line i + 2 of the file (see `line_of`).
    """
    na = {"keep_default_na": False, "na_values": [""]} if literal else {}
    try:
        header = pd.read_csv(path, nrows=0)
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        raise ManifestError(f"{path}: cannot read as CSV ({_first_line(exc)})") from None
    columns = list(header.columns)
    wanted = _wanted_columns(path, columns, required, optional)
    try:
        if numeric:
            dtypes = {c: ("float64" if c in numeric else "str") for c in wanted}
            try:
                return pd.read_csv(path, usecols=wanted, dtype=dtypes, engine="pyarrow", **na)[wanted]
            except (ValueError, TypeError):
                pass   # a cell is not a number: read as text below, the caller finds and names it
        return pd.read_csv(path, usecols=wanted, dtype=str, engine="pyarrow", **na)[wanted]
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        raise ManifestError(f"{path}: cannot read as CSV ({_first_line(exc)})") from None


def read_parquet_table(path: Path, required: list[str], optional: list[str] = ()) -> pd.DataFrame:
    """Read `required` (+ any present `optional`) columns of a Parquet file, each in its stored dtype.

    Same missing-column message as `read_csv_table`. Row i of the frame is the file's row index i
    (0-based; there is no header line to count).
    """
    try:
        columns = list(pq.read_schema(path).names)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ManifestError(f"{path}: cannot read as Parquet ({_first_line(exc)})") from None
    wanted = _wanted_columns(path, columns, required, optional)
    try:
        return pq.read_table(path, columns=wanted).to_pandas()[wanted].reset_index(drop=True)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ManifestError(f"{path}: cannot read as Parquet ({_first_line(exc)})") from None


def _wanted_columns(path: Path, columns: list[str], required, optional) -> list[str]:
    """`required` then the present `optional` columns; an error naming the file and any missing required one."""
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                            f"(has: {', '.join(columns)})")
    return list(required) + [c for c in optional if c in columns and c not in required]


def line_of(position: int) -> int:
    """1-based line number in the CSV file of the frame's row `position` (line 1 is the header)."""
    return int(position) + 2


def require_unique(frame: pd.DataFrame, column: str, path: Path, what: str) -> None:
    """ManifestError naming the first two lines that share a value of `column` (frame has a RangeIndex)."""
    values = frame[column]
    if pc.count_distinct(_arrow_text(values), mode="all").as_py() == len(values):
        return
    duplicated = values.duplicated(keep=False).to_numpy()
    first = values.iloc[duplicated.argmax()]
    lines = (values == first).to_numpy().nonzero()[0][:2]
    raise ManifestError(f"{path}: duplicate {what} {first!r} on lines {line_of(lines[0])} and {line_of(lines[1])}")


def require_filled(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    """ManifestError naming the line of the first blank cell in `columns`."""
    for column in columns:
        blank = frame[column].isna() | (frame[column].str.strip() == "")
        if blank.any():
            raise ManifestError(f"{path}: line {line_of(blank.to_numpy().argmax())}: empty {column!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def isin_text(values, candidates) -> np.ndarray:
    """Boolean mask: which of `values` (strings, NaN never matches) are in `candidates`.

    pandas' `str` dtype `isin` converts every candidate in a Python loop (seconds at 100k rows);
    this hands both sides to Arrow's hash lookup.
    """
    haystack = _combined(_arrow_text(candidates))
    mask = pc.is_in(_arrow_text(values), value_set=haystack)
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool) & ~pd.isna(np.asarray(values, dtype=object))


def lookup_text(values, keys, targets) -> np.ndarray:
    """`targets[i]` where `keys[i] == value` for each of `values` (keys unique); NaN/None where absent.

    Returns an object array. Arrow's hash lookup, like `isin_text`.
    """
    found = pc.index_in(_arrow_text(values), value_set=_combined(_arrow_text(keys))).to_numpy(zero_copy_only=False)
    targets = np.asarray(targets, dtype=object)
    out = np.full(len(found), np.nan, dtype=object)
    hit = ~pd.isna(found)
    out[hit] = targets[found[hit].astype(np.int64)]
    return out


def sort_order_text(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Row positions that sort `frame` by `columns` ascending, compared as text (stable)."""
    table = pa.table({c: _arrow_text(frame[c]) for c in columns})
    return pc.sort_indices(table, sort_keys=[(c, "ascending") for c in columns]).to_numpy()


def _combined(array):
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _arrow_text(values):
    if isinstance(values, (pd.Series, pd.Index)) and values.dtype == "str":
        array = pa.array(values)          # zero-copy view of pandas' Arrow-backed strings
        return array.cast(pa.large_string()) if array.type != pa.large_string() else array
    return pa.array(pd.Series(values, dtype="str").to_numpy(dtype=object, na_value=None), type=pa.large_string())
