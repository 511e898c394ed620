"""AUROC on label matrices with NaN = not labelled, equal to scikit-learn's `roc_auc_score`.

A label whose usable rows hold a single class has no AUROC: NaN, left out of the macro average.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


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
