"""The metric math of training and evaluation, on arrays and on saved prediction tables.

- Label matrices hold 1, 0 and NaN (not labelled); a label whose usable rows hold a single class has no
  AUROC/AUPRC: NaN (or None in reports), listed as undefined and left out of the macro averages.
- Every number equals scikit-learn's on the same arrays (`fast_auroc` is the Mann-Whitney form of
  `roc_auc_score`, used inside the bootstrap).
- The bootstrap resamples patients (all their images together) from `numpy.random.default_rng(seed)`.
- Prediction tables (`predictions.parquet`): key, patient_id, split, one true-label column per label,
  one `prob_LABEL` column per label, rows sorted by key.
No torch import: `trainer.evaluation` does the loading and predicting.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from manifests.atomic import atomic_path
from manifests.errors import CxrError

# Defaults of the bootstrap interval for macro AUROC.
N_BOOTSTRAP = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95

PROB_PREFIX = "prob_"


class EvalError(CxrError):
    """A run, checkpoint, prediction file or shard set cannot be evaluated as given."""


def _2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def auroc_per_label(y_true, y_prob) -> np.ndarray:
    """AUROC of each column over its labelled rows; NaN where the column has one class (or none)."""
    y_true, y_prob = _2d(y_true), _2d(y_prob)
    if y_true.shape != y_prob.shape:
        raise ValueError(f"labels {y_true.shape} and probabilities {y_prob.shape} differ in shape")
    out = np.full(y_true.shape[1], np.nan)
    for j in range(y_true.shape[1]):
        keep = ~np.isnan(y_true[:, j])
        y = y_true[keep, j]
        if (y == 1).any() and (y == 0).any():
            out[j] = roc_auc_score(y, y_prob[keep, j])
    return out


def macro_auroc(y_true, y_prob) -> float:
    """Mean AUROC over the labels where it is defined; NaN when none is."""
    per = auroc_per_label(y_true, y_prob)
    per = per[~np.isnan(per)]
    return float(per.mean()) if per.size else float("nan")


def micro_auroc(y_true, y_prob) -> float:
    """AUROC of all labelled (sample, label) entries pooled; NaN when they hold a single class."""
    y_true, y_prob = _2d(y_true), _2d(y_prob)
    keep = ~np.isnan(y_true)
    y, p = y_true[keep], y_prob[keep]
    if not ((y == 1).any() and (y == 0).any()):
        return float("nan")
    return float(roc_auc_score(y, p))


# --------------------------------------------------------------------------- metrics on arrays

def _as_2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def _usable(y: np.ndarray) -> np.ndarray:
    return ~np.isnan(y)


def is_defined(y: np.ndarray) -> bool:
    """True when a label column (usable rows only) has at least one positive and one negative."""
    y = y[_usable(y)]
    return bool(y.size) and bool((y == 1).any()) and bool((y == 0).any())


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float | None:
    """The probability threshold maximising sensitivity + specificity - 1 (Youden's J).

    Predictions `p >= threshold` count as positive (scikit-learn's roc_curve convention).
    None when the label is degenerate or no threshold beats chance (J <= 0).
    """
    keep = _usable(y)
    y, p = y[keep], p[keep]
    if not is_defined(y):
        return None
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    best = int(np.argmax(j))
    if j[best] <= 0 or not np.isfinite(thr[best]):
        return None
    return float(thr[best])


def _confusion(y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray) -> dict:
    """Counts and rates of `p >= threshold` against `y` (0/1, no NaN); threshold scalar or per row."""
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    tp, fn = int((pred & pos).sum()), int((~pred & pos).sum())
    tn, fp = int((~pred & neg).sum()), int((pred & neg).sum())
    n = tp + fn + tn + fp
    return {
        "threshold": float(threshold) if np.ndim(threshold) == 0 else None,
        "accuracy": (tp + tn) / n if n else None,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def fast_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC by the Mann-Whitney rank sum (ties averaged): equals roc_auc_score, much faster.

    `y` holds only 0/1 (no NaN); NaN when one class is absent.
    """
    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(p)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _patient_resamples(patient_ids: Sequence[str] | None, n: int, n_boot: int, seed: int):
    """Row indices of `n_boot` patient resamples: each draws as many patients as there are, with
    replacement, from `numpy.random.default_rng(seed)` (patients in sorted id order), all their rows."""
    ids = np.asarray(patient_ids if patient_ids is not None else np.arange(n)).astype(str)
    uniq, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(uniq)))
    counts = np.bincount(inverse, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(uniq), size=len(uniq))
        yield np.concatenate([order[starts[d]:starts[d] + counts[d]] for d in drawn])


