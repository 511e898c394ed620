"""Manifest build timings: the real NIH table with its official lists, MIMIC and CheXpert tables at real size.

`run(workdir) -> str` returns a markdown section for BENCHMARKS.md. Standalone:
`python bench/manifest_bench.py [--workdir DIR]`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from manifests.build import ManifestOptions, build_manifest  # noqa: E402
from manifests.vocab import CHEXPERT_LABELS, MIMIC_LABELS  # noqa: E402

NIH_FILES = ("Data_Entry_2017_v2020.csv.gz", "train_val_list.txt", "test_list.txt")
NIH_TARGET_S = 3.0
MIMIC_TARGET_S = 10.0
CHEXPERT_TARGET_S = 5.0
REPEATS = 3

# Real MIMIC-CXR-JPG 2.0 sizes and the rough ViewPosition mix.
MIMIC_IMAGES = 377_110
MIMIC_STUDIES = 227_835
MIMIC_SUBJECTS = 65_379
VIEW_MIX = {"AP": 0.45, "PA": 0.30, "LATERAL": 0.20, "LL": 0.03, "": 0.012, "AP AXIAL": 0.004,
            "AP LLD": 0.002, "PA LLD": 0.002}

# Real CheXpert v1.0 sizes (train.csv, valid.csv) and the rough view mix of train.csv.
CHEXPERT_TRAIN_ROWS = 223_414
CHEXPERT_TRAIN_PATIENTS = 64_540
CHEXPERT_VALID_ROWS = 234
CHEXPERT_VALID_PATIENTS = 200
CHEXPERT_VIEWS = {"AP": 0.72, "PA": 0.13, "LL": 0.0001, "RL": 0.0001, "LATERAL": 0.1498}


def run(workdir: Path) -> str:
    """Time both manifest builds (median of 3) and return the markdown section."""
    workdir = Path(workdir)
    nih = workdir / "nih"
    nih.mkdir(parents=True, exist_ok=True)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih"
    for name in NIH_FILES:
        shutil.copyfile(shared / name, nih / name)
    mimic = workdir / "mimic"
    make_phantom_mimic(mimic, seed=0)
    chexpert = workdir / "chexpert"
    make_phantom_chexpert(chexpert, seed=0)

    rows = []
    for title, raw, options, target in (
        ("NIH, real table + official lists", nih, ManifestOptions(source="nih"), NIH_TARGET_S),
        ("MIMIC, phantom tables at real size (metadata + negbio + split)", mimic, ManifestOptions(source="mimic"),
         MIMIC_TARGET_S),
        ("CheXpert, phantom train.csv + valid.csv at real size", chexpert, ManifestOptions(source="chexpert"),
         CHEXPERT_TARGET_S),
    ):
        seconds, manifest = _median_time(raw, options)
        rows.append((title, manifest, seconds, target))

    lines = [
        "## Manifest build",
        "",
        f"`build_manifest` from the tables alone, median of {REPEATS} runs ({time.strftime('%Y-%m-%d')}).",
        "",
        "| input | images in tables | selected | rejects | median s | target s | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for title, manifest, seconds, target in rows:
        verdict = "ok" if seconds < target else "SLOW"
        lines.append(f"| {title} | {len(manifest.table) + len(manifest.rejects):,} | {len(manifest.table):,} | "
                     f"{len(manifest.rejects):,} | {seconds:.2f} | {target:.0f} | {verdict} |")
    lines.append("")
    mix = ", ".join(f"{view or 'blank'} {share:.1%}" for view, share in VIEW_MIX.items())
    lines.append(f"MIMIC phantom: {MIMIC_IMAGES:,} images, {MIMIC_STUDIES:,} studies, {MIMIC_SUBJECTS:,} subjects; "
                 f"ViewPosition mix {mix}.")
    lines.append(f"CheXpert phantom: train.csv {CHEXPERT_TRAIN_ROWS:,} rows of {CHEXPERT_TRAIN_PATIENTS:,} patients, "
                 f"valid.csv {CHEXPERT_VALID_ROWS} rows of {CHEXPERT_VALID_PATIENTS} patients, in "
                 "CheXpert-v1.0-small/ below --raw; no images.")
    return "\n".join(lines) + "\n"


def _median_time(raw: Path, options: ManifestOptions):
    times, manifest = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        manifest = build_manifest(raw, options)
        times.append(time.perf_counter() - start)
    return statistics.median(times), manifest


def make_phantom_mimic(root: Path, seed: int = 0, images: int = MIMIC_IMAGES, studies: int = MIMIC_STUDIES,
                       subjects: int = MIMIC_SUBJECTS) -> Path:
    """Write mimic-cxr-2.0.0-{metadata,negbio,split}.csv.gz with real id formats and sizes (no images)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    subject_ids = (10_000_000 + rng.choice(10_000_000, subjects, replace=False)).astype(str)
    study_ids = (50_000_000 + rng.choice(10_000_000, studies, replace=False)).astype(str)
    study_subject = np.concatenate([np.arange(subjects), rng.integers(0, subjects, studies - subjects)])
    image_study = np.concatenate([np.arange(studies), rng.integers(0, studies, images - studies)])
    rng.shuffle(image_study)
    views = np.array(list(VIEW_MIX), dtype=object)
    probs = np.array(list(VIEW_MIX.values()))
    view = views[rng.choice(len(views), images, p=probs / probs.sum())]

    metadata = pd.DataFrame({
        "dicom_id": _dicom_ids(rng, images),
        "subject_id": subject_ids[study_subject[image_study]],
        "study_id": study_ids[image_study],
        "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
        "ViewPosition": view,
        "Rows": rng.integers(2000, 3100, images),
        "Columns": rng.integers(2000, 3100, images),
        "StudyDate": rng.integers(21000101, 21991231, images),
        "StudyTime": np.round(rng.uniform(0, 235959, images), 3),
        "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
        "ViewCodeSequence_CodeMeaning": np.where(view == "LATERAL", "lateral", "antero-posterior"),
        "PatientOrientationCodeSequence_CodeMeaning": "Erect",
    })
    labelled = rng.random(studies) > 0.005           # a few studies have no label row, as in the release
    values = rng.choice(np.array(["1.0", "0.0", "-1.0", ""], dtype=object), size=(studies, len(MIMIC_LABELS)),
                        p=[0.12, 0.08, 0.04, 0.76])
    negbio = pd.DataFrame(values, columns=list(MIMIC_LABELS))
    negbio.insert(0, "study_id", study_ids)
    negbio.insert(0, "subject_id", subject_ids[study_subject])
    subject_split = rng.choice(np.array(["train", "validate", "test"], dtype=object), subjects, p=[0.978, 0.008, 0.014])
    split = metadata[["dicom_id", "study_id", "subject_id"]].copy()
    split["split"] = subject_split[study_subject[image_study]]

    gz = {"method": "gzip", "compresslevel": 1, "mtime": 0}
    metadata.to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False, compression=gz)
    negbio[labelled].to_csv(root / "mimic-cxr-2.0.0-negbio.csv.gz", index=False, compression=gz)
    split.to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False, compression=gz)
    return root


