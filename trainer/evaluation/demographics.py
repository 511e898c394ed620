"""`cxr eval --demographics FILE [--demographics-key COL]`: patient columns joined onto a predictions table.

Rules (`join_demographics`):
- FILE is CSV, CSV.gz or Parquet (.parquet, .pq). CSV cells are read as text, only blank cells missing.
- The key column holds the patient id as the predictions' `patient_id` writes it (compared as text;
  integers stored as numbers compare without a decimal point: 10000032, not 10000032.0). Without `key`
  the table must be MIMIC-IV's `patients.csv(.gz)`: key `subject_id`, which is what a MIMIC-CXR manifest's
  patient_id holds (the subject_id as written, no `p` prefix; manifests/mimic.py), `gender` -> `sex`,
  `anchor_age` -> `age` (MIMIC-IV's age in the patient's anchor year, 91 for anyone older than 89).
- In any table a column named sex or gender (any case) becomes `sex` and one named age or anchor_age
  becomes `age`, by `manifests.demographics`' rules (F/M/Female/Male, Unknown -> missing; years, above
  120 -> missing; a bad value is an error naming file, line, column and value). Every other column is
  added as it is read (text from CSV), under its own name, and can be a grouping column (race,
  insurance, ...).
- A patient with several rows: rows that agree are one; rows that disagree on a column are an error
  naming the patient, the column and two of the values. A missing key column is an error naming the file
  and the column. A column that would replace key, set, patient_id, split, a label or a probability is an
  error.
- Joining by patient: a matched patient's images take the table's values (replacing sex, age or any other
  column already there); an unmatched image keeps the value it had, or missing for a new column.
  `set_name` restricts the join to the rows of one shard set (patient ids are per set).
  `result.attrs["demographics"]` says what was joined: file, key, columns, matched and unmatched patients.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.demographics import parse_age, parse_sex
from trainer.metrics import PROB_PREFIX, EvalError

MIMIC_KEY = "subject_id"
SEX_NAMES = ("sex", "gender")
AGE_NAMES = ("age", "anchor_age")
PARQUET_SUFFIXES = (".parquet", ".pq")
PROTECTED = ("key", "set", "patient_id", "split")


def read_demographics(path: str | os.PathLike, key: str | None = None) -> pd.DataFrame:
    """One row per patient: `patient_id` (text) and the table's other columns, sex and age by the shared
    rules. Errors as in the module's rules."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--demographics: no file {path}")
    frame, where = _read(path)
    key_column = key if key is not None else MIMIC_KEY
    if key_column not in frame.columns:
        hint = "" if key is not None else (" (a MIMIC-IV patients table has it; for another table give "
                                           "--demographics-key COL)")
        raise EvalError(f"{path}: no column {key_column!r}{hint} (has: {', '.join(map(str, frame.columns))})")
    ids = _as_text(frame[key_column]).str.strip()
    blank = (ids.isna() | (ids == "")).to_numpy()
    if blank.any():
        raise EvalError(f"{path}: {where(int(blank.argmax()))}: empty {key_column!r}")
    out = pd.DataFrame({"patient_id": ids})
    renamed = {}
    for column in frame.columns:
        if column == key_column:
            continue
        lower = str(column).lower()
        if lower in SEX_NAMES and "sex" not in renamed.values():
            out["sex"] = parse_sex(frame[column], path, column, where)
            renamed[column] = "sex"
        elif lower in AGE_NAMES and "age" not in renamed.values():
            out["age"], _ = parse_age(frame[column], path, column, where)
            renamed[column] = "age"
        else:
            out[str(column)] = frame[column]
    return _one_row_per_patient(out, path, key_column, renamed)