def _resample_aurocs(y_true: np.ndarray, y_prob: np.ndarray, rows: np.ndarray, labels_idx: list[int]) -> np.ndarray:
    aucs = []
    for j in labels_idx:
        y, p = y_true[rows, j], y_prob[rows, j]
        keep = ~np.isnan(y)
        aucs.append(fast_auroc(y[keep], p[keep]))
    return np.asarray(aucs)


def _interval(values: list[float], level: float) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    alpha = (1.0 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def bootstrap_macro_auroc(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patient_ids: Sequence[str] | None,
    labels_idx: Sequence[int],
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> dict:
    """Percentile bootstrap interval of macro AUROC, resampling patients (all their images together).

    Each resample draws as many patients as the split has, with replacement, from
    `numpy.random.default_rng(seed)`. Macro AUROC of a resample is the mean over the labels in
    `labels_idx` that are defined in that resample; resamples where none is defined are dropped.
    """
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    n = y_true.shape[0]
    labels_idx = list(labels_idx)
    out = {"level": level, "n_boot": int(n_boot), "seed": int(seed), "unit": "patient",
           "low": None, "high": None, "n_used": 0, "resamples_missing_a_label": 0}
    if n == 0 or not labels_idx or n_boot <= 0:
        return out
    values, missing = [], 0
    for rows in _patient_resamples(patient_ids, n, n_boot, seed):
        aucs = _resample_aurocs(y_true, y_prob, rows, labels_idx)
        if np.isnan(aucs).any():
            missing += 1
        if np.isnan(aucs).all():
            continue
        values.append(float(np.nanmean(aucs)))
    out["n_used"] = len(values)
    out["resamples_missing_a_label"] = missing
    out["low"], out["high"] = _interval(values, level)
    return out


def bootstrap_label_aurocs(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    patient_ids: Sequence[str] | None,
    labels_idx: Sequence[int],
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> list[dict]:
    """Per-label percentile bootstrap intervals of AUROC, one dict per entry of `labels_idx`.

    The same patient resamples as `bootstrap_macro_auroc` with this seed (so each label's interval equals
    `bootstrap_macro_auroc` over that label alone); a label's interval uses the resamples where it is defined.
    """
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    n = y_true.shape[0]
    labels_idx = list(labels_idx)
    values: list[list[float]] = [[] for _ in labels_idx]
    if n and labels_idx and n_boot > 0:
        for rows in _patient_resamples(patient_ids, n, n_boot, seed):
            for k, auc in enumerate(_resample_aurocs(y_true, y_prob, rows, labels_idx)):
                if not np.isnan(auc):
                    values[k].append(float(auc))
    out = []
    for vals in values:
        low, high = _interval(vals, level)
        out.append({"level": level, "n_boot": int(n_boot), "seed": int(seed), "unit": "patient",
                    "low": low, "high": high, "n_used": len(vals)})
    return out


def compute_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    *,
    patient_ids: Sequence[str] | None = None,
    thresholds: dict[str, float | None] | None = None,
    threshold_source: str = "valid",
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """All metrics of one split. `y_true` [N, L] (1, 0, NaN = not labelled), `y_prob` [N, L].

    `thresholds` maps label -> the threshold chosen on another split (Youden on `valid`); a label
    missing from it or mapped to None falls back to 0.5 (and says so).
    """
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    labels = list(labels)
    if y_true.shape != y_prob.shape or y_true.shape[1] != len(labels):
        raise EvalError(
            f"labels {y_true.shape} and probabilities {y_prob.shape} do not match {len(labels)} label names"
        )
    thresholds = thresholds or {}
    per_label, defined_idx, undefined = {}, [], []
    for j, name in enumerate(labels):
        keep = _usable(y_true[:, j])
        y, p = y_true[keep, j], y_prob[keep, j]
        n_pos = int((y == 1).sum())
        entry = {
            "n": int(y.size),
            "positives": n_pos,
            "negatives": int(y.size - n_pos),
            "prevalence": n_pos / y.size if y.size else None,
            "defined": is_defined(y),
            "auroc": None,
            "auprc": None,
        }
        if entry["defined"]:
            entry["auroc"] = float(roc_auc_score(y, p))
            entry["auprc"] = float(average_precision_score(y, p))
            defined_idx.append(j)
        else:
            undefined.append(name)
        entry["at_0.5"] = _confusion(y, p, 0.5)
        thr = thresholds.get(name)
        entry["threshold_source"] = threshold_source if thr is not None else "default 0.5"
        entry["at_threshold"] = _confusion(y, p, 0.5 if thr is None else thr)
        per_label[name] = entry

    # Micro: every usable (sample, label) pair pooled; equals sklearn's average="micro".
    mask = _usable(y_true)
    y_flat, p_flat = y_true[mask], y_prob[mask]
    micro_defined = is_defined(y_flat)
    pooled_05 = _confusion(y_flat, p_flat, 0.5)
    thr_matrix = np.array([
        [0.5 if thresholds.get(name) is None else thresholds[name] for name in labels]
    ]).repeat(y_true.shape[0], axis=0)
    pooled_thr = _confusion(y_flat, p_flat, thr_matrix[mask])

    def _macro(key: str) -> float | None:
        vals = [per_label[labels[j]][key] for j in defined_idx]
        return float(np.mean(vals)) if vals else None

    return {
        "n_samples": int(y_true.shape[0]),
        "n_patients": int(len(set(patient_ids))) if patient_ids is not None else None,
        "labels": labels,
        "defined_labels": [labels[j] for j in defined_idx],
        "undefined_labels": undefined,
        "macro_auroc": _macro("auroc"),
        "macro_auprc": _macro("auprc"),
        "micro_auroc": float(roc_auc_score(y_flat, p_flat)) if micro_defined else None,
        "micro_auprc": float(average_precision_score(y_flat, p_flat)) if micro_defined else None,
        "accuracy": pooled_05["accuracy"],
        "accuracy_at_threshold": pooled_thr["accuracy"],
        "pooled_at_0.5": pooled_05,
        "pooled_at_threshold": pooled_thr,
        "macro_auroc_ci": bootstrap_macro_auroc(
            y_true, y_prob, patient_ids, defined_idx, n_boot=n_boot, seed=seed
        ),
        "per_label": per_label,
    }


def youden_thresholds(y_true: np.ndarray, y_prob: np.ndarray, labels: Sequence[str]) -> dict:
    """label -> Youden threshold on these arrays (None where undefined)."""
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    return {name: youden_threshold(y_true[:, j], y_prob[:, j]) for j, name in enumerate(labels)}


# --------------------------------------------------------------------------- prediction tables

def predictions_frame(
    keys: Sequence[str],
    patient_ids: Sequence[str],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    split: str,
) -> pd.DataFrame:
    """key, patient_id, split, one true-label column per label (float32, NaN = not labelled) and
    one `prob_LABEL` column per label (float32), rows sorted by key."""
    y_true, y_prob = _as_2d(y_true), _as_2d(y_prob)
    df = pd.DataFrame({"key": list(keys), "patient_id": list(patient_ids), "split": split})
    for j, name in enumerate(labels):
        df[name] = y_true[:, j].astype(np.float32)
    for j, name in enumerate(labels):
        df[PROB_PREFIX + name] = y_prob[:, j].astype(np.float32)
    return df.sort_values("key", kind="stable").reset_index(drop=True)


def write_predictions(df: pd.DataFrame, path: Path, labels: Sequence[str], meta: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    info = {"labels": list(labels), **(meta or {})}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"cxr": json.dumps(info).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_predictions(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A predictions.parquet back as (frame, label names)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no predictions at {path}: run `cxr eval --run RUN` first")
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"cxr", b"{}"))
    df = table.to_pandas()
    labels = meta.get("labels") or [c[len(PROB_PREFIX):] for c in df.columns if c.startswith(PROB_PREFIX)]
    return df, labels


def patient_keys(df: pd.DataFrame) -> list[str]:
    """Who each row's patient is, for the patient bootstrap: `SET/PATIENT_ID` (patients of two shard sets never
    merge); a predictions file of release 0.1 has no `set` column and its ids as written."""
    if "set" not in df.columns:
        return df["patient_id"].astype(str).tolist()
    return (df["set"].astype(str) + "/" + df["patient_id"].astype(str)).tolist()


def frame_arrays(df: pd.DataFrame, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = df[list(labels)].to_numpy(np.float64)
    p = df[[PROB_PREFIX + n for n in labels]].to_numpy(np.float64)
    return y, p


def metrics_from_predictions(
    predictions: str | Path,
    valid_predictions: str | Path | None = None,
    *,
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """Recompute every metric from saved prediction files (thresholds from the valid file)."""
    df, labels = read_predictions(predictions)
    thresholds, source = None, "valid"
    if valid_predictions is not None:
        vdf, vlabels = read_predictions(valid_predictions)
        if list(vlabels) != list(labels):
            raise EvalError(f"{valid_predictions} has labels {vlabels}, {predictions} has {labels}")
        thresholds = youden_thresholds(*frame_arrays(vdf, labels), labels)
    y, p = frame_arrays(df, labels)
    return compute_metrics(y, p, labels, patient_ids=patient_keys(df),
                           thresholds=thresholds, threshold_source=source, n_boot=n_boot, seed=seed)
