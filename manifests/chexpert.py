"""CheXpert v1.0 (and CheXpert-v1.0-small): train.csv, valid.csv and, when present, test.csv.

Layout: `--raw` is the dataset folder (holding train.csv) or its parent (one folder below holds
train.csv). `Path` is `[DATASET/]DIR/patientNNNNN/studyN/NAME.EXT` (`CheXpert-v1.0-small/train/
patient00001/study1/view1_frontal.jpg`); its first part, when there are two above the patient, names
the dataset folder as shipped and is replaced by where that folder really is, so the manifest's
`path` is relative to `--raw` whatever the folder is called. A Path that does not match, that has a
`.` or `..` part or is absolute, is a ManifestError naming file, line, column and value (never a
reject: it means the table is not CheXpert's).

Rows: `key` = DIR_patientNNNNN_studyN_NAME (the Path below the dataset folder, no extension, `/` -> `_`);
`patient_id` = patientNNNNN; `study_id` = patientNNNNN/studyN; `view` = the `AP/PA` value of a
frontal image (AP, PA, LL, RL; missing when blank) and LATERAL for a lateral one. `--views` keeps
those views and lists every other image as a reject; splits are drawn first, so views never move a
patient. Labels: the 14 columns in file order, by `manifests.labelcells` (as MIMIC). `sex` from `Sex`
(Female, Male; Unknown -> missing) and `age` from `Age` (`manifests.demographics`; above 120 -> missing,
counted in `meta["demographics"]`); a file without these columns gives missing values.

Splits: `auto`/`official` follow the files: with test.csv, train/valid/test = train.csv/valid.csv/
test.csv; without it, test = valid.csv and valid = a seeded `--valid-fraction` of train.csv's patients.
A patient found in two files is a leakage error naming the patient and both files. `random` = seeded
patient-level `--ratios` (7:1:2) over the rows of all files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from manifests.csvtable import find_table, isin_text, line_of, read_csv_table, require_filled, require_unique
from manifests.demographics import demographics_meta, missing_demographics, parse_age, parse_sex
from manifests.errors import ManifestError
from manifests.labelcells import label_matrix
from manifests.options import ManifestOptions
from manifests.splits import patient_splits
from manifests.table import KEY_PATTERN, concat_rejects, make_rejects
from manifests.vocab import CHEXPERT_LABELS

DEFAULT_VALID_FRACTION = ManifestOptions.__dataclass_fields__["valid_fraction"].default
FILES = ("train.csv", "valid.csv", "test.csv")     # test.csv (the later test labels) is optional
VIEWS = ("AP", "PA", "LL", "RL", "LATERAL")
PATH_PATTERN = (r"^(?:(?P<top>[^/]+)/)?(?P<dir>[^/]+)/(?P<patient>patient[0-9]+)/(?P<study>study[0-9]+)/"
                r"(?P<stem>[^/]+)\.(?P<ext>[^./]+)$")
SEX_COLUMN, AGE_COLUMN = "Sex", "Age"
PATH_FORM = "[DATASET/]DIR/patientNNNNN/studyN/NAME.EXT with names in [A-Za-z0-9_-]"


def find_chexpert_folder(raw: Path) -> Path:
    """The folder holding train.csv: `raw` itself, or the one folder below it that does."""
    if find_table(raw, ["train.csv"]) is not None:
        return raw
    below = sorted(p for p in raw.iterdir() if p.is_dir() and find_table(p, ["train.csv"]) is not None)
    if len(below) > 1:
        raise ManifestError(f"{raw}: several CheXpert folders ({', '.join(p.name for p in below)}); "
                            "pass one of them as --raw")
    if not below:
        raise ManifestError(f"{raw}: no train.csv here or in a folder below (CheXpert-v1.0[-small]/train.csv)")
    return below[0]


def build_chexpert(raw: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict, list[str]]:
    """(table, rejects, meta, labels) for a CheXpert raw root. The table is not yet conformed or audited."""
    folder = find_chexpert_folder(raw)
    prefix = "" if folder == raw else folder.relative_to(raw).as_posix() + "/"
    paths = [find_table(folder, [name]) for name in FILES]
    if paths[1] is None:
        raise ManifestError(f"{folder}: no valid.csv beside train.csv")
    parts = [_read_file(path, i, prefix, options.uncertain) for i, path in enumerate(paths) if path is not None]
    table = pd.concat([part for part, _ in parts], ignore_index=True)
    read = [found for _, found in parts]    # per file: {"Sex": bool, "Age": bool, "above": n}
    files = [p for p in paths if p is not None]
    _require_unique_key(table, files)

    table["split"] = _splits(table, files, options)
    keep = np.ones(len(table), dtype=bool)
    rejects = []
    if options.views:
        keep = _select_views(table, options.views, rejects)
    meta = {"tables": [p.name for p in files], "dataset_folder": prefix.rstrip("/") or ".",
            "demographics": demographics_meta(SEX_COLUMN if any(r[SEX_COLUMN] for r in read) else None,
                                              AGE_COLUMN if any(r[AGE_COLUMN] for r in read) else None,
                                              sum(r["above"] for r in read))}
    table = table.drop(columns=["file", "line"])[keep]
    return table, concat_rejects(rejects), meta, list(CHEXPERT_LABELS)


def _read_file(path: Path, index: int, prefix: str, uncertain: str) -> tuple[pd.DataFrame, dict]:
    """(One CSV's rows as BASE_COLUMNS (split not yet) + labels + sex, age, plus `file` (index in FILES) and
    `line`; {"Sex": column present, "Age": column present, "above": ages above 120 made missing})."""
    frame = read_csv_table(path, ["Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS], numeric=list(CHEXPERT_LABELS),
                           optional=[SEX_COLUMN, AGE_COLUMN])
    require_filled(frame, ["Path", "Frontal/Lateral"], path)
    require_unique(frame, "Path", path, "Path")
    text = pa.array(frame["Path"].str.strip().to_numpy(dtype=object), type=pa.large_string())
    found = pc.extract_regex(text, PATH_PATTERN)
    field = {name: found.field(name) for name in ("top", "dir", "patient", "study", "stem", "ext")}
    key = pc.binary_join_element_wise(field["dir"], field["patient"], field["study"], field["stem"], _text("_"))
    good = pc.and_(found.is_valid(), pc.match_substring_regex(key, f"^{KEY_PATTERN}$"))
    good = pc.and_(good, pc.invert(pc.is_in(field["top"], value_set=pa.array([".", ".."], pa.large_string()))))
    good = good.to_numpy(zero_copy_only=False)
    if not good.all():
        at = int((~good).argmax())
        raise ManifestError(f"{path}: line {line_of(at)}: 'Path' is {frame['Path'].iloc[at]!r}, expected {PATH_FORM} "
                            "(no '..', not absolute)")

    side = frame["Frontal/Lateral"].str.strip()
    lateral = (side == "Lateral").to_numpy()
    bad = ~lateral & (side != "Frontal").to_numpy()
    if bad.any():
        at = int(bad.argmax())
        raise ManifestError(f"{path}: line {line_of(at)}: 'Frontal/Lateral' is {side.iloc[at]!r}, "
                            "expected Frontal or Lateral")
    ap_pa = frame["AP/PA"].str.strip()
    view = ap_pa.where(ap_pa != "").where(~lateral, "LATERAL")

    patient = pd.Series(field["patient"].to_numpy(zero_copy_only=False), dtype="str")
    below = pc.binary_join_element_wise(field["dir"], field["patient"], field["study"],
                                        pc.binary_join_element_wise(field["stem"], field["ext"], _text(".")), _text("/"))
    out = pd.DataFrame({
        "key": pd.Series(key.to_numpy(zero_copy_only=False), dtype="str"),
        "source": "chexpert",
        "path": prefix + pd.Series(below.to_numpy(zero_copy_only=False), dtype="str"),
        "patient_id": patient,
        "study_id": patient + "/" + pd.Series(field["study"].to_numpy(zero_copy_only=False), dtype="str"),
        "view": view.astype("str"),
    })
    labels = pd.DataFrame(label_matrix(frame, CHEXPERT_LABELS, path, uncertain), columns=list(CHEXPERT_LABELS))
    out = pd.concat([out, labels], axis=1)
    where = lambda position: f"line {line_of(position)}"  # noqa: E731
    demographics, above = missing_demographics(len(out), out.index), 0
    if SEX_COLUMN in frame:
        demographics["sex"] = parse_sex(frame[SEX_COLUMN], path, SEX_COLUMN, where).set_axis(out.index)
    if AGE_COLUMN in frame:
        age, above = parse_age(frame[AGE_COLUMN], path, AGE_COLUMN, where)
        demographics["age"] = age.set_axis(out.index)
    out["sex"], out["age"] = demographics["sex"], demographics["age"]
    out["file"] = index
    out["line"] = np.arange(len(out)) + 2
    return out, {SEX_COLUMN: SEX_COLUMN in frame, AGE_COLUMN: AGE_COLUMN in frame, "above": above}


def _text(value: str) -> pa.Scalar:
    return pa.scalar(value, pa.large_string())


def _require_unique_key(table: pd.DataFrame, files: list[Path]) -> None:
    """ManifestError naming two rows (file and line) that give the same key."""
    keys = table["key"]
    if pc.count_distinct(pa.array(keys), mode="all").as_py() == len(keys):
        return
    twins = table[keys.duplicated(keep=False).to_numpy()]
    first = twins[twins["key"] == twins["key"].iloc[0]].iloc[:2]
    where = [f"{files[f].name} line {n}" for f, n in zip(first["file"], first["line"])]
    raise ManifestError(f"{files[0].parent}: key {first['key'].iloc[0]!r} (Path below the dataset folder) "
                        f"on {where[0]} and {where[1]}")


def _splits(table: pd.DataFrame, files: list[Path], options: ManifestOptions) -> pd.Series:
    """The split of every row (see the module's rules)."""
    patients = table["patient_id"]
    if options.split == "random":
        return patients.map(patient_splits(patients, options.split_ratios, options.seed)).astype("str")
    if options.split not in ("auto", "official"):
        raise ManifestError(f"--split {options.split} is not available for CheXpert (use auto, official or random)")
    _audit_files(table, files)
    file = table["file"].to_numpy()
    if len(files) == 3:
        if options.valid_fraction != DEFAULT_VALID_FRACTION:
            raise ManifestError(f"{files[2]}: with test.csv, valid is valid.csv, so --valid-fraction "
                                f"{options.valid_fraction} would be ignored; drop it (or use --split random)")
        return pd.Series(np.array(["train", "valid", "test"], dtype=object)[file], dtype="str")
    train = file == 0
    fractions = (1.0 - options.valid_fraction, options.valid_fraction)
    valid_of = patient_splits(patients[train], fractions, options.seed, names=("train", "valid"))
    return patients.map(valid_of).where(train, "test").astype("str")


def _audit_files(table: pd.DataFrame, files: list[Path]) -> None:
    """Leakage: ManifestError naming a patient found in two files (and how many are)."""
    file = table["file"].to_numpy()
    for a in range(len(files)):
        for b in range(a + 1, len(files)):
            rows_a, rows_b = table[file == a], table[file == b]
            shared = rows_a["patient_id"][isin_text(rows_a["patient_id"], rows_b["patient_id"])]
            if shared.empty:
                continue
            patient = sorted(shared.unique())[0]
            line_a = rows_a["line"][rows_a["patient_id"] == patient].iloc[0]
            line_b = rows_b["line"][rows_b["patient_id"] == patient].iloc[0]
            n = shared.nunique()
            raise ManifestError(f"leakage: patient {patient!r} is in both {files[a].name} (line {line_a}) and "
                                f"{files[b].name} (line {line_b})" + (f" ({n} patients are)" if n > 1 else ""))


def _select_views(table: pd.DataFrame, views: tuple[str, ...], rejects: list[pd.DataFrame]) -> np.ndarray:
    """Rows whose view is one of `views`; the others are appended to `rejects` ('view X not selected')."""
    present = set(table["view"].dropna().unique())
    unknown = [v for v in views if v not in VIEWS and v not in present]
    if unknown:
        raise ManifestError(f"--views {','.join(unknown)}: not a CheXpert view (choose from {', '.join(VIEWS)})")
    keep = table["view"].isin(views).to_numpy()
    gone = table[~keep]
    rejects.append(make_rejects(gone["key"], gone["path"], "view " + gone["view"].fillna("blank") + " not selected"))
    return keep
