"""MIMIC-CXR-JPG: the seed study's one-AP-image-per-subject cohort, from the tables alone.

Cohort rule (every id compared as text):
1. only images whose `ViewPosition` is exactly `AP` (not 'AP AXIAL', 'AP LLD', not blank);
2. per `subject_id`, the lowest `study_id` among its studies that have an AP image;
3. within that study, the AP image with the lowest `dicom_id`;
4. if that study has no row in the label table, the subject is left out (no fallback to another study).
Every other image is a reject with its reason.

Labels (`--labels negbio|chexpert`): blank is 0; -1 (uncertain) is 0 (`zeros`, the seed's choice),
1 (`ones`) or NaN (`ignore`).

Splits: `official` = mimic-cxr-2.0.0-split.csv[.gz] (`validate` -> `valid`; an image missing from it is a
reject); `random` = seeded patient-level split by `--ratios`; `study-digit` = the seed's rule: a study_id
ending in 8 or 9 is test, and the other subjects are split train/valid at random by patient
(`--valid-fraction`, seeded). With one image per subject every split is patient-disjoint.
`auto` = official when the split file is present, else random.

Demographics: MIMIC-CXR's tables hold no sex or age, so both columns are missing; `cxr eval
--demographics patients.csv.gz` (MIMIC-IV's table, by subject_id = patient_id) adds them at evaluation.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from manifests.csvtable import (isin_text, line_of, lookup_text, read_csv_table, require_filled, require_unique,
                                sort_order_text)
from manifests.demographics import demographics_meta, missing_demographics
from manifests.errors import ManifestError
from manifests.labelcells import label_matrix
from manifests.options import ManifestOptions
from manifests.splits import patient_splits
from manifests.table import concat_rejects, make_rejects
from manifests.vocab import MIMIC_LABELS

SPLIT_VALUES = {"train": "train", "validate": "valid", "valid": "valid", "test": "test"}


def find_mimic_table(raw: Path, kind: str) -> Path | None:
    """raw/mimic-cxr-2.0.0-KIND.csv[.gz], else the newest-named raw/mimic-cxr-*-KIND.csv[.gz]."""
    for name in (f"mimic-cxr-2.0.0-{kind}.csv", f"mimic-cxr-2.0.0-{kind}.csv.gz"):
        if (raw / name).is_file():
            return raw / name
    others = sorted(p for p in raw.glob(f"mimic-cxr-*-{kind}.csv*") if p.name.endswith((".csv", ".csv.gz")))
    return others[-1] if others else None


def build_mimic(raw: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(table, rejects, meta) for a MIMIC-CXR-JPG raw root. The table is not yet conformed or audited."""
    meta_path = _require(raw, "metadata")
    images = read_csv_table(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"])
    require_filled(images, ["dicom_id", "subject_id", "study_id"], meta_path)
    for column in ("dicom_id", "subject_id", "study_id"):
        images[column] = images[column].str.strip()
    require_unique(images, "dicom_id", meta_path, "dicom_id")
    images["path"] = ("files/p" + images["subject_id"].str[:2] + "/p" + images["subject_id"] + "/s"
                      + images["study_id"] + "/" + images["dicom_id"] + ".jpg")

    chosen, rejects = _cohort(images)
    label_path = _require(raw, options.labels)
    labels = _read_labels(label_path, options.uncertain)
    has_labels = isin_text(chosen["study_id"], labels.index)
    rejects.append(make_rejects(chosen["dicom_id"][~has_labels], chosen["path"][~has_labels],
                                f"study has no row in {label_path.name}"))
    chosen = chosen[has_labels]

    split, split_rejects, split_file = _splits(raw, chosen, options)
    rejects.extend(split_rejects)
    table = pd.DataFrame({
        "key": chosen["dicom_id"], "source": "mimic", "path": chosen["path"], "patient_id": chosen["subject_id"],
        "study_id": chosen["study_id"], "view": chosen["ViewPosition"], "split": split,
        **missing_demographics(len(chosen), chosen.index),
    })
    table = table.join(labels, on="study_id")[table["split"].notna()]
    meta = {"tables": [p.name for p in (meta_path, label_path, split_file) if p is not None],
            "demographics": demographics_meta(None, None, 0)}
    return table, concat_rejects(rejects), meta


def _require(raw: Path, kind: str) -> Path:
    path = find_mimic_table(raw, kind)
    if path is None:
        raise ManifestError(f"{raw}: no mimic-cxr-2.0.0-{kind}.csv[.gz]")
    return path


def _cohort(images: pd.DataFrame) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """(one chosen AP image per subject, rejects frames for every other image)."""
    view = images["ViewPosition"]
    is_ap = (view == "AP").to_numpy()
    not_ap = images[~is_ap]
    rejects = [make_rejects(not_ap["dicom_id"], not_ap["path"], "view " + view[~is_ap].fillna("blank") + " not AP")]

    ap = images[is_ap]
    ap = ap.iloc[sort_order_text(ap, ["subject_id", "study_id", "dicom_id"])]
    subject = ap["subject_id"].to_numpy(dtype=object)
    first = np.ones(len(ap), dtype=bool)
    first[1:] = subject[1:] != subject[:-1]        # sorted: a subject's first row is its chosen image
    chosen = ap[first]
    others = ap[~first]
    lowest_study = lookup_text(others["subject_id"], chosen["subject_id"], chosen["study_id"])
    same_study = others["study_id"].to_numpy(dtype=object) == lowest_study
    rejects.append(make_rejects(others["dicom_id"][~same_study], others["path"][~same_study],
                                "not the subject's lowest AP study"))
    rejects.append(make_rejects(others["dicom_id"][same_study], others["path"][same_study],
                                "not the lowest AP dicom_id of its study"))
    return chosen, rejects


def _read_labels(path: Path, uncertain: str) -> pd.DataFrame:
    """float32 label columns indexed by study_id, with the uncertainty policy applied."""
    table = read_csv_table(path, ["subject_id", "study_id", *MIMIC_LABELS], numeric=list(MIMIC_LABELS))
    require_filled(table, ["subject_id", "study_id"], path)
    table["study_id"] = table["study_id"].str.strip()
    require_unique(table, "study_id", path, "study_id")
    return pd.DataFrame(label_matrix(table, MIMIC_LABELS, path, uncertain), columns=list(MIMIC_LABELS),
                        index=pd.Index(table["study_id"], dtype="str", name="study_id"))


def _splits(raw: Path, chosen: pd.DataFrame, options: ManifestOptions):
    """(split per chosen row, NaN where left out; rejects frames; the split file used or None)."""
    split_path = find_mimic_table(raw, "split")
    mode = options.split
    if mode == "auto":
        mode = "official" if split_path is not None else "random"
    subjects = chosen["subject_id"]
    if mode == "random":
        return subjects.map(patient_splits(subjects, options.split_ratios, options.seed)), [], None
    if mode == "study-digit":
        test = chosen["study_id"].str[-1].isin(["8", "9"]).to_numpy()
        rest = patient_splits(subjects[~test], (1.0 - options.valid_fraction, options.valid_fraction),
                              options.seed, names=("train", "valid"))
        return subjects.map(rest).where(~test, "test"), [], None
    if split_path is None:
        raise ManifestError(f"{raw}: --split official needs mimic-cxr-2.0.0-split.csv[.gz]")
    table = read_csv_table(split_path, ["dicom_id", "split"])
    require_filled(table, ["dicom_id", "split"], split_path)
    table["dicom_id"] = table["dicom_id"].str.strip()
    require_unique(table, "dicom_id", split_path, "dicom_id")
    mapped = lookup_text(table["split"].str.strip(), list(SPLIT_VALUES), list(SPLIT_VALUES.values()))
    mapped = pd.Series(mapped, dtype="str")
    if mapped.isna().any():
        at = mapped.isna().to_numpy().argmax()
        raise ManifestError(f"{split_path}: line {line_of(at)}: split {table['split'].iloc[at]!r} "
                            "is not train, validate or test")
    split = pd.Series(lookup_text(chosen["dicom_id"], table["dicom_id"], mapped), index=chosen.index, dtype="str")
    missing = split.isna().to_numpy()
    rejects = [make_rejects(chosen["dicom_id"][missing], chosen["path"][missing], f"no row in {split_path.name}")]
    return split, rejects, split_path