def make_phantom_chexpert(root: Path, seed: int = 0, rows: int = CHEXPERT_TRAIN_ROWS,
                          patients: int = CHEXPERT_TRAIN_PATIENTS) -> Path:
    """Write root/CheXpert-v1.0-small/{train,valid}.csv in the release's columns and sizes (no images)."""
    rng = np.random.default_rng(seed)
    folder = root / "CheXpert-v1.0-small"
    folder.mkdir(parents=True, exist_ok=True)
    train = _chexpert_rows(rng, "train", 1, rows, patients, ["1.0", "0.0", "-1.0", ""], [0.1, 0.1, 0.05, 0.75])
    valid = _chexpert_rows(rng, "valid", patients + 1, CHEXPERT_VALID_ROWS, CHEXPERT_VALID_PATIENTS,
                           ["1.0", "0.0"], [0.2, 0.8])
    train.to_csv(folder / "train.csv", index=False)
    valid.to_csv(folder / "valid.csv", index=False)
    return root


def _chexpert_rows(rng: np.random.Generator, folder: str, first: int, rows: int, patients: int, values: list[str],
                   probs: list[float]) -> pd.DataFrame:
    """`rows` rows of `patients` patients (patientNNNNN from `first`), two views per study, sorted by Path."""
    patient = np.sort(np.concatenate([np.arange(patients), rng.integers(0, patients, rows - patients)]))
    rank = pd.Series(patient).groupby(patient).cumcount().to_numpy()
    names = np.array(list(CHEXPERT_VIEWS), dtype=object)
    share = np.array(list(CHEXPERT_VIEWS.values()))
    view = names[rng.choice(len(names), rows, p=share / share.sum())]
    lateral = view == "LATERAL"
    side = np.where(lateral, "lateral", "frontal")
    path = (f"CheXpert-v1.0-small/{folder}/patient" + pd.Series(patient + first).astype(str).str.zfill(5)
            + "/study" + pd.Series(rank // 2 + 1).astype(str) + "/view" + pd.Series(rank % 2 + 1).astype(str)
            + "_" + side + ".jpg")
    frame = pd.DataFrame({"Path": path, "Sex": rng.choice(np.array(["Male", "Female"], dtype=object), rows),
                          "Age": rng.integers(18, 91, rows), "Frontal/Lateral": np.where(lateral, "Lateral", "Frontal"),
                          "AP/PA": np.where(lateral, "", view)})
    cells = rng.choice(np.array(values, dtype=object), size=(rows, len(CHEXPERT_LABELS)), p=probs)
    return pd.concat([frame, pd.DataFrame(cells, columns=list(CHEXPERT_LABELS))], axis=1)


def _dicom_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """n ids like '02aa804e-bde0afdd-112c0b34-7bc16630-4e384014' (5 groups of 8 hex digits)."""
    raw = rng.integers(0, 256, size=(n, 20), dtype=np.uint8)
    hexdigits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    chars = np.empty((n, 40), dtype=np.uint8)
    chars[:, 0::2] = hexdigits[raw >> 4]
    chars[:, 1::2] = hexdigits[raw & 15]
    out = np.full((n, 44), ord("-"), dtype=np.uint8)
    for group in range(5):
        out[:, group * 9: group * 9 + 8] = chars[:, group * 8: group * 8 + 8]
    return out.view("S44").ravel().astype(str).astype(object)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if args.workdir is not None:
        print(run(args.workdir))
        return
    with tempfile.TemporaryDirectory(prefix="cxr-manifest-bench-") as scratch:
        print(run(Path(scratch)))


if __name__ == "__main__":
    main()
