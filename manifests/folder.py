"""Class-folder datasets: RAW/CLASS/* or pre-split RAW/{train,valid,test}/CLASS/*, CLASS any name.

Classes: every sub-folder of RAW (of each split folder, when pre-split) is a class; names match in any
case; hidden folders (`.name`) and `__MACOSX` are not classes. `--negative NAME` (default normal) is the
all-zero class; every other class is one label named after its folder as written on disk (when split
folders spell a class differently, the spelling that sorts first by code point: `PNEUMONIA` over
`Pneumonia`). Labels are sorted by name, ignoring case. An image is 1.0 for its folder's label and 0.0 for
the others. With one positive class `--label` names it; without `--label`, `abnormal` is `Cardiomegaly`
(the seed's set) and any other folder keeps its name. `--label` with several positive classes is an
error. A set needs two classes at least; without a negative folder every image is positive for exactly
one label (allowed with the default `--negative normal`; an explicit `--negative` must match a folder).
Split folders may hold different classes: the labels are their union. `--source cardiomegaly` takes
normal/ and abnormal/ only and labels Cardiomegaly.

Files below a class folder (at any depth): png/jpg/jpeg (any case) are images, listed, never opened;
.dcm/.dicom and any other file with `DICM` at byte 128 are DICOM, of which only the header is read
(manifests/dicomheader.py; an unreadable header is a reject with the reason). Anything else is a reject
"not an image file (.ext)", and so is a file below a `masks/` folder (the lung masks of the COVID-19
Radiography Database). Files directly in RAW or in a split folder belong to no class: not the dataset.
Split folder names match in any case; `val` and `validate` also mean valid.

Patients: `--patient-pattern REGEX` is searched in the file's path below its class folder (e.g.
`person(\\d+)_` in `person1946_bacteria_4874.jpeg`); its first group is the patient id, and a file it does
not match is its own patient (the pattern must match at least one file). Without a pattern a DICOM's
patient is its PatientID, and any other file (or a DICOM with an empty PatientID) is its own patient
(patient_id = key). study_id is a DICOM's StudyInstanceUID and view its ViewPosition, sex its PatientSex
and age its PatientAge (`manifests.dicomheader`; above 120 -> missing, counted in `meta["demographics"]`);
all missing for png/jpg files.

Splits: a pre-split layout keeps its split (unless `--split random`); otherwise patients are split at
random by `--ratios` (seeded), stratified by class: negative, then the labels in order; a patient with
files in several classes counts in the last of them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.demographics import demographics_meta, drop_ages_above_max
from manifests.dicomheader import DicomHeaderError, has_dicom_suffix, has_magic, read_header
from manifests.errors import ManifestError
from manifests.options import ManifestOptions
from manifests.splits import patient_splits
from manifests.table import RESERVED_COLUMNS, make_rejects, path_keys

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_DIRS = {"train": "train", "valid": "valid", "val": "valid", "validate": "valid", "test": "test"}
MASK_DIR = "masks"


def build_folder(raw: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict, list[str]]:
    """(table, rejects, meta, labels) for a class-folder dataset. The table is not yet conformed or audited."""
    roots, presplit = _split_roots(raw)
    class_dirs = [(split, folder) for split, root in roots for folder in _class_dirs(root)]
    labels, label_of, names = _classes(raw, class_dirs, options)
    files = [(split, folder.name.lower(), rel, inner)
             for split, folder in class_dirs for rel, inner in _list_files(raw, folder)]
    frame = pd.DataFrame(files, columns=["split", "cls", "path", "inner"], dtype=object)
    kind, reason = _kinds(raw, frame)
    frame["key"] = _keys(frame["path"], whole=kind == "magic")
    headers = {}
    for i in np.flatnonzero((kind == "dicom") | (kind == "magic")):
        try:
            headers[i] = read_header(raw / frame.at[i, "path"])
        except DicomHeaderError as exc:
            reason[i] = exc.reason
    rejected = pd.notna(reason)
    rejects = make_rejects(frame["key"][rejected], frame["path"][rejected], reason[rejected])
    header_rows = [headers.get(i) for i in range(len(frame))]
    frame["dicom_patient"] = [h.patient_id if h else None for h in header_rows]
    frame["study_id"] = [h.study_id if h else None for h in header_rows]
    frame["view"] = [h.view if h else None for h in header_rows]
    frame["sex"] = [h.sex if h else None for h in header_rows]
    frame["age"] = np.array([h.age if h else np.nan for h in header_rows], dtype=np.float64)
    frame = frame[~rejected].reset_index(drop=True)
    if frame.empty:
        raise ManifestError(f"{raw}: no png/jpg/jpeg or DICOM image in the class folders "
                            f"({', '.join(sorted(names.values()))})")
    clash = frame["key"].duplicated(keep=False)
    if clash.any():
        a, b = frame.loc[clash, "path"].iloc[:2]
        raise ManifestError(f"{raw}: {a} and {b} would share the key {frame.loc[clash, 'key'].iloc[0]!r}")
    frame["patient_id"] = _patients(frame, options.patient_pattern, raw)

    code = {cls: 0 if label is None else 1 + labels.index(label) for cls, label in label_of.items()}
    strata = frame["cls"].map(code)
    if presplit and options.split != "random":
        split = frame["split"]
    elif options.split == "official":
        raise ManifestError(f"{raw}: --split official needs a pre-split layout RAW/{{train,valid,test}}/CLASS")
    else:
        split = frame["patient_id"].map(patient_splits(frame["patient_id"], options.split_ratios, options.seed,
                                                       strata=strata))
    table = pd.DataFrame({
        "key": frame["key"], "source": options.source, "path": frame["path"], "patient_id": frame["patient_id"],
        "study_id": frame["study_id"], "view": frame["view"], "split": split,
    })
    for i, label in enumerate(labels):
        table[label] = (strata == i + 1).astype(np.float32)
    table["sex"] = frame["sex"]
    table["age"], above = drop_ages_above_max(frame["age"])
    dicom = bool(headers)
    meta = {"layout": "pre-split" if presplit else "class folders",
            "classes": {names[cls]: label_of[cls] for cls in sorted(names)},
            "demographics": demographics_meta("PatientSex" if dicom else None, "PatientAge" if dicom else None, above)}
    return table, rejects, meta, labels


def _split_roots(raw: Path) -> tuple[list[tuple[str | None, Path]], bool]:
    """([(split or None, folder holding class folders)], pre-split?)."""
    folders = _subfolders(raw)
    split_dirs = [(SPLIT_DIRS[f.name.lower()], f) for f in folders if f.name.lower() in SPLIT_DIRS]
    if not split_dirs:
        return [(None, raw)], False
    others = [f.name for f in folders if f.name.lower() not in SPLIT_DIRS]
    if others:
        raise ManifestError(f"{raw}: holds both split folders ({', '.join(f.name for _, f in split_dirs)}) and "
                            f"other folders ({', '.join(others)}); use one layout: RAW/CLASS/* or "
                            "RAW/{train,valid,test}/CLASS/*")
    return split_dirs, True


def _class_dirs(root: Path) -> list[Path]:
    found = _subfolders(root)
    if not found:
        raise ManifestError(f"{root}: no class folder (expected RAW/CLASS/*, e.g. RAW/normal and RAW/PNEUMONIA, "
                            "or RAW/{train,valid,test}/CLASS/*)")
    return found


def _classes(raw: Path, class_dirs: list[tuple[str | None, Path]], options: ManifestOptions
             ) -> tuple[list[str], dict[str, str | None], dict[str, str]]:
    """(labels in order, {class: its label, None for the negative}, {class: folder name}); class = lower name."""
    spellings: dict[str, set[str]] = {}
    for _, folder in class_dirs:
        spellings.setdefault(folder.name.lower(), set()).add(folder.name)
    names = {cls: min(found) for cls, found in spellings.items()}
    found = ", ".join(sorted(names.values()))
    if len(names) < 2:
        raise ManifestError(f"{raw}: one class folder only ({found}); a folder set needs two classes at least, "
                            "e.g. normal/ and PNEUMONIA/")
    if options.source == "cardiomegaly":
        other = [names[cls] for cls in sorted(names) if cls not in ("normal", "abnormal")]
        if other:
            raise ManifestError(f"{raw}: --source cardiomegaly reads normal/ and abnormal/ only, found "
                                f"{', '.join(other)}; use --source folder")
        return ["Cardiomegaly"], {"normal": None, "abnormal": "Cardiomegaly"}, names
    negative = options.negative.lower()
    if negative not in names and negative != "normal":
        raise ManifestError(f"{raw}: --negative {options.negative!r} matches no class folder (found: {found})")
    positives = sorted(cls for cls in names if cls != negative)
    if options.label is not None:
        if len(positives) > 1:
            raise ManifestError(f"{raw}: --label names the one positive class folder, but there are "
                                f"{len(positives)} ({', '.join(names[c] for c in positives)}), each its own label")
        label_of = {positives[0]: options.label}
    elif positives == ["abnormal"]:
        label_of = {"abnormal": "Cardiomegaly"}
    else:
        label_of = {cls: names[cls] for cls in positives}
    clash = [label for label in label_of.values() if label in RESERVED_COLUMNS]
    if clash:
        raise ManifestError(f"{raw}: class folder {clash[0]!r} would name a label like the manifest column "
                            f"{clash[0]!r}; rename the folder")
    if negative in names:
        label_of[negative] = None
    return [label_of[cls] for cls in positives], label_of, names


def _subfolders(folder: Path) -> list[Path]:
    """Sub-folders, sorted by name, except hidden ones (.name) and __MACOSX (zip debris)."""
    return [Path(e.path) for e in sorted(os.scandir(folder), key=lambda e: e.name)
            if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX"]


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


def _kinds(raw: Path, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per file: "image", "dicom" (by suffix), "magic" (DICOM by its DICM bytes) or None, and the reject
    reason (None when kept)."""
    n = len(frame)
    kind = np.full(n, None, dtype=object)
    reason = np.full(n, None, dtype=object)
    inner_dirs = frame["inner"].str.lower().str.split("/").str[:-1]
    is_mask = np.array([MASK_DIR in parts for parts in inner_dirs], dtype=bool)
    is_image = frame["path"].str.lower().str.endswith(IMAGE_SUFFIXES).to_numpy(dtype=bool)
    reason[is_mask] = f"segmentation mask ({MASK_DIR}/ folder)"
    kind[is_image & ~is_mask] = "image"
    for i in np.flatnonzero(~is_image & ~is_mask):
        path = frame.at[i, "path"]
        if has_dicom_suffix(path):
            kind[i] = "dicom"
            continue
        try:
            magic = has_magic(raw / path)
        except OSError as exc:
            reason[i] = f"unreadable file ({exc.strerror or exc})"
            continue
        if magic:
            kind[i] = "magic"
        else:
            reason[i] = f"not an image file ({_suffix(path)})"
    return kind, reason


def _keys(paths: pd.Series, whole: np.ndarray) -> pd.Series:
    """Relative path without its extension (all of it where `whole`: a DICOM known by its DICM bytes is
    often named by UID, 1.2.840.113619...); `/` and anything outside [A-Za-z0-9_-] become `_`."""
    return path_keys(paths).where(~whole, paths.str.replace(r"[^A-Za-z0-9_-]", "_", regex=True))


def _suffix(path: str) -> str:
    found = re.search(r"(\.[^./]*)$", path)
    return found.group(1).lower() if found else "no extension"


def _patients(frame: pd.DataFrame, pattern: str | None, raw: Path) -> pd.Series:
    if pattern is None:
        return frame["dicom_patient"].fillna(frame["key"]).astype("str")
    found = frame["inner"].str.extract(pattern, expand=True)[0]
    if found.isna().all():
        raise ManifestError(f"{raw}: --patient-pattern '{pattern}' matches no file name "
                            f"(e.g. {frame['inner'].iloc[0]!r})")
    return found.fillna(frame["key"]).astype("str")
