"""Calibration (trainer/evaluation/calibration.py): Brier equals scikit-learn's, ECE equals a direct
computation of a few lines, reliability bins equal direct counts, all from the predictions table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss

from trainer.evaluation.calibration import calibration_metrics, plot_calibration
from trainer.metrics import EvalError

LABELS = ["Effusion", "Edema", "Mass"]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    rng = np.random.default_rng([4, 20])
    n = 3000
    frame = pd.DataFrame({"key": [f"k{i}" for i in range(n)], "patient_id": rng.integers(0, 900, n).astype(str)})
    for j, name in enumerate(LABELS):
        p = rng.random(n) ** (1 + j)
        y = (rng.random(n) < p ** 1.3).astype(np.float32)
        y[rng.random(n) < 0.1] = np.nan                          # not labelled: left out of this label only
        frame[name] = y
        frame["prob_" + name] = p.astype(np.float32)
    frame.loc[:3, "prob_Mass"] = [0.0, 1.0, 1 / 15, 14 / 15]     # edges: p = 1 is in the last bin
    return frame


def direct_ece(y: np.ndarray, p: np.ndarray, bins: int = 15) -> float:
    ece = 0.0
    for k in range(bins):
        inside = (p >= k / bins) & ((p < (k + 1) / bins) if k < bins - 1 else (p <= 1.0))
        if inside.any():
            ece += inside.sum() / len(p) * abs(p[inside].mean() - y[inside].mean())
    return ece


def test_brier_and_ece_equal_the_references_per_label_and_macro(table):
    result = calibration_metrics(table, LABELS, n_boot=100, seed=0)
    briers, eces = [], []
    for name in LABELS:
        known = table[table[name].notna()]
        y, p = known[name].to_numpy(np.float64), known["prob_" + name].to_numpy(np.float64)
        entry = result["per_label"][name]
        assert entry["n"] == len(known) and entry["positives"] == int(y.sum())
        assert entry["brier"]["value"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)
        assert entry["ece"]["value"] == pytest.approx(direct_ece(y, p), abs=1e-12)
        for key in ("brier", "ece"):
            assert entry[key]["low"] < entry[key]["value"] < entry[key]["high"]
        briers.append(brier_score_loss(y, p))
        eces.append(direct_ece(y, p))
    assert result["macro"]["brier"]["value"] == pytest.approx(np.mean(briers))
    assert result["macro"]["ece"]["value"] == pytest.approx(np.mean(eces))
    assert result["macro"]["labels"] == LABELS and result["n_bins"] == 15


def test_reliability_bins_are_direct_counts_means_and_rates(table):
    result = calibration_metrics(table, LABELS, n_boot=0, seed=0)
    known = table[table["Mass"].notna()]
    y, p = known["Mass"].to_numpy(np.float64), known["prob_Mass"].to_numpy(np.float64)
    bins = result["per_label"]["Mass"]["reliability"]
    assert len(bins) == 15 and sum(b["count"] for b in bins) == len(known)
    for b in bins:
        inside = (p >= b["low"]) & ((p < b["high"]) if b["bin"] < 14 else (p <= 1.0))
        assert b["count"] == int(inside.sum())
        if b["count"]:
            assert b["mean_probability"] == pytest.approx(p[inside].mean())
            assert b["observed_rate"] == pytest.approx(y[inside].mean())
        else:
            assert b["mean_probability"] is None and b["observed_rate"] is None
    assert result["per_label"]["Mass"]["brier"]["low"] is None          # no resamples, no interval


def test_rows_restrict_to_a_group_and_the_interval_is_deterministic(table, tmp_path):
    rows = np.asarray(table.index % 2 == 0)
    result = calibration_metrics(table, LABELS, rows=rows, n_boot=50, seed=9)
    known = table[rows & table["Edema"].notna().to_numpy()]
    assert result["per_label"]["Edema"]["brier"]["value"] == pytest.approx(
        brier_score_loss(known["Edema"].to_numpy(np.float64), known["prob_Edema"].to_numpy(np.float64)), abs=1e-12)
    assert json.dumps(result, allow_nan=False) == json.dumps(
        calibration_metrics(table, LABELS, rows=rows, n_boot=50, seed=9), allow_nan=False)
    path = plot_calibration(result, tmp_path / "calibration.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_columns_are_one_line_errors(table):
    with pytest.raises(EvalError, match="predictions lack column\\(s\\) 'Hernia', 'prob_Hernia'"):
        calibration_metrics(table, ["Hernia"], n_boot=5)
