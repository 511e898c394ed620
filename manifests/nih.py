"""NIH ChestX-ray14: Data_Entry_2017[_v2020].csv[.gz], the official split lists, any images*/ layout.

Choices where the release leaves room:
- Both tables present: `Data_Entry_2017_v2020.csv` wins over `Data_Entry_2017.csv` (plain before .gz).
- `path` is where the image really is when image files exist (`images_001/images/x.png` as in the
  Kaggle copy, `images_001/x.png`, `images/x.png`, or flat in the raw root). A row whose file is not
  found, and every row when no image is present at all, gets `images/<name>`: the manifest needs only
  the tables, and the shard build reports images it cannot read.
- Splits are drawn before `--views` filters rows, so choosing views never moves a patient.
- `patient_id` is the `Patient ID` column as written (e.g. "1"); NIH has no study, so `study_id` is null.
- `sex` from `Patient Gender` (or `Patient Sex`), `age` from `Patient Age` (`manifests.demographics`:
  ages above 120, typing slips such as 412 in the 2017 table, become missing and are counted in
  `meta["demographics"]["ages_above_max"]`). A table without these columns gives missing values.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.csvtable import (find_table, isin_text, line_of, lookup_text, read_csv_table, require_filled,
                                require_unique)
from manifests.demographics import demographics_meta, missing_demographics, parse_age, parse_sex
from manifests.errors import ManifestError
from manifests.options import ManifestOptions
from manifests.splits import patient_splits
from manifests.table import KEY_PATTERN, concat_rejects, make_rejects
from manifests.vocab import NIH_LABELS

TABLE_NAMES = ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"]
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
SEX_COLUMNS = ("Patient Gender", "Patient Sex")
AGE_COLUMN = "Patient Age"


def build_nih(raw: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(table, rejects, meta) for an NIH raw root. The table is not yet conformed or audited."""
    path = find_table(raw, TABLE_NAMES)
    if path is None:
        raise ManifestError(f"{raw}: no NIH table (expected {' or '.join(n + '[.gz]' for n in TABLE_NAMES)})")
    entries = read_csv_table(path, ["Image Index", "Finding Labels", "Patient ID"],
                             optional=["View Position", *SEX_COLUMNS, AGE_COLUMN])
    require_filled(entries, ["Image Index", "Finding Labels", "Patient ID"], path)
    require_unique(entries, "Image Index", path, "Image Index")

    names = entries["Image Index"]
    keys = names.str.removesuffix(".png")
    bad = ~keys.str.fullmatch(KEY_PATTERN) | ~names.str.endswith(".png")
    if bad.any():
        at = bad.to_numpy().argmax()
        raise ManifestError(f"{path}: line {line_of(at)}: Image Index {names.iloc[at]!r} is not NAME.png "
                            "with NAME in [A-Za-z0-9_-]")
    labels = _finding_columns(entries["Finding Labels"], path)

    located = _locate_images(raw)
    image_path = pd.Series(lookup_text(names, list(located), list(located.values())), index=names.index, dtype="str")
    images_found = int(image_path.notna().sum())
    no_value = pd.Series(np.nan, index=entries.index, dtype="str")
    table = pd.DataFrame({
        "key": keys, "source": "nih", "path": image_path.fillna("images/" + names),
        "patient_id": entries["Patient ID"].str.strip(), "study_id": no_value,
        "view": entries["View Position"] if "View Position" in entries else no_value,
    })
    table["split"], rejects = _splits(raw, path, table, names, options)
    table["sex"], table["age"], demographics = _demographics(entries, path)
    keep = table["split"].notna().to_numpy()
    if options.views:
        keep = _select_views(table, keep, options.views, path, rejects)
    meta = {"table": path.name, "images_found": images_found, "demographics": demographics}
    return pd.concat([table, labels], axis=1)[keep], concat_rejects(rejects), meta


def _demographics(entries: pd.DataFrame, path: Path) -> tuple[pd.Series, pd.Series, dict]:
    """(sex per row, age per row, the meta entry: the columns read and the ages above 120 made missing)."""
    sex_column = next((c for c in SEX_COLUMNS if c in entries), None)
    age_column = AGE_COLUMN if AGE_COLUMN in entries else None
    where = lambda position: f"line {line_of(position)}"  # noqa: E731
    missing = missing_demographics(len(entries), entries.index)
    sex = parse_sex(entries[sex_column], path, sex_column, where) if sex_column else missing["sex"]
    age, above = parse_age(entries[age_column], path, age_column, where) if age_column else (missing["age"], 0)
    return sex, age, demographics_meta(sex_column, age_column, above)


