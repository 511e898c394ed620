"""Performance per subgroup of a predictions table: AUROC, underdiagnosis, calibration, each against the rest.

Rules (`subgroup_metrics`):
- Grouping columns (`by`): `age` is cut into bands closed on the left (`age_bands` (0, 20, 40, 60, 80):
  [0,20), [20,40), [40,60), [60,80), 80+; an age below the first edge is in no band); any other column
  (sex, view, set, race, ...) groups by its value as text, groups in sorted order. A missing value
  (None, NaN, blank) forms no group: those images are counted (`missing_images`) and left out of that
  column's groups and rests. A column with more than `MAX_GROUPS` values is an error.
- Patients are (set, patient_id). Every interval is a patient-bootstrap percentile interval over the SAME
  resamples (`trainer.evaluation.bootstrap`, `default_rng([seed])`), drawn once over the whole table:
  a group and its rest are measured on the same resamples, so their difference has an interval too.
- Per group and label: positives, negatives, and the AUROC with its interval when the group holds at
  least `min_group` positives and `min_group` negatives; otherwise the counts and "too few" (no number).
  Macro AUROC = the mean over the labels with a number in that group; against the rest, the mean over
  the labels with a number on both sides (listed in the result).
- Underdiagnosis (Seyyed-Kalantari et al. 2021): with a `No Finding` label, among images with a finding
  (No Finding = 0) the share the model calls No Finding (prob_No Finding >= its threshold); without one,
  among images with any positive label, the share whose every probability is below its label's threshold.
  `underdiagnosis_definition` says which. Thresholds come from `thresholds` (chosen on valid); a label
  without one uses 0.5, and `thresholds` in the result says so.
- The rest of a group = the images of the other groups of that column.
- Calibration per group: `trainer.evaluation.calibration.calibration_metrics` on the group's rows.
The result is plain JSON (report.json `subgroups`); `subgroups_markdown` and `plot_subgroups` render it.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from trainer.evaluation.bootstrap import (CI_LEVEL, Resamples, draw_resamples, estimate, group_aurocs, patient_codes,
                                          resampled_sums, weighted_auroc)
from trainer.evaluation.calibration import calibration_metrics
from trainer.metrics import PROB_PREFIX, EvalError

AGE_BANDS: tuple[float, ...] = (0, 20, 40, 60, 80)
MIN_GROUP = 20
MAX_GROUPS = 50
NO_FINDING = "No Finding"
DEFAULT_THRESHOLD = 0.5


def group_codes(predictions: pd.DataFrame, column: str, age_bands: Sequence[float] = AGE_BANDS
                ) -> tuple[np.ndarray, list[str]]:
    """(int64 group per row, -1 where the value is missing; group names in order) for one grouping column."""
    if column not in predictions.columns:
        raise EvalError(f"--by {column}: the predictions have no column {column!r} "
                        f"(columns: {', '.join(c for c in predictions.columns if not c.startswith(PROB_PREFIX))})")
    values = predictions[column]
    if column == "age":
        return _age_bands(values, age_bands)
    text = values.astype(object).where(values.notna(), None)
    text = text.map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v).strip() or None)
    names = sorted(set(text.dropna()))
    if len(names) > MAX_GROUPS:
        raise EvalError(f"--by {column}: {len(names)} distinct values; group on a column with at most {MAX_GROUPS}")
    lookup = {name: i for i, name in enumerate(names)}
    codes = np.array([lookup.get(v, -1) if v is not None else -1 for v in text], dtype=np.int64)
    return codes, names


def _age_bands(values: pd.Series, edges: Sequence[float]) -> tuple[np.ndarray, list[str]]:
    edges = [float(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise EvalError(f"--age-bands {','.join(f'{e:g}' for e in edges)}: give increasing ages, e.g. 0,20,40,60,80")
    age = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    codes = np.searchsorted(np.asarray(edges), age, side="right") - 1      # [e_i, e_i+1) -> i
    codes = np.where(np.isnan(age), -1, codes).astype(np.int64)
    names = [f"[{a:g},{b:g})" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]:g}+"]
    return codes, names


def subgroup_metrics(predictions: pd.DataFrame, labels: Sequence[str], by: Sequence[str],
                     thresholds: dict[str, float | None] | None = None, *, age_bands: Sequence[float] = AGE_BANDS,
                     min_group: int = MIN_GROUP, n_boot: int = 1000, seed: int = 0, level: float = CI_LEVEL,
                     calibration: bool = True) -> dict:
    """Per grouping column of `by` and per group: images, patients, per-label and macro AUROC, underdiagnosis,
    each with its interval and its difference from the rest, and calibration (see the module's rules)."""
    labels = list(labels)
    missing = [c for c in [*labels, *(PROB_PREFIX + name for name in labels)] if c not in predictions.columns]
    if missing:
        raise EvalError(f"predictions lack column(s) {', '.join(repr(c) for c in missing)}")
    thresholds = dict(thresholds or {})
    codes_by = {column: group_codes(predictions, column, age_bands) for column in dict.fromkeys(by)}
    patient, n_patients = patient_codes(predictions)
    resamples = draw_resamples(patient, n_patients, n_boot, seed, level=level)

    aurocs = {column: _label_aurocs(predictions, labels, codes, len(names), resamples)
              for column, (codes, names) in codes_by.items()}
    overall = _overall(predictions, labels, resamples, min_group, codes_by, aurocs)
    definition, called, finding = _underdiagnosis_inputs(predictions, labels, thresholds)
    columns = []
    for column, (codes, names) in codes_by.items():
        groups = []
        known = codes >= 0
        under = _group_rates(resamples, codes, len(names), finding & called, finding)
        for g, name in enumerate(names):
            rows = codes == g
            entry = _group_entry(name, g, rows, patient, labels, aurocs[column], under, min_group, level,
                                 predictions if calibration else None, resamples)
            entry["vs_rest"]["images"] = int(known.sum() - rows.sum())
            groups.append(entry)
        columns.append({"column": column, "missing_images": int((~known).sum()), "groups": groups,
                        "bands": [float(e) for e in age_bands] if column == "age" else None})
    return {
        "by": list(codes_by), "labels": labels, "min_group": int(min_group), "bootstrap": resamples.describe(),
        "thresholds": {name: {"value": thresholds.get(name) if thresholds.get(name) is not None else DEFAULT_THRESHOLD,
                              "source": "valid" if thresholds.get(name) is not None else "default 0.5"}
                       for name in labels},
        "underdiagnosis_definition": definition,
        "overall": overall,
        "columns": columns,
    }


def _label_aurocs(predictions: pd.DataFrame, labels: list[str], codes: np.ndarray, n_groups: int,
                  resamples: Resamples) -> dict[str, tuple[np.ndarray, ...]]:
    """label -> (within [R, G], rest [R, G], positives [G], negatives [G], all rows with a group [R])."""
    out = {}
    for name in labels:
        y = predictions[name].to_numpy(dtype=np.float64)
        p = predictions[PROB_PREFIX + name].to_numpy()
        rows = np.flatnonzero(~np.isnan(y) & (codes >= 0))
        out[name] = group_aurocs(p[rows], y[rows], resamples.weights, codes[rows], n_groups,
                                 index=resamples.patient[rows])
    return out


def _overall(predictions: pd.DataFrame, labels: list[str], resamples: Resamples, min_group: int,
             codes_by: dict, aurocs: dict) -> dict:
    """Macro AUROC of every image (the labels with min_group positives and negatives), for the forest plot;
    taken from a grouping column where every labelled image has a group, else computed."""
    values, used = [], []
    for name in labels:
        y = predictions[name].to_numpy(dtype=np.float64)
        p = predictions[PROB_PREFIX + name].to_numpy()
        rows = np.flatnonzero(~np.isnan(y))
        if (y[rows] == 1).sum() < min_group or (y[rows] == 0).sum() < min_group:
            continue
        whole = next((aurocs[column][name][4] for column, (codes, _) in codes_by.items() if (codes[rows] >= 0).all()),
                     None)
        values.append(whole if whole is not None else weighted_auroc(p[rows], y[rows], resamples.weights,
                                                                     index=resamples.patient[rows]))
        used.append(name)
    if not values:
        return {"images": int(len(predictions)), "macro_auroc": None, "labels": []}
    macro = estimate(_nanmean(np.stack(values, axis=1)), resamples.level)
    return {"images": int(len(predictions)), "macro_auroc": macro, "labels": used}


def _underdiagnosis_inputs(predictions: pd.DataFrame, labels: list[str], thresholds: dict
                           ) -> tuple[dict, np.ndarray, np.ndarray]:
    """(definition, called healthy per image, has a finding per image)."""
    def threshold(name: str) -> float:
        value = thresholds.get(name)
        return DEFAULT_THRESHOLD if value is None else float(value)

    if NO_FINDING in labels:
        nf = predictions[NO_FINDING].to_numpy(dtype=np.float64)
        called = predictions[PROB_PREFIX + NO_FINDING].to_numpy(dtype=np.float64) >= threshold(NO_FINDING)
        definition = {"kind": "no_finding",
                      "text": "among images with a finding (No Finding = 0), the share called No Finding "
                              "(prob_No Finding >= its threshold)"}
        return definition, called, nf == 0
    y = predictions[labels].to_numpy(dtype=np.float64)
    p = predictions[[PROB_PREFIX + name for name in labels]].to_numpy(dtype=np.float64)
    cut = np.array([threshold(name) for name in labels])
    definition = {"kind": "all_negative",
                  "text": "no No Finding label: among images with any positive label, the share whose every "
                          "probability is below its label's threshold"}
    return definition, (p < cut).all(axis=1), (y == 1).any(axis=1)


def _group_rates(resamples: Resamples, codes: np.ndarray, n_groups: int, hit: np.ndarray, base: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(numerator [R, G], denominator [R, G]) of a rate per group, in the sample and every resample."""
    values = np.zeros((len(codes), 2 * n_groups))
    rows = np.flatnonzero(codes >= 0)
    values[rows, codes[rows]] = hit[rows]
    values[rows, n_groups + codes[rows]] = base[rows]
    sums = resampled_sums(resamples, rows, values[rows])
    return sums[:, :n_groups], sums[:, n_groups:]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(stack: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # a resample where every label is NaN
        return np.nanmean(stack, axis=1)


def _difference(a: np.ndarray, b: np.ndarray, level: float) -> dict:
    out = estimate(a - b, level)
    return {"difference": out["value"], "low": out["low"], "high": out["high"], "n_used": out["n_used"]}


def _group_entry(name: str, g: int, rows: np.ndarray, patient: np.ndarray, labels: list[str], aurocs: dict,
                 under: tuple[np.ndarray, np.ndarray], min_group: int, level: float,
                 predictions: pd.DataFrame | None, resamples: Resamples) -> dict:
    per_label, vs_rest, own, both = {}, {}, [], []
    for label in labels:
        within, rest, positives, negatives, _ = aurocs[label]
        pos, neg = int(positives[g]), int(negatives[g])
        rest_pos, rest_neg = int(positives.sum() - pos), int(negatives.sum() - neg)
        entry = {"positives": pos, "negatives": neg, "auroc": None, "low": None, "high": None}
        if pos < min_group or neg < min_group:
            entry["too_few"] = f"too few {'positives' if pos < min_group else 'negatives'} (< {min_group})"
        else:
            result = estimate(within[:, g], level)
            entry.update(auroc=result["value"], low=result["low"], high=result["high"], too_few=None)
            own.append(label)
            if rest_pos >= min_group and rest_neg >= min_group:
                vs_rest[label] = _difference(within[:, g], rest[:, g], level)
                both.append(label)
        per_label[label] = entry
    macro = {"value": None, "low": None, "high": None, "n_used": 0}
    if own:
        macro = estimate(_nanmean(np.stack([aurocs[k][0][:, g] for k in own], axis=1)), level)
    macro_diff = None
    if both:
        mine = _nanmean(np.stack([aurocs[k][0][:, g] for k in both], axis=1))
        theirs = _nanmean(np.stack([aurocs[k][1][:, g] for k in both], axis=1))
        macro_diff = {**_difference(mine, theirs, level), "labels": both}
    num, den = under
    rate = _ratio(num[:, g], den[:, g])
    rest_rate = _ratio(num.sum(axis=1) - num[:, g], den.sum(axis=1) - den[:, g])
    underdiagnosis = {**estimate(rate, level), "numerator": int(round(num[0, g])), "denominator": int(round(den[0, g]))}
    entry = {
        "value": name, "images": int(rows.sum()), "patients": int(np.unique(patient[rows]).size),
        "per_label": per_label, "macro_auroc": {**macro, "labels": own}, "underdiagnosis": underdiagnosis,
        "vs_rest": {"images": None, "macro_auroc": macro_diff, "per_label": vs_rest,
                    "underdiagnosis": _difference(rate, rest_rate, level) if np.isfinite(rest_rate[0]) else None},
    }
    if predictions is not None:
        entry["calibration"] = calibration_metrics(predictions, labels, resamples=resamples, rows=rows)
    return entry


# --- rendering ---------------------------------------------------------------------------------------


def _ci(value: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def _signed(diff: dict | None) -> str:
    if not diff or diff.get("difference") is None:
        return "-"
    low, high = diff["low"], diff["high"]
    text = f"{diff['difference']:+.3f}"
    if low is not None and high is not None:
        text += f" ({low:+.3f} to {high:+.3f})"
        if low > 0 or high < 0:
            text += " *"
    return text


def subgroups_markdown(result: dict) -> str:
    """report.md's subgroup section: per grouping column a summary table, then per-label AUROC per group."""
    boot = result["bootstrap"]
    lines = ["## Subgroups", "",
             f"Patient-bootstrap {boot['level']:.0%} intervals ({boot['n_boot']} resamples, seed {boot['seed']}); "
             f"a label needs {result['min_group']} positives and negatives in a group for a number. "
             f"Differences are group minus the rest of its column (* : the interval excludes 0).",
             f"Underdiagnosis: {result['underdiagnosis_definition']['text']}.", ""]
    defaulted = [k for k, v in result["thresholds"].items() if v["source"] != "valid"]
    if defaulted:
        lines += [f"Threshold 0.5 (none chosen on valid) for: {', '.join(defaulted)}.", ""]
    for column in result["columns"]:
        lines += [f"### By {column['column']}", ""]
        if column["missing_images"]:
            lines += [f"{column['missing_images']:,} images have no {column['column']} and are in no group.", ""]
        if not column["groups"]:
            lines += ["No image has a value here.", ""]
            continue
        lines += ["| group | images | patients | macro AUROC (95% CI) | vs rest | underdiagnosis (95% CI) | vs rest "
                  "| ECE | Brier |", "|---|---:|---:|---|---|---|---|---:|---:|"]
        for group in column["groups"]:
            macro, under = group["macro_auroc"], group["underdiagnosis"]
            cal = (group.get("calibration") or {}).get("macro", {})
            ece, brier = (cal.get("ece") or {}).get("value"), (cal.get("brier") or {}).get("value")
            under_text = _ci(under["value"], under["low"], under["high"])
            if under["value"] is not None:
                under_text += f" [{under['numerator']}/{under['denominator']}]"
            lines.append(f"| {group['value']} | {group['images']:,} | {group['patients']:,} | "
                         f"{_ci(macro['value'], macro['low'], macro['high'])} | {_signed(group['vs_rest']['macro_auroc'])} | "
                         f"{under_text} | {_signed(group['vs_rest']['underdiagnosis'])} | "
                         f"{'-' if ece is None else f'{ece:.3f}'} | {'-' if brier is None else f'{brier:.3f}'} |")
        lines += ["", "| label | " + " | ".join(g["value"] for g in column["groups"]) + " |",
                  "|---|" + "---|" * len(column["groups"])]
        for label in result["labels"]:
            cells = []
            for group in column["groups"]:
                entry = group["per_label"][label]
                if entry["auroc"] is None:
                    cells.append(f"too few ({entry['positives']} pos, {entry['negatives']} neg)")
                else:
                    cells.append(_ci(entry["auroc"], entry["low"], entry["high"]))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_subgroups(result: dict, path: str | Path, title: str = "") -> Path:
    """subgroups.png: a forest plot, one panel per grouping column, macro AUROC with its interval per group
    (the dashed line: every image's macro AUROC)."""
    from trainer.plots import pyplot, save_figure

    plt = pyplot()
    columns = result["columns"] or [{"column": "(none)", "groups": []}]
    heights = [max(1, len(c["groups"])) for c in columns]
    fig, axes = plt.subplots(len(columns), 1, figsize=(6.5, 0.9 + 0.42 * sum(heights) + 0.5 * len(columns)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    overall = (result.get("overall") or {}).get("macro_auroc") or {}
    for ax, column in zip(axes[:, 0], columns):
        groups = column["groups"]
        names, ys = [], []
        for i, group in enumerate(groups):
            y = len(groups) - 1 - i
            macro = group["macro_auroc"]
            label = f"{group['value']}  (n={group['images']:,})"
            if macro["value"] is None:
                ax.text(0.5, y, "too few", va="center", ha="center", fontsize=7, color="0.4",
                        transform=ax.get_yaxis_transform())
            else:
                low = macro["low"] if macro["low"] is not None else macro["value"]
                high = macro["high"] if macro["high"] is not None else macro["value"]
                ax.errorbar(macro["value"], y, xerr=[[macro["value"] - low], [high - macro["value"]]], fmt="o",
                            ms=4, color="C0", ecolor="C0", capsize=3, lw=1.2)
                ax.text(1.01, y, _ci(macro["value"], macro["low"], macro["high"]), va="center", fontsize=7,
                        transform=ax.get_yaxis_transform())
            names.append(label)
            ys.append(y)
        if overall.get("value") is not None:
            ax.axvline(overall["value"], ls="--", lw=0.8, color="grey")
        ax.set_yticks(ys)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_ylim(-0.7, max(len(groups), 1) - 0.3)
        ax.set_title(f"by {column['column']}" + (f"  ({column.get('missing_images', 0):,} images without a value)"
                                                  if column.get("missing_images") else ""), fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", lw=0.3, color="0.85")
    axes[-1, 0].set_xlabel("macro AUROC (patient-bootstrap 95% CI)", fontsize=8)
    lows = [g["macro_auroc"]["low"] for c in columns for g in c["groups"] if g["macro_auroc"]["low"] is not None]
    highs = [g["macro_auroc"]["high"] for c in columns for g in c["groups"] if g["macro_auroc"]["high"] is not None]
    ends = [*lows, *highs] + ([overall["value"]] if overall.get("value") is not None else [])
    left, right = (min(ends) - 0.02, max(ends) + 0.02) if ends else (0.5, 1.0)
    for ax in axes[:, 0]:
        ax.set_xlim(max(0.0, left), min(1.0, right))
    fig.suptitle(title or "Macro AUROC per subgroup (dashed: all images)", fontsize=10)
    return save_figure(fig, path)