def join_demographics(predictions: pd.DataFrame, path: str | os.PathLike, key: str | None = None,
                      set_name: str | None = None) -> pd.DataFrame:
    """`predictions` with the table's columns joined by patient (a copy; rows and order unchanged)."""
    table = read_demographics(path, key)
    columns = [c for c in table.columns if c != "patient_id"]
    labels = [c[len(PROB_PREFIX):] for c in predictions.columns if c.startswith(PROB_PREFIX)]
    clash = [c for c in columns if c in PROTECTED or c in labels or c.startswith(PROB_PREFIX)]
    if clash:
        raise EvalError(f"{path}: column {clash[0]!r} would replace the predictions' own {clash[0]!r}; "
                        "rename or drop it")
    out = predictions.copy()
    rows = np.ones(len(out), dtype=bool)
    if set_name is not None:
        if "set" not in out.columns:
            raise EvalError(f"--demographics for set {set_name!r}: the predictions have no set column")
        rows = (out["set"].astype(str) == set_name).to_numpy()
    ids = out["patient_id"].astype(str).to_numpy()
    position = pd.Index(table["patient_id"]).get_indexer(ids)
    matched = rows & (position >= 0)
    for column in columns:
        values = table[column].to_numpy()[position[matched]]
        if column not in out.columns:
            dtype = np.float64 if column == "age" else ("str" if column == "sex" else None)
            out[column] = pd.Series(np.nan, index=out.index, dtype=dtype) if dtype else pd.Series(
                np.full(len(out), None, dtype=object), index=out.index)
        current = out[column].astype(object).to_numpy(copy=True)
        current[matched] = values
        out[column] = _typed(current, column, table[column], out.index)
    wanted = set(ids[rows])
    out.attrs["demographics"] = {
        "file": str(path), "key": key if key is not None else MIMIC_KEY, "columns": columns, "set": set_name,
        "patients_matched": int(len(set(ids[matched]))), "patients_unmatched": int(len(wanted - set(ids[matched]))),
        "images_matched": int(matched.sum()), "images_unmatched": int((rows & ~matched).sum()),
    }
    return out


def _typed(values: np.ndarray, column: str, source: pd.Series, index: pd.Index) -> pd.Series:
    """The joined column in a plain dtype: age float64, sex and text columns str (missing kept), numbers numeric."""
    if column == "age":
        return pd.Series(pd.to_numeric(values, errors="coerce"), index=index, dtype=np.float64)
    missing = pd.isna(values)
    if column == "sex" or source.dtype == "str" or source.dtype == object:
        return pd.Series(np.where(missing, None, values), index=index, dtype="str")
    return pd.Series(values, index=index).infer_objects()


def _read(path: Path):
    """(every column, as text for CSV; how to name a row position)."""
    try:
        if path.name.lower().endswith(PARQUET_SUFFIXES):
            import pyarrow.parquet as pq

            frame = pq.read_table(path).to_pandas().reset_index(drop=True)
            return frame, lambda position: f"row index {int(position)}"
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, UnicodeDecodeError, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvalError(f"{path}: cannot read the demographics table ({first})") from None
    return frame, lambda position: f"line {int(position) + 2}"


def _as_text(column: pd.Series) -> pd.Series:
    """Ids as text: whole numbers without a decimal point (10000032, not 10000032.0); missing stays missing."""
    if column.dtype.kind in "iu":
        return column.astype(str).astype("str")
    if column.dtype.kind == "f":
        values = column.to_numpy(dtype=np.float64)
        whole = np.isfinite(values) & (values == np.round(values))
        text = np.where(whole, pd.Series(np.where(whole, values, 0)).astype(np.int64).astype(str), column.astype(str))
        return pd.Series(text, index=column.index, dtype="str").where(column.notna())
    return column.astype("str").where(column.notna())


def _one_row_per_patient(table: pd.DataFrame, path: Path, key: str, renamed: dict) -> pd.DataFrame:
    """Rows of one patient that agree become one; rows that disagree are an error naming the patient."""
    if table["patient_id"].is_unique:
        return table.reset_index(drop=True)
    original = {new: old for old, new in renamed.items()}
    for column in table.columns:
        if column == "patient_id":
            continue
        cells = table[column].astype(object).where(table[column].notna(), "\0missing").astype(str)
        pairs = pd.DataFrame({"patient_id": table["patient_id"], "value": cells}).drop_duplicates()
        again = pairs["patient_id"].duplicated(keep=False).to_numpy()
        if again.any():
            patient = sorted(pairs["patient_id"][again])[0]
            values = [v if v != "\0missing" else "blank" for v in pairs["value"][pairs["patient_id"] == patient]]
            raise EvalError(f"{path}: patient {patient!r} ({key}) has rows that disagree on "
                            f"{original.get(column, column)!r}: {values[0]!r} and {values[1]!r}")
    return table.drop_duplicates("patient_id").reset_index(drop=True)
