"""Calibration of a predictions table: Brier score, ECE and the reliability diagram, per label and macro.

Rules:
- Per label, over the rows where the label is known (NaN labels are left out of that label only):
  Brier = mean of (p - y)^2 (scikit-learn's `brier_score_loss`); ECE (Guo et al. 2017) with `N_BINS` (15)
  equal-width bins on the predicted probability p: bin k holds k/15 <= p < (k+1)/15, and p = 1 falls in the
  last bin; ECE = sum over bins of (images in bin / images) * |mean p in bin - observed rate in bin|.
- Macro = the mean over the labels with at least one known row (the same labels in every resample).
- Each number has a patient-bootstrap 95% interval (`trainer.evaluation.bootstrap`: the same resamples
  as the subgroups when they are handed in).
- The reliability data per bin: count, mean probability, observed rate (None for an empty bin), of the
  sample itself.
The result is plain JSON (report.json `calibration`); `plot_calibration` draws calibration.png from it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from trainer.evaluation.bootstrap import Resamples, estimate, resampled_sums, resamples_for
from trainer.metrics import PROB_PREFIX, EvalError

N_BINS = 15


def probability_bins(prob: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Equal-width bin of each probability: floor(p * n_bins), p = 1 in the last bin (p clipped to [0, 1])."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def calibration_metrics(predictions: pd.DataFrame, labels: Sequence[str], *, resamples: Resamples | None = None,
                        rows: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                        n_bins: int = N_BINS) -> dict:
    """Brier and ECE per label and macro with their intervals, and the reliability bins, of `rows` (a boolean
    mask; default every row). `resamples` (of the whole table) default to `resamples_for(predictions, n_boot,
    seed)`."""
    labels = list(labels)
    missing = [c for c in [*labels, *(PROB_PREFIX + name for name in labels)] if c not in predictions.columns]
    if missing:
        raise EvalError(f"predictions lack column(s) {', '.join(repr(c) for c in missing)}")
    if resamples is None:
        resamples = resamples_for(predictions, n_boot, seed)
    mask = np.ones(len(predictions), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    per_label, brier_rows, ece_rows, used = {}, [], [], []
    for name in labels:
        y = predictions[name].to_numpy(dtype=np.float64)
        p = predictions[PROB_PREFIX + name].to_numpy(dtype=np.float64)
        keep = np.flatnonzero(mask & ~np.isnan(y))
        sums = _bin_sums(resamples, keep, y[keep], p[keep], n_bins)
        n = sums[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            brier = np.where(n > 0, sums[:, -2] / np.where(n > 0, n, 1), np.nan)
            ece = np.where(n > 0, np.abs(sums[:, :n_bins]).sum(axis=1) / np.where(n > 0, n, 1), np.nan)
        per_label[name] = {"n": int(keep.size), "positives": int((y[keep] == 1).sum()),
                           "brier": estimate(brier, resamples.level), "ece": estimate(ece, resamples.level),
                           "reliability": reliability(y[keep], p[keep], n_bins)}
        if keep.size:
            brier_rows.append(brier)
            ece_rows.append(ece)
            used.append(name)
    macro = {"labels": used}
    for key, stack in (("brier", brier_rows), ("ece", ece_rows)):
        if stack:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # a resample where every label is NaN
                macro[key] = estimate(np.nanmean(np.stack(stack, axis=1), axis=1), resamples.level)
        else:
            macro[key] = {"value": None, "low": None, "high": None, "n_used": 0}
    return {"n_bins": n_bins, "binning": "equal-width on the predicted probability", "bootstrap": resamples.describe(),
            "per_label": per_label, "macro": macro}


def _bin_sums(resamples: Resamples, rows: np.ndarray, y: np.ndarray, p: np.ndarray, n_bins: int) -> np.ndarray:
    """float64 [1 + n_boot, n_bins + 2]: per bin the sum of (p - y); then the sum of (p - y)^2 and the count."""
    b = probability_bins(p, n_bins)
    values = np.zeros((rows.size, n_bins + 2))
    values[np.arange(rows.size), b] = p - y
    values[:, n_bins] = (p - y) ** 2
    values[:, n_bins + 1] = 1.0
    return resampled_sums(resamples, rows, values)


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """Per bin of the sample: its edges, count, mean probability and observed rate (None for an empty bin)."""
    b = probability_bins(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)
    return [{"bin": k, "low": k / n_bins, "high": (k + 1) / n_bins, "count": int(count[k]),
             "mean_probability": float(sum_p[k] / count[k]) if count[k] else None,
             "observed_rate": float(sum_y[k] / count[k]) if count[k] else None} for k in range(n_bins)]


def plot_calibration(calibration: dict, path: str | Path, title: str = "") -> Path:
    """calibration.png: a reliability diagram per label (observed rate against mean probability per bin,
    the diagonal, the bins' image counts as grey bars on a log scale) with its ECE and Brier in the title."""
    from trainer.plots import pyplot, save_figure

    plt = pyplot()
    labels = list(calibration["per_label"])
    cols = min(4, max(1, len(labels)))
    rows = max(1, int(np.ceil(len(labels) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(labels):
            ax.axis("off")
            continue
        entry = calibration["per_label"][labels[i]]
        bins = entry["reliability"]
        ax.plot([0, 1], [0, 1], ls="--", lw=0.6, color="grey")
        counts = ax.twinx()
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        counts.bar(centres, [b["count"] for b in bins], width=1.0 / len(bins) * 0.9, color="0.85", zorder=0)
        counts.set_yscale("symlog", linthresh=1)
        counts.tick_params(labelsize=5, colors="0.5")
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        filled = [b for b in bins if b["count"]]
        if filled:
            ax.plot([b["mean_probability"] for b in filled], [b["observed_rate"] for b in filled], marker="o",
                    ms=3, lw=1.2, color="C0")
            ece, brier = entry["ece"]["value"], entry["brier"]["value"]
            ax.set_title(f"{labels[i]}\nECE {ece:.3f}  Brier {brier:.3f}  (n={entry['n']})", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no labelled image", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.set_title(f"{labels[i]}\nundefined", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("mean predicted probability", fontsize=7)
        ax.set_ylabel("observed rate", fontsize=7)
        ax.tick_params(labelsize=6)
    macro = calibration["macro"]
    heading = title or "Reliability per label (grey bars: images per bin, log scale)"
    if macro.get("ece", {}).get("value") is not None:
        heading += f"; macro ECE {macro['ece']['value']:.3f}, Brier {macro['brier']['value']:.3f}"
    fig.suptitle(heading, fontsize=9)
    return save_figure(fig, path)