def _select_views(table: pd.DataFrame, keep: np.ndarray, views: tuple[str, ...], path: Path,
                  rejects: list[pd.DataFrame]) -> np.ndarray:
    """`keep` narrowed to `views`; the rows dropped are appended to `rejects` ('view X not selected')."""
    if table["view"].isna().all():
        raise ManifestError(f"{path}: --views needs a 'View Position' column")
    present = set(table["view"].dropna().unique())
    unknown = [v for v in views if v not in present]
    if unknown:
        raise ManifestError(f"--views {','.join(unknown)} matches no image in {path.name} "
                            f"(views there: {', '.join(sorted(present))})")
    dropped = keep & ~table["view"].isin(views).to_numpy()
    gone = table[dropped]
    rejects.append(make_rejects(gone["key"], gone["path"], "view " + gone["view"].fillna("blank") + " not selected"))
    return keep & ~dropped


def _finding_columns(findings: pd.Series, path: Path) -> pd.DataFrame:
    """15 float32 columns (NIH_LABELS order) from the pipe-separated `Finding Labels`."""
    dummies = findings.str.get_dummies(sep="|")
    unknown = [c for c in dummies.columns if c not in NIH_LABELS]
    if unknown:
        firsts = {c: int(dummies[c].to_numpy().argmax()) for c in unknown}
        finding = min(firsts, key=firsts.get)
        raise ManifestError(
            f"{path}: line {line_of(firsts[finding])}: unknown finding {finding!r} in 'Finding Labels'"
            f" (known: {', '.join(NIH_LABELS)})"
        )
    return dummies.reindex(columns=list(NIH_LABELS), fill_value=0).astype(np.float32).set_index(findings.index)


def _locate_images(raw: Path) -> dict[str, str]:
    """{file name: POSIX path relative to raw} of the PNGs in raw/, raw/images*/ and raw/images*/images/."""
    folders = [raw]
    for entry in sorted(os.scandir(raw), key=lambda e: e.name):
        if entry.is_dir() and entry.name.startswith("images"):
            folders.append(Path(entry.path))
            inner = Path(entry.path) / "images"
            if inner.is_dir():
                folders.append(inner)
    found: dict[str, str] = {}
    for folder in folders:
        prefix = folder.relative_to(raw).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        for entry in os.scandir(folder):
            if entry.name.endswith(".png") and entry.is_file():
                found.setdefault(entry.name, prefix + entry.name)
    return found


def _splits(raw: Path, path: Path, table: pd.DataFrame, names: pd.Series, options: ManifestOptions):
    """(split per row, NaN for rows left out; list of rejects frames)."""
    lists = [raw / TRAIN_VAL_LIST, raw / TEST_LIST]
    present = [p.is_file() for p in lists]
    mode = options.split
    if mode == "auto":
        if any(present) and not all(present):
            have, lack = (TRAIN_VAL_LIST, TEST_LIST) if present[0] else (TEST_LIST, TRAIN_VAL_LIST)
            raise ManifestError(f"{raw}: found {have} but not {lack}; supply both or use --split random")
        mode = "official" if all(present) else "random"
    if mode == "random":
        split = table["patient_id"].map(patient_splits(table["patient_id"], options.split_ratios, options.seed))
        return split.astype("str"), []
    if mode != "official":
        raise ManifestError(f"--split {mode} is not available for NIH (use auto, official or random)")
    missing = [p.name for p, ok in zip(lists, present) if not ok]
    if missing:
        raise ManifestError(f"{raw}: --split official needs {' and '.join(missing)}")

    train_val, test = (_read_list(p) for p in lists)
    both = train_val[isin_text(train_val, test)]
    if len(both):
        raise ManifestError(f"{raw}: {both[0]} is in both {TRAIN_VAL_LIST} and {TEST_LIST}")
    in_test = isin_text(names, test)
    in_train_val = isin_text(names, train_val)
    unlisted = table[~in_test & ~in_train_val]
    rejects = [make_rejects(unlisted["key"], unlisted["path"], f"in neither {TRAIN_VAL_LIST} nor {TEST_LIST}")]
    for listed, list_name in ((train_val, TRAIN_VAL_LIST), (test, TEST_LIST)):
        absent = listed[~isin_text(listed, names)]
        rejects.append(make_rejects(absent.str.removesuffix(".png"), "images/" + absent,
                                    f"in {list_name} but not in {path.name}"))

    patients = table["patient_id"][in_train_val]
    valid_of = patient_splits(patients, (1.0 - options.valid_fraction, options.valid_fraction), options.seed,
                              names=("train", "valid"))
    split = pd.Series(np.nan, index=table.index, dtype="str")
    split[in_train_val] = patients.map(valid_of)
    split[in_test] = "test"
    return split, rejects


def _read_list(path: Path) -> pd.Index:
    """The distinct image names of an official list file (blank lines skipped)."""
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read ({exc})") from None
    return pd.Index([n for n in names if n], dtype="str").unique()
