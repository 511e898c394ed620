"""Folder datasets: RAW/{normal,abnormal}/* or pre-split RAW/{train,valid,test}/{normal,abnormal}/*.

One label column (`--label`, `Cardiomegaly` for `--source cardiomegaly`): 1.0 for abnormal, 0.0 for normal.
Files are listed, never opened: png/jpg/jpeg (any case) are images, anything else is a reject.
Class and split folder names match case-insensitively; `val` and `validate` also mean valid.

Patients: `--patient-pattern REGEX` is searched in the file's path below its class folder (e.g.
`person(\\d+)_` in `person1946_bacteria_4874.jpeg`) and its first group is the patient id. A file it does
not match is its own patient (the pattern must match at least one file). Without a pattern every file is
its own patient (patient_id = key).

Splits: a pre-split layout keeps its split (unless `--split random`); otherwise patients are split at
random by `--ratios` (seeded), stratified by class (a patient with any abnormal file counts as abnormal).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.errors import ManifestError
from manifests.options import ManifestOptions
from manifests.splits import patient_splits
from manifests.table import concat_rejects, make_rejects, path_keys

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CLASSES = {"normal": 0.0, "abnormal": 1.0}
SPLIT_DIRS = {"train": "train", "valid": "valid", "val": "valid", "validate": "valid", "test": "test"}


def build_folder(raw: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(table, rejects, meta) for a folder dataset. The table is not yet conformed or audited."""
    label = "Cardiomegaly" if options.source == "cardiomegaly" else options.label
    split_dirs = _children(raw, SPLIT_DIRS)
    presplit = bool(split_dirs)
    if presplit and _children(raw, CLASSES):
        raise ManifestError(f"{raw}: holds both split folders ({', '.join(p.name for _, p in split_dirs)}) and "
                            "class folders; use one layout")
    roots = split_dirs if presplit else [(None, raw)]
    files = []
    for split, root in roots:
        class_dirs = _children(root, CLASSES)
        if not class_dirs:
            raise ManifestError(f"{root}: no normal/ or abnormal/ folder (expected RAW/{{normal,abnormal}} "
                                f"or RAW/{{train,valid,test}}/{{normal,abnormal}})")
        for class_name, folder in class_dirs:
            files.extend((split, CLASSES[class_name], rel, inner) for rel, inner in _list_files(raw, folder))
    frame = pd.DataFrame(files, columns=["split", "label", "path", "inner"])
    frame = frame.astype({"split": "str", "path": "str", "inner": "str", "label": np.float32})

    is_image = frame["path"].str.lower().str.endswith(IMAGE_SUFFIXES)
    rejects = [make_rejects(_keys(frame["path"][~is_image]), frame["path"][~is_image],
                            "not an image file (" + _suffix(frame["path"][~is_image]) + ")")]
    frame = frame[is_image].reset_index(drop=True)
    if frame.empty:
        raise ManifestError(f"{raw}: no png/jpg/jpeg image under the normal/abnormal folders")
    frame["key"] = _keys(frame["path"])
    clash = frame["key"].duplicated(keep=False)
    if clash.any():
        a, b = frame.loc[clash, "path"].iloc[:2]
        raise ManifestError(f"{raw}: {a} and {b} would share the key {frame.loc[clash, 'key'].iloc[0]!r}")
    frame["patient_id"] = _patients(frame, options.patient_pattern, raw)

    if presplit and options.split != "random":
        split = frame["split"]
    elif options.split == "official":
        raise ManifestError(f"{raw}: --split official needs a pre-split layout "
                            "RAW/{train,valid,test}/{normal,abnormal}")
    else:
        split = frame["patient_id"].map(patient_splits(frame["patient_id"], options.split_ratios, options.seed,
                                                       strata=frame["label"]))
    table = pd.DataFrame({
        "key": frame["key"], "source": options.source, "path": frame["path"], "patient_id": frame["patient_id"],
        "study_id": pd.Series(np.nan, index=frame.index, dtype="str"),
        "view": pd.Series(np.nan, index=frame.index, dtype="str"), "split": split, label: frame["label"],
    })
    meta = {"layout": "pre-split" if presplit else "normal/abnormal", "label": label}
    return table, concat_rejects(rejects), meta


def folder_labels(options: ManifestOptions) -> list[str]:
    return ["Cardiomegaly" if options.source == "cardiomegaly" else options.label]


def _children(folder: Path, names: dict) -> list[tuple[str, Path]]:
    """(canonical name, path) of the sub-folders whose lower-cased name is in `names`, sorted."""
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir() and entry.name.lower() in names:
            found.append((entry.name.lower() if names is CLASSES else names[entry.name.lower()], Path(entry.path)))
    return found


def _list_files(raw: Path, folder: Path) -> list[tuple[str, str]]:
    """(path relative to raw, path relative to folder) of every file below folder, POSIX, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames):
            path = here / name
            out.append((path.relative_to(raw).as_posix(), path.relative_to(folder).as_posix()))
    return out


def _keys(paths: pd.Series) -> pd.Series:
    """Relative path without extension; `/` and anything outside [A-Za-z0-9_-] become `_`."""
    return path_keys(paths)


def _suffix(paths: pd.Series) -> pd.Series:
    suffix = paths.str.extract(r"(\.[^./]*)$", expand=False)
    return suffix.str.lower().fillna("no extension")


def _patients(frame: pd.DataFrame, pattern: str | None, raw: Path) -> pd.Series:
    if pattern is None:
        return frame["key"]
    found = frame["inner"].str.extract(pattern, expand=True)[0]
    if found.isna().all():
        raise ManifestError(f"{raw}: --patient-pattern '{pattern}' matches no file name "
                            f"(e.g. {frame['inner'].iloc[0]!r})")
    return found.fillna(frame["key"]).astype("str")
