"""`--source table`: any CSV (.csv, .csv.gz) or Parquet (.parquet, .pq) of labels, one or more rows per image.

Rules (every problem is one ManifestError naming the file, the line (CSV; line 1 is the header) or the
row index (Parquet; 0 is the first row), the column and the value):
- `--table` as given if it exists (absolute, or relative to the cwd), else relative to `--raw`.
- Path: the `--path-col` value, stripped, put into `--path-format` (exactly one `{}`) when given; it is
  relative to `--raw`, POSIX; an absolute path (`/x`, `C:/x`) or a `..` part is an error, `.` parts and
  repeated `/` are dropped. Blank path or patient cells are an error. Study, view: stripped, blank -> none.
- Labels (`--label-cols`, in that order): 1, 0, -1, 1.0, 0.0, -1.0, true/false, yes/no (any case), blank;
  anything else is an error. -1 follows `--uncertain` and blank is 0 (`manifests.labels.apply_uncertain`).
- Several rows for one path are one image: each label is the maximum over its rows after the uncertain
  policy (NaN only when every row is NaN); rows that disagree on patient, study, view or split are an
  error naming the image.
- `--sex-col` / `--age-col` (optional; without them both are missing): `manifests.demographics`' rules
  (F/M/Female/Male, Unknown -> missing; years or 045Y/006M/010W/003D, above 120 -> missing and counted in
  `meta["demographics"]`); any other value is an error naming the row, column and value. Rows of one
  path that disagree on sex or age are an error, as for the patient.
- Keys as for folder sets (`manifests.table.path_keys`); two paths with one key are an error naming both.
- Split: `--split-col` values train, valid, val, validate, test (any case); any other value, blank
  included, is an error listing them. `--split auto|official` use the column (official requires it);
  without it, auto/random are a seeded patient-level split by `--ratios`, stratified by "any positive
  label" (a patient with one positive image counts as positive). `--split random` with `--split-col`
  is an error (drop one of the two).
- Images are not opened: `meta["images_found"]` counts the paths that exist (one listing per folder);
  the shard build rejects the ones it cannot read. Nothing is left out here, so rejects are empty.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.csvtable import line_of, read_csv_table, read_parquet_table
from manifests.demographics import demographics_meta, missing_demographics, parse_age, parse_sex
from manifests.errors import ManifestError
from manifests.labels import apply_uncertain
from manifests.options import ManifestOptions
from manifests.splits import patient_splits
from manifests.table import RESERVED_COLUMNS, empty_rejects, path_keys

PARQUET_SUFFIXES = (".parquet", ".pq")
SPLIT_VALUES = {"train": "train", "valid": "valid", "val": "valid", "validate": "valid", "test": "test"}
LABEL_WORDS = {"true": 1.0, "yes": 1.0, "false": 0.0, "no": 0.0}
EXPECTED = "expected 1, 0, -1, blank, 1.0/0.0, true/false or yes/no"

Where = Callable[[int], str]   # frame row position -> "line N" (CSV) or "row index N" (Parquet)


def build_label_table(raw: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict, list[str]]:
    """(table, rejects, meta, labels) for `--source table`. The table is not yet conformed or audited."""
    labels = list(options.label_cols)
    _check_options(options)
    path = resolve_table(raw, options.table)
    frame, where = _read(path, options)

    for column in (options.path_col, options.patient_col):
        blank = frame[column].isna().to_numpy()
        if blank.any():
            raise ManifestError(f"{path}: {where(blank.argmax())}: empty {column!r}")
    rows = pd.DataFrame({
        "path": _paths(frame[options.path_col], options.path_format, path, where),
        "patient_id": frame[options.patient_col],
        "study_id": frame[options.study_col] if options.study_col else None,
        "view": frame[options.view_col] if options.view_col else None,
        "split": _split_values(frame[options.split_col], options.split_col, path, where)
        if options.split_col else None,
    })
    demographics, above = missing_demographics(len(frame), frame.index), 0
    if options.sex_col:
        demographics["sex"] = parse_sex(frame[options.sex_col], path, options.sex_col, where)
    if options.age_col:
        demographics["age"], above = parse_age(frame[options.age_col], path, options.age_col, where)
    rows["sex"], rows["age"] = demographics["sex"], demographics["age"]
    values = np.column_stack([_label_values(frame[c], c, path, where) for c in labels])
    values = apply_uncertain(values, options.uncertain)

    images, combined = _combine(rows, values, path, where)
    images["key"] = path_keys(images["path"])
    clash = images["key"].duplicated(keep=False).to_numpy()
    if clash.any():
        shared = images["key"][clash].iloc[0]
        a, b = images["path"][images["key"] == shared].iloc[:2]
        raise ManifestError(f"{path}: {a} and {b} would share the key {shared!r}")

    positive = (np.nan_to_num(combined, nan=0.0) > 0).any(axis=1).astype(np.int8)
    images["split"] = _splits(images, pd.Series(positive, index=images.index), options)
    table = pd.DataFrame({
        "key": images["key"], "source": "table", "path": images["path"], "patient_id": images["patient_id"],
        "study_id": images["study_id"], "view": images["view"], "split": images["split"],
    })
    for i, label in enumerate(labels):
        table[label] = combined[:, i]
    table["sex"], table["age"] = images["sex"], images["age"]
    meta = {"table": str(path.resolve()), "table_rows": len(frame),
            "images_found": _count_found(raw, images["path"]),
            "demographics": demographics_meta(options.sex_col, options.age_col, above)}
    return table, empty_rejects(), meta, labels


def resolve_table(raw: Path, table: str) -> Path:
    """`table` as given (absolute, or relative to the cwd) if it is a file, else `raw/table`."""
    given = Path(table)
    if given.is_file():
        return given
    if not given.is_absolute() and (raw / given).is_file():
        return raw / given
    where = str(given) if given.is_absolute() else f"{given} (nor under {raw})"
    raise ManifestError(f"--table: no file {where}")


def _check_options(options: ManifestOptions) -> None:
    """Option combinations only `--source table` can judge."""
    fmt = options.path_format
    if fmt is not None and fmt.count("{}") != 1:
        raise ManifestError(f"--path-format {fmt!r} needs exactly one {{}} (where the --path-col value goes)")
    both = [c for c in options.label_cols if c in (options.sex_col, options.age_col)]
    if both:
        raise ManifestError(f"--label-cols {both[0]!r} is also --sex-col or --age-col: a column is one or the other")
    clash = [c for c in options.label_cols if c in RESERVED_COLUMNS]
    if clash:
        raise ManifestError(f"--label-cols {', '.join(repr(c) for c in clash)}: a label cannot be named like a "
                            f"manifest column ({', '.join(RESERVED_COLUMNS)})")
    if options.split_col and options.split == "random":
        raise ManifestError(f"--split random ignores --split-col {options.split_col!r}; drop one of the two")
    if not options.split_col and options.split == "official":
        raise ManifestError("--split official needs --split-col (the column holding train/valid/test)")


def _read(path: Path, options: ManifestOptions) -> tuple[pd.DataFrame, Where]:
    """The needed columns (ids as stripped text, blank -> NaN; labels as read) and how to name a row."""
    ids = [c for c in (options.path_col, options.patient_col, options.study_col, options.view_col,
                       options.split_col) if c]
    labels = list(options.label_cols)
    demographics = [c for c in (options.sex_col, options.age_col) if c]
    wanted = list(dict.fromkeys([*ids, *labels, *demographics]))
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        frame = read_parquet_table(path, wanted)
        where: Where = lambda position: f"row index {int(position)}"  # noqa: E731
    else:
        frame = read_csv_table(path, wanted, numeric=[c for c in labels if c not in ids and c not in demographics],
                               literal=True)
        where = lambda position: f"line {line_of(position)}"  # noqa: E731
    out = pd.DataFrame({c: frame[c] for c in wanted})
    for column in dict.fromkeys(ids):
        text = _as_text(frame[column]).str.strip()
        out[column] = text.where(text != "")
    return out, where


def _as_text(column: pd.Series) -> pd.Series:
    """Cells as text (ids written as integers stay integers: 17, not 17.0); missing stays missing."""
    if column.dtype.kind == "f":
        values = column.to_numpy(dtype=np.float64)
        whole = np.isfinite(values) & (values == np.round(values))
        text = np.where(whole, pd.Series(values).where(whole, 0).astype(np.int64).astype(str), column.astype(str))
        return pd.Series(text, index=column.index, dtype="str").where(column.notna())
    return column.astype("str").where(column.notna())


def _paths(values: pd.Series, fmt: str | None, path: Path, where: Where) -> pd.Series:
    """Image paths relative to raw: formatted, `.` parts and repeated `/` dropped; escaping ones refused."""
    if fmt is not None:
        before, after = fmt.split("{}")
        values = before + values + after
    values = values.str.replace(r"/{2,}", "/", regex=True)
    values = values.str.replace(r"(?:^|(?<=/))\.(?:/|$)", "", regex=True)
    escapes = (values.str.startswith("/") | values.str.match(r"[A-Za-z]:[/\\]")
               | values.str.contains(r"(?:^|/)\.\.(?:/|$)") | (values == "")).to_numpy()
    if escapes.any():
        at = int(escapes.argmax())
        raise ManifestError(f"{path}: {where(at)}: path {values.iloc[at]!r} is not a file path inside --raw "
                            "(absolute, '..' or empty)")
    return values


def _label_values(column: pd.Series, name: str, path: Path, where: Where) -> np.ndarray:
    """float64: 1, 0, -1 (uncertain), NaN (blank). Any other value: ManifestError naming row and value."""
    if column.dtype.kind == "b":
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    if column.dtype.kind in "iuf":
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isnan(values) & ~np.isin(values, (1.0, 0.0, -1.0))
        if bad.any():
            at = int(bad.argmax())
            raise ManifestError(f"{path}: {where(at)}: column {name!r}: value {values[at]:g} is not a label "
                                f"({EXPECTED})")
        return values
    codes, uniques = pd.factorize(column.astype("str").str.strip().str.lower(), use_na_sentinel=True)
    mapped = np.array([_word_value(u) for u in uniques] + [np.nan], dtype=np.float64)  # last: blank (code -1)
    unknown = np.array([_word_value(u) is None for u in uniques] + [False], dtype=bool)
    bad = unknown[codes]
    if bad.any():
        at = int(bad.argmax())
        raise ManifestError(f"{path}: {where(at)}: column {name!r}: value {column.iloc[at]!r} is not a label "
                            f"({EXPECTED})")
    return mapped[codes]


def _word_value(text: str) -> float | None:
    """Value of one lower-cased, stripped label cell; NaN for blank; None when it is not a label."""
    if text == "":
        return np.nan
    if text in LABEL_WORDS:
        return LABEL_WORDS[text]
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value in (1.0, 0.0, -1.0) else None


def _split_values(column: pd.Series, name: str, path: Path, where: Where) -> pd.Series:
    """train/valid/test per row; other values (blank included) are one error listing them all."""
    mapped = column.str.lower().map(SPLIT_VALUES)
    bad = mapped.isna().to_numpy()
    if bad.any():
        values = sorted(set(column[bad].fillna("").tolist()))
        shown = ", ".join(repr(v) for v in values[:8]) + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")
        raise ManifestError(f"{path}: column {name!r}: split value(s) {shown} (first on {where(int(bad.argmax()))}) "
                            "are not train, valid, val, validate or test")
    return mapped.astype("str")


def _combine(rows: pd.DataFrame, values: np.ndarray, path: Path, where: Where) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per distinct path (in first-seen order) and its labels: the maximum over its rows."""
    codes, _ = pd.factorize(rows["path"])
    first = np.unique(codes, return_index=True)[1]
    images = rows.iloc[first].reset_index(drop=True)
    if len(first) == len(rows):
        return images, values
    for column, what in (("patient_id", "patient"), ("study_id", "study"), ("view", "view"), ("split", "split"),
                         ("sex", "sex"), ("age", "age")):
        if rows[column].isna().all():
            continue
        pairs = pd.DataFrame({"code": codes, "value": rows[column].astype(object).fillna("\0blank")}).drop_duplicates()
        again = pairs["code"].duplicated().to_numpy()
        if again.any():
            a, b = pairs.index[(pairs["code"] == pairs["code"][again].iloc[0]).to_numpy()][:2]
            shown = [repr(rows[column].iloc[i]) if pd.notna(rows[column].iloc[i]) else "blank" for i in (a, b)]
            raise ManifestError(f"{path}: rows for image {rows['path'].iloc[a]!r} disagree on {what}: "
                                f"{shown[0]} ({where(a)}) and {shown[1]} ({where(b)})")
    combined = pd.DataFrame(values).groupby(codes, sort=True).max().to_numpy(dtype=np.float32)
    return images, combined


def _splits(images: pd.DataFrame, positive: pd.Series, options: ManifestOptions) -> pd.Series:
    """The split column's value, or a seeded patient split by --ratios stratified by any positive label."""
    if options.split_col:
        return images["split"]
    patients = images["patient_id"]
    return patients.map(patient_splits(patients, options.split_ratios, options.seed, strata=positive))


def _count_found(raw: Path, paths: pd.Series) -> int:
    """How many of `paths` exist under raw: one directory listing per distinct folder, no per-file stat."""
    folders = paths.str.rpartition("/")
    found = 0
    for folder, names in pd.Series(folders[2].to_numpy(), index=folders[0].to_numpy()).groupby(level=0):
        try:
            present = {e.name for e in os.scandir(raw / folder) if not e.is_dir()}
        except OSError:
            continue
        found += int(names.isin(present).sum())
    return found
