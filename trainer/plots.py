"""ROC and precision-recall figures of one evaluated split: one small panel per label (with its
AUROC or AUPRC in the title) plus a panel for the micro curve (all usable label entries pooled)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from manifests.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display; imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_pyplot = pyplot   # the name trainer.watch imports


def _curve(kind: str, y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import precision_recall_curve, roc_curve

    if kind == "roc":
        fpr, tpr, _ = roc_curve(y, p)
        return fpr, tpr
    precision, recall, _ = precision_recall_curve(y, p)
    return recall, precision


def plot_curves(
    kind: str,
    y_true: np.ndarray,
    y_prob: np.ndarray,
    labels: Sequence[str],
    metrics: dict,
    path: str | Path,
    title: str = "",
) -> Path:
    """Write `roc.png` (kind="roc") or `pr.png` (kind="pr").

    `metrics` is `compute_metrics`' result for the same arrays: titles show its numbers, so the
    figure and report.json never disagree. Undefined labels get an empty panel saying why.
    """
    if kind not in ("roc", "pr"):
        raise ValueError(f"kind must be 'roc' or 'pr', not {kind!r}")
    plt = pyplot()
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_prob = np.asarray(y_prob, dtype=np.float64).reshape(len(y_prob), -1)
    key = "auroc" if kind == "roc" else "auprc"
    panels = list(labels) + ["micro (all labels pooled)"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.axis("off")
            continue
        if i < len(labels):
            keep = ~np.isnan(y_true[:, i])
            y, p = y_true[keep, i], y_prob[keep, i]
            value = metrics["per_label"][labels[i]][key]
            prevalence = metrics["per_label"][labels[i]]["prevalence"]
        else:
            keep = ~np.isnan(y_true)
            y, p = y_true[keep], y_prob[keep]
            value = metrics[f"micro_{key}"]
            prevalence = float(y.mean()) if y.size else None
        name = panels[i]
        if value is None:
            ax.text(0.5, 0.5, "undefined:\nno positive or\nno negative", ha="center", va="center",
                    fontsize=8, transform=ax.transAxes)
            ax.set_title(f"{name}\n{key.upper()} undefined", fontsize=8)
        else:
            xs, ys = _curve(kind, y, p)
            ax.plot(xs, ys, lw=1.2, color="C0" if i < len(labels) else "C3")
            ax.set_title(f"{name}\n{key.upper()} {value:.3f}  (n={y.size})", fontsize=8)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls="--", lw=0.6, color="grey")
            ax.set_xlabel("1 - specificity", fontsize=7)
            ax.set_ylabel("sensitivity", fontsize=7)
        else:
            if prevalence is not None:
                ax.axhline(prevalence, ls="--", lw=0.6, color="grey")
            ax.set_xlabel("recall", fontsize=7)
            ax.set_ylabel("precision", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Lay out `fig`, write it as PNG atomically (parent folders made), close it; returns the path."""
    fig.tight_layout()
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return final
