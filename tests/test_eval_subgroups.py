"""Subgroups (trainer/evaluation/subgroups.py) and the vectorised bootstrap (trainer/evaluation/bootstrap.py):
every number against a plain reference computed here from the predictions table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from trainer.evaluation.bootstrap import draw_resamples, group_aurocs, patient_codes, resampled_sums, weighted_auroc
from trainer.evaluation.subgroups import group_codes, plot_subgroups, subgroup_metrics, subgroups_markdown
from trainer.metrics import EvalError

LABELS = ["Effusion", "Edema", "Hernia", "No Finding"]


def predictions(n_patients: int = 600, seed: int = 0, noisy_sex: str | None = None, flip: float = 0.0,
                labels=LABELS) -> pd.DataFrame:
    """A phantom-like predictions table: patients with 1-4 images, sex and age per patient, view per image;
    probabilities follow the true labels; with `noisy_sex`, that sex's RECORDED labels are flipped with
    probability `flip` (the planted gap: its AUROC against the recorded labels drops)."""
    rng = np.random.default_rng([seed, 20])
    per = rng.integers(1, 5, n_patients)
    patient = np.repeat(np.arange(n_patients), per)
    n = len(patient)
    sex = np.where(rng.random(n_patients) < 0.5, "F", "M")[patient]
    age = rng.uniform(0, 99, n_patients)[patient]
    frame = pd.DataFrame({"key": [f"k{i:05d}" for i in range(n)], "set": "nih-phantom",
                          "patient_id": patient.astype(str), "split": "test",
                          "view": np.where(rng.random(n) < 0.6, "PA", "AP"), "sex": sex, "age": age})
    findings = []
    prevalence = {"Effusion": 0.25, "Edema": 0.2, "Hernia": 0.004}
    for name in labels:
        if name == "No Finding":
            continue
        truth = (rng.random(n) < prevalence.get(name, 0.2)).astype(np.float64)
        findings.append(truth)
        frame[name] = truth
    if "No Finding" in labels:
        frame["No Finding"] = 1.0 - np.max(findings, axis=0)
    for name in labels:
        truth = frame[name].to_numpy()
        frame["prob_" + name] = (1 / (1 + np.exp(-(-1.2 + 2.4 * truth + rng.normal(0, 1, n))))).astype(np.float32)
        recorded = truth.copy()
        if noisy_sex is not None:
            flipped = (sex == noisy_sex) & (rng.random(n) < flip)
            recorded[flipped] = 1.0 - recorded[flipped]
        recorded[rng.random(n) < 0.03] = np.nan
        frame[name] = recorded.astype(np.float32)
    return frame


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return predictions()


@pytest.fixture(scope="module")
def result(table) -> dict:
    thresholds = {"Effusion": 0.45, "Edema": None, "Hernia": 0.5, "No Finding": 0.55}
    return subgroup_metrics(table, LABELS, ["sex", "age", "view"], thresholds, n_boot=60, seed=3)


def group(result: dict, column: str, value: str) -> dict:
    found = next(c for c in result["columns"] if c["column"] == column)
    return next(g for g in found["groups"] if g["value"] == value)


def test_auroc_per_group_equals_sklearn_on_that_groups_rows(table, result):
    checked = 0
    for column in ("sex", "age", "view"):
        codes, names = group_codes(table, column)
        for g, name in enumerate(names):
            rows = table[codes == g]
            entry = group(result, column, name)
            assert entry["images"] == len(rows)
            assert entry["patients"] == rows["patient_id"].nunique()
            for label in ("Effusion", "Edema", "No Finding"):
                known = rows[rows[label].notna()]
                y, p = known[label].to_numpy(), known["prob_" + label].to_numpy()
                cell = entry["per_label"][label]
                assert cell["positives"] == int((y == 1).sum()) and cell["negatives"] == int((y == 0).sum())
                if cell["auroc"] is None:
                    continue
                assert cell["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
                assert cell["low"] <= cell["auroc"] <= cell["high"]
                checked += 1
            rest = table[(codes >= 0) & (codes != g)]
            known = rest[rest["Effusion"].notna()]
            rest_auc = roc_auc_score(known["Effusion"], known["prob_Effusion"])
            diff = entry["vs_rest"]["per_label"]["Effusion"]
            assert diff["difference"] == pytest.approx(entry["per_label"]["Effusion"]["auroc"] - rest_auc, abs=1e-12)
            assert entry["vs_rest"]["images"] == len(rest)
    assert checked >= 20


def test_macro_auroc_is_the_mean_over_the_labels_with_a_number(table, result):
    entry = group(result, "sex", "F")
    used = entry["macro_auroc"]["labels"]
    assert "Hernia" not in used and used == ["Effusion", "Edema", "No Finding"]
    assert entry["macro_auroc"]["value"] == pytest.approx(np.mean([entry["per_label"][k]["auroc"] for k in used]))


def test_a_label_with_fewer_than_min_group_positives_says_too_few(table, result):
    entry = group(result, "sex", "M")["per_label"]["Hernia"]
    rows = table[(table["sex"] == "M") & table["Hernia"].notna()]
    assert entry["positives"] == int((rows["Hernia"] == 1).sum()) < 20
    assert entry["auroc"] is None and entry["low"] is None and entry["too_few"] == "too few positives (< 20)"
    lower = subgroup_metrics(table, ["Hernia"], ["sex"], {}, min_group=1, n_boot=5, seed=0)
    assert group(lower, "sex", "M")["per_label"]["Hernia"]["auroc"] is not None
    assert "too few (" in subgroups_markdown(result)


def test_weighted_auroc_with_integer_weights_equals_sklearn_on_repeated_rows():
    rng = np.random.default_rng(7)
    n = 400
    scores = np.round(rng.random(n), 2).astype(np.float32)           # many ties
    y = (rng.random(n) < 0.2 + 0.5 * scores).astype(np.float64)
    weights = rng.integers(0, 4, size=(n, 4)).astype(np.float32)
    weights[:, 0] = 1
    got = weighted_auroc(scores, y, weights)
    for r in range(4):
        rows = np.repeat(np.arange(n), weights[:, r].astype(int))
        assert got[r] == pytest.approx(roc_auc_score(y[rows], scores[rows]), abs=1e-12)
    patient = rng.integers(0, 50, n)                                   # a patient table: row i weighs table[patient[i]]
    table = rng.integers(0, 3, size=(50, 4)).astype(np.float32)
    by_patient = weighted_auroc(scores, y, table, index=patient)
    assert by_patient == pytest.approx(weighted_auroc(scores, y, table[patient]), abs=1e-12)
    rows = np.repeat(np.arange(n), table[patient, 2].astype(int))
    assert by_patient[2] == pytest.approx(roc_auc_score(y[rows], scores[rows]), abs=1e-12)
    groups = rng.integers(0, 3, n)
    within, rest, positives, negatives, whole = group_aurocs(scores, y, weights, groups, 3)
    assert whole == pytest.approx(got, abs=1e-12)
    for g in range(3):
        for r in range(4):
            mine = np.repeat(np.flatnonzero(groups == g), weights[groups == g, r].astype(int))
            others = np.repeat(np.flatnonzero(groups != g), weights[groups != g, r].astype(int))
            assert within[r, g] == pytest.approx(roc_auc_score(y[mine], scores[mine]), abs=1e-12)
            assert rest[r, g] == pytest.approx(roc_auc_score(y[others], scores[others]), abs=1e-12)
        assert positives[g] == int((y[groups == g] == 1).sum())


def test_resamples_are_patient_counts_from_the_seed_and_sums_follow_them():
    patient = np.array([0, 0, 1, 2, 2, 2])
    a = draw_resamples(patient, 3, 50, seed=5)
    b = draw_resamples(patient, 3, 50, seed=5)
    assert np.array_equal(a.weights, b.weights) and not np.array_equal(a.weights, draw_resamples(patient, 3, 50, 6).weights)
    assert (a.weights[:, 0] == 1).all() and (a.weights[:, 1:].sum(axis=0) == 3).all()
    values = np.arange(6, dtype=np.float64)[:, None]
    sums = resampled_sums(a, np.arange(6), values)
    per_patient = np.array([0 + 1, 2, 3 + 4 + 5], dtype=np.float64)
    assert sums[:, 0] == pytest.approx(a.weights.T.astype(np.float64) @ per_patient)
    frame = pd.DataFrame({"set": ["a", "b", "a"], "patient_id": ["1", "1", "1"]})
    codes, n = patient_codes(frame)
    assert n == 2 and codes[0] == codes[2] != codes[1]                # (set, patient_id) is the patient


def direct_underdiagnosis(rows: pd.DataFrame, thresholds: dict, labels: list[str]) -> tuple[int, int]:
    if "No Finding" in labels:
        finding = rows["No Finding"] == 0
        called = rows["prob_No Finding"] >= thresholds["No Finding"]
    else:
        finding = (rows[labels] == 1).any(axis=1)
        called = np.all([rows["prob_" + k] < (thresholds.get(k) or 0.5) for k in labels], axis=0)
    return int((finding & called).sum()), int(finding.sum())


@pytest.mark.parametrize("labels", [LABELS, ["Effusion", "Edema"]])
def test_underdiagnosis_equals_a_direct_count(table, labels):
    thresholds = {"Effusion": 0.45, "Edema": None, "No Finding": 0.55}
    result = subgroup_metrics(table, labels, ["sex"], thresholds, n_boot=40, seed=1, calibration=False)
    assert result["underdiagnosis_definition"]["kind"] == ("no_finding" if "No Finding" in labels else "all_negative")
    for value in ("F", "M"):
        entry = group(result, "sex", value)["underdiagnosis"]
        hit, base = direct_underdiagnosis(table[table["sex"] == value], thresholds, labels)
        assert (entry["numerator"], entry["denominator"]) == (hit, base)
        assert entry["value"] == pytest.approx(hit / base)
        assert entry["low"] <= entry["value"] <= entry["high"]
    other_hit, other_base = direct_underdiagnosis(table[table["sex"] == "M"], thresholds, labels)
    difference = group(result, "sex", "F")["vs_rest"]["underdiagnosis"]["difference"]
    assert difference == pytest.approx(group(result, "sex", "F")["underdiagnosis"]["value"] - other_hit / other_base)
    assert result["thresholds"]["Edema"] == {"value": 0.5, "source": "default 0.5"}


def test_planted_gap_one_sexs_noisier_labels_give_a_lower_auroc_with_a_separate_interval():
    noisy = predictions(n_patients=2500, seed=11, noisy_sex="F", flip=0.12, labels=["Effusion", "Edema"])
    result = subgroup_metrics(noisy, ["Effusion", "Edema"], ["sex"], {}, n_boot=200, seed=0)
    female, male = group(result, "sex", "F")["macro_auroc"], group(result, "sex", "M")["macro_auroc"]
    assert female["value"] < male["value"] - 0.05
    assert female["high"] < male["low"]
    for label in ("Effusion", "Edema"):
        f, m = group(result, "sex", "F")["per_label"][label], group(result, "sex", "M")["per_label"][label]
        assert f["high"] < m["low"], label
    diff = group(result, "sex", "F")["vs_rest"]["macro_auroc"]
    assert diff["difference"] < 0 and diff["high"] < 0
    clean = subgroup_metrics(predictions(n_patients=2500, seed=11, labels=["Effusion", "Edema"]),
                             ["Effusion", "Edema"], ["sex"], {}, n_boot=200, seed=0)
    clean_diff = group(clean, "sex", "F")["vs_rest"]["macro_auroc"]
    assert clean_diff["low"] < 0 < clean_diff["high"]


def test_missing_values_form_no_group_and_are_counted(table):
    frame = table.copy()
    frame.loc[frame.index[:50], "sex"] = None
    frame.loc[frame.index[50:80], "age"] = np.nan
    result = subgroup_metrics(frame, ["Effusion"], ["sex", "age"], {}, n_boot=10, seed=0, calibration=False)
    sex, age = result["columns"]
    assert sex["missing_images"] == 50 and [g["value"] for g in sex["groups"]] == ["F", "M"]
    assert sum(g["images"] for g in sex["groups"]) == len(frame) - 50
    assert age["missing_images"] == 30 and sum(g["images"] for g in age["groups"]) == len(frame) - 30


def test_age_bands_are_closed_on_the_left():
    frame = pd.DataFrame({"age": [0.0, 19.99, 20.0, 59.5, 80.0, 101.0, np.nan, -1.0]})
    codes, names = group_codes(frame, "age", (0, 20, 40, 60, 80))
    assert names == ["[0,20)", "[20,40)", "[40,60)", "[60,80)", "80+"]
    assert codes.tolist() == [0, 0, 1, 2, 4, 4, -1, -1]
    codes, names = group_codes(frame, "age", (18, 65))
    assert names == ["[18,65)", "65+"] and codes.tolist() == [-1, 0, 0, 0, 1, 1, -1, -1]
    with pytest.raises(EvalError, match="--age-bands 40,20: give increasing ages"):
        group_codes(frame, "age", (40, 20))


def test_other_columns_and_unknown_columns(table):
    frame = table.assign(race=np.where(table.index % 3 == 0, "Black", "White"))
    result = subgroup_metrics(frame, ["Effusion"], ["race", "set"], {}, n_boot=5, seed=0, calibration=False)
    assert [g["value"] for g in result["columns"][0]["groups"]] == ["Black", "White"]
    assert [g["value"] for g in result["columns"][1]["groups"]] == ["nih-phantom"]
    with pytest.raises(EvalError, match=r"--by insurance: the predictions have no column 'insurance' \(columns: key, "):
        subgroup_metrics(frame, ["Effusion"], ["insurance"], {}, n_boot=5)
    with pytest.raises(EvalError, match=f"--by key: {len(frame)} distinct values; group on a column with at most 50"):
        subgroup_metrics(frame, ["Effusion"], ["key"], {}, n_boot=5)


def test_result_is_json_deterministic_and_renders(table, result, tmp_path):
    text = json.dumps(result, allow_nan=False)
    again = subgroup_metrics(table, LABELS, ["sex", "age", "view"],
                             {"Effusion": 0.45, "Edema": None, "Hernia": 0.5, "No Finding": 0.55}, n_boot=60, seed=3)
    assert json.dumps(again, allow_nan=False) == text
    calibration = group(result, "sex", "F")["calibration"]
    assert calibration["per_label"]["Effusion"]["n"] == int(table.loc[table["sex"] == "F", "Effusion"].notna().sum())
    markdown = subgroups_markdown(result)
    assert "### By sex" in markdown and "### By age" in markdown and "| [20,40) |" in markdown
    assert "Underdiagnosis: among images with a finding (No Finding = 0)" in markdown
    path = plot_subgroups(result, tmp_path / "subgroups.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
