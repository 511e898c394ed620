"""`make bench` section: subgroup evaluation (`trainer.evaluation.subgroups`) of 100,000 predictions.

A phantom-like predictions table (14 labels with No Finding, ~2.6 images per patient, sex and age drawn
per patient, probabilities that follow the labels) is evaluated with `by=sex,age` and 200 patient
resamples, calibration per group included. Issue 20's goal: under 30 s on 2 cores.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

N_IMAGES = 100_000
N_BOOT = 200
LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
          "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "No Finding")


def predictions_table(n: int = N_IMAGES, seed: int = 0, labels=LABELS) -> pd.DataFrame:
    """key, set, patient_id, split, view, sex, age, labels (float32 1/0/NaN) and prob_ columns (float32)."""
    rng = np.random.default_rng([seed, 0xE7A1])
    per_patient = rng.geometric(1 / 2.6, size=n)
    patient = np.repeat(np.arange(n), per_patient)[:n]
    n_patients = int(patient[-1]) + 1
    sex = np.where(rng.random(n_patients) < 0.56, "M", "F")[patient]
    age = rng.uniform(1, 95, n_patients)[patient]
    frame = pd.DataFrame({"key": [f"k{i:06d}" for i in range(n)], "set": "nih-bench",
                          "patient_id": patient.astype(str), "split": "test",
                          "view": np.where(rng.random(n) < 0.6, "PA", "AP"), "sex": sex, "age": age})
    findings = []
    for name in labels[:-1]:
        y = (rng.random(n) < rng.uniform(0.03, 0.2)).astype(np.float32)
        y[rng.random(n) < 0.02] = np.nan
        frame[name] = y
        findings.append(np.nan_to_num(y))
    any_finding = np.max(findings, axis=0)
    frame[labels[-1]] = (1 - any_finding).astype(np.float32)
    for name in labels:
        y = np.nan_to_num(frame[name].to_numpy())
        logit = -1.5 + 2.0 * y + rng.normal(0, 1.0, n)
        frame["prob_" + name] = (1 / (1 + np.exp(-logit))).astype(np.float32)
    return frame


def time_subgroups(n: int = N_IMAGES, n_boot: int = N_BOOT, by=("sex", "age")) -> dict:
    """{"seconds", "images", "patients", "n_boot"}: wall time of one `subgroup_metrics` call."""
    from trainer.evaluation.subgroups import subgroup_metrics

    frame = predictions_table(n)
    thresholds = {name: 0.5 for name in LABELS}
    started = time.perf_counter()
    result = subgroup_metrics(frame, list(LABELS), list(by), thresholds, n_boot=n_boot, seed=0)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images": n, "patients": int(frame["patient_id"].nunique()), "n_boot": n_boot,
            "groups": sum(len(c["groups"]) for c in result["columns"])}


def run(workdir: Path) -> str:
    """The markdown section for BENCHMARKS.md."""
    t = time_subgroups()
    return "\n".join([
        "## Subgroup evaluation (issue 20)",
        "",
        f"`subgroup_metrics` with `by=sex,age` on {t['images']:,} phantom-like predictions ({t['patients']:,} "
        f"patients, {len(LABELS)} labels, {t['groups']} groups), {t['n_boot']} patient resamples, calibration per "
        f"group included: **{t['seconds']:.1f} s** (goal: under 30 s on 2 cores).",
    ])


if __name__ == "__main__":
    print(run(Path(".bench")))
