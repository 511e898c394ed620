"""Metrics on saved predictions equal scikit-learn's; degenerate labels are undefined, not NaN."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from trainer.metrics import (
    bootstrap_macro_auroc,
    compute_metrics,
    fast_auroc,
    metrics_from_predictions,
    predictions_frame,
    read_predictions,
    write_predictions,
    youden_threshold,
)
from trainer.plots import plot_curves
from trainer.evaluation.report import render_markdown, write_report

LABELS = ["Atelectasis", "Cardiomegaly", "Effusion", "Hernia", "No Finding"]


def _arrays(n: int = 120, seed: int = 1):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.3).astype(np.float64)
    y[:, 3] = 0.0                       # Hernia: no positive in this split
    y[:, 4] = 1.0                       # No Finding: no negative
    y[rng.random((n, len(LABELS))) < 0.1] = np.nan   # some not labelled
    p = np.clip(0.35 * np.nan_to_num(y) + rng.random(y.shape) * 0.7, 0, 1)
    p[:5, 0] = p[5, 0]                   # ties
    patients = [f"p{i // 3}" for i in range(n)]   # three images per patient
    keys = [f"k{i:04d}" for i in range(n)]
    return keys, patients, y, p


def _sk(y, p, j, fn):
    keep = ~np.isnan(y[:, j])
    return fn(y[keep, j], p[keep, j])


def test_metrics_equal_sklearn_on_saved_predictions(tmp_path):
    keys, patients, y, p = _arrays()
    vkeys, vpatients, vy, vp = _arrays(60, seed=2)
    path, vpath = tmp_path / "predictions.parquet", tmp_path / "valid_predictions.parquet"
    write_predictions(predictions_frame(keys, patients, y, p, LABELS, "test"), path, LABELS)
    write_predictions(predictions_frame(vkeys, vpatients, vy, vp, LABELS, "valid"), vpath, LABELS)
    df, labels = read_predictions(path)
    assert labels == LABELS and list(df.columns[:3]) == ["key", "patient_id", "split"]

    m = metrics_from_predictions(path, vpath, n_boot=50)
    # Recompute from the saved (float32) file with sklearn alone.
    ys = df[LABELS].to_numpy(np.float64)
    ps = df[[f"prob_{n}" for n in LABELS]].to_numpy(np.float64)
    for j, name in enumerate(LABELS[:3]):
        e = m["per_label"][name]
        assert e["auroc"] == pytest.approx(_sk(ys, ps, j, roc_auc_score), abs=1e-12)
        assert e["auprc"] == pytest.approx(_sk(ys, ps, j, average_precision_score), abs=1e-12)
        keep = ~np.isnan(ys[:, j])
        assert e["positives"] == int(ys[keep, j].sum()) and e["n"] == int(keep.sum())
        assert e["prevalence"] == pytest.approx(ys[keep, j].mean())
    assert m["undefined_labels"] == ["Hernia", "No Finding"]
    for name in ("Hernia", "No Finding"):
        assert m["per_label"][name]["auroc"] is None and m["per_label"][name]["auprc"] is None
    expected_macro = np.mean([_sk(ys, ps, j, roc_auc_score) for j in range(3)])
    assert m["macro_auroc"] == pytest.approx(expected_macro, abs=1e-12)
    assert m["macro_auprc"] == pytest.approx(np.mean([_sk(ys, ps, j, average_precision_score) for j in range(3)]))
    mask = ~np.isnan(ys)
    assert m["micro_auroc"] == pytest.approx(roc_auc_score(ys[mask], ps[mask]), abs=1e-12)
    assert m["micro_auprc"] == pytest.approx(average_precision_score(ys[mask], ps[mask]), abs=1e-12)
    assert m["accuracy"] == pytest.approx(((ps[mask] >= 0.5) == (ys[mask] == 1)).mean())
    # JSON-safe: no NaN anywhere (undefined is null).
    text = json.dumps(m, allow_nan=False)
    assert "NaN" not in text


def test_micro_equals_sklearn_micro_without_missing_labels():
    rng = np.random.default_rng(0)
    y = (rng.random((80, 3)) < 0.4).astype(float)
    p = rng.random((80, 3))
    m = compute_metrics(y, p, ["a", "b", "c"], n_boot=0)
    assert m["micro_auroc"] == pytest.approx(roc_auc_score(y, p, average="micro"))
    assert m["macro_auroc"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert m["micro_auprc"] == pytest.approx(average_precision_score(y, p, average="micro"))
    assert m["macro_auprc"] == pytest.approx(average_precision_score(y, p, average="macro"))


def test_sensitivity_specificity_and_youden():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1], dtype=float)
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.9, 0.7, 0.8])
    thr = youden_threshold(y, p)
    assert thr == pytest.approx(0.4)  # J = 1 - 1/4 at 0.4; 3/4 - 1/4 at 0.5
    m = compute_metrics(y, p, ["x"], thresholds={"x": thr}, n_boot=0)
    a, t = m["per_label"]["x"]["at_0.5"], m["per_label"]["x"]["at_threshold"]
    assert (a["tp"], a["fp"], a["tn"], a["fn"]) == (3, 1, 3, 1)
    assert a["sensitivity"] == 0.75 and a["specificity"] == 0.75 and a["accuracy"] == 0.75
    assert t["threshold"] == pytest.approx(0.4) and t["sensitivity"] == 1.0 and t["specificity"] == 0.75
    # Degenerate or chance-level valid labels fall back to 0.5.
    assert youden_threshold(np.zeros(4), np.random.default_rng(0).random(4)) is None
    assert youden_threshold(np.array([1.0, 0.0]), np.array([0.1, 0.9])) is None
    m = compute_metrics(y, p, ["x"], thresholds={"x": None}, n_boot=0)
    assert m["per_label"]["x"]["threshold_source"] == "default 0.5"


def test_fast_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.2).astype(float)
    p = np.round(rng.random(200), 1)
    assert fast_auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_bootstrap_ci_is_seeded_and_contains_point_estimate():
    keys, patients, y, p = _arrays(300, seed=5)
    a = bootstrap_macro_auroc(y, p, patients, [0, 1, 2], n_boot=200, seed=7)
    b = bootstrap_macro_auroc(y, p, patients, [0, 1, 2], n_boot=200, seed=7)
    c = bootstrap_macro_auroc(y, p, patients, [0, 1, 2], n_boot=200, seed=8)
    assert a == b and a != c
    m = compute_metrics(y, p, LABELS, patient_ids=patients, n_boot=200, seed=7)
    assert m["macro_auroc_ci"] == a
    assert a["low"] < m["macro_auroc"] < a["high"] and a["n_used"] == 200 and a["unit"] == "patient"
    assert m["n_patients"] == 100


def test_report_and_plots_written(tmp_path):
    keys, patients, y, p = _arrays()
    m = compute_metrics(y, p, LABELS, patient_ids=patients, n_boot=20)
    report = {"run": "runs/x", "split": "test", "model": "resnet18", "task": "multilabel",
              "checkpoint": {"path": "runs/x/best.pt", "epoch": 2},
              "shard_set": {"name": "nih-64", "source": "nih", "size": 64, "card_sha256": "ab" * 32},
              "references": [{"name": "CheXNet", "macro_auroc": 0.841, "ours_macro_auroc": 0.7, "note": ""}],
              "metrics": m}
    paths = write_report(report, tmp_path)
    assert json.loads(paths["report.json"].read_text())["metrics"]["macro_auroc"] == m["macro_auroc"]
    md = paths["report.md"].read_text()
    assert "macro AUROC" in md and "Hernia" in md and "undefined" in md and "CheXNet" in md
    assert md == render_markdown(report)
    for kind in ("roc", "pr"):
        out = plot_curves(kind, y, p, LABELS, m, tmp_path / f"{kind}.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
