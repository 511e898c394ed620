"""Evaluation of a trained run on one split of its shard set, and the metrics behind it.

Two layers:
- `compute_metrics(...)` works on arrays (true labels with NaN = not labelled, predicted
  probabilities, patient ids) and is what the tests compare with scikit-learn;
- `evaluate_run(run_dir, ...)` loads a checkpoint, predicts the `valid` split (for the Youden
  thresholds) and the evaluated split, writes `RUN/eval/` and returns the report dict.

A label with no positive or no negative among the usable rows of a split has no AUROC/AUPRC: it is
reported as undefined (None in JSON), listed in `undefined_labels`, and left out of the macro
averages instead of turning them into NaN.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

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
    ids = np.asarray(patient_ids if patient_ids is not None else np.arange(n)).astype(str)
    uniq, inverse = np.unique(ids, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(uniq)))
    counts = np.bincount(inverse, minlength=len(uniq))
    rng = np.random.default_rng(seed)
    values, missing = [], 0
    for _ in range(n_boot):
        drawn = rng.integers(0, len(uniq), size=len(uniq))
        rows = np.concatenate([order[starts[d]:starts[d] + counts[d]] for d in drawn])
        aucs = []
        for j in labels_idx:
            y, p = y_true[rows, j], y_prob[rows, j]
            keep = ~np.isnan(y)
            aucs.append(fast_auroc(y[keep], p[keep]))
        aucs = np.asarray(aucs)
        if np.isnan(aucs).any():
            missing += 1
        if np.isnan(aucs).all():
            continue
        values.append(float(np.nanmean(aucs)))
    out["n_used"] = len(values)
    out["resamples_missing_a_label"] = missing
    if values:
        alpha = (1.0 - level) / 2
        out["low"] = float(np.quantile(values, alpha))
        out["high"] = float(np.quantile(values, 1 - alpha))
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
    return compute_metrics(y, p, labels, patient_ids=df["patient_id"].astype(str).tolist(),
                           thresholds=thresholds, threshold_source=source, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------- evaluating a run

def _patient_ids(shard_dir: Path, keys: Sequence[str]) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(shard_dir / "manifest.parquet", columns=["key", "patient_id"]).to_pandas()
    lookup = dict(zip(table["key"].astype(str), table["patient_id"].astype(str)))
    return [lookup.get(k, k) for k in keys]


def _view_keys(shard_dir: Path, split: str, views: tuple[str, ...]) -> list[str] | None:
    """The keys of `split` whose view is one the run trained on (`cxr train --views`); None = all."""
    if not views:
        return None
    import pyarrow.parquet as pq

    table = pq.read_table(shard_dir / "manifest.parquet", columns=["key", "split", "view"]).to_pandas()
    keys = table.loc[(table["split"] == split) & table["view"].isin(views), "key"].astype(str).tolist()
    if not keys:
        raise EvalError(f"shard set {shard_dir} has no {split!r} images with the run's views {','.join(views)}")
    return keys


def _predict_split(loaded, shard_dir: Path, split: str, label_index: list[int], *, fmt: str,
                   batch_size: int, workers: int, views: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import torch

    import cxrshards
    from trainer.loop import predict

    stream = cxrshards.open_shards(shard_dir, split, format=fmt, shuffle=False, batch_size=batch_size,
                                   rank=0, world_size=1, keys=_view_keys(shard_dir, split, views))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    inf = loaded.inference
    probs, labels, keys = predict(inf.model, loader, loaded.device, mean=inf.mean, std=inf.std, head=inf.head,
                                  label_index=label_index, gather=False)
    return probs.reshape(len(keys), -1), labels.reshape(len(keys), -1), list(keys)


def phantom_info(shard_dir: Path) -> dict | None:
    """The phantom card (`phantom.json`, with `labels_drawn`) of the raw tree a shard set was built from,
    or None when it was built from real data (or the raw tree is gone)."""
    import pyarrow.parquet as pq

    try:
        meta = json.loads((pq.read_schema(shard_dir / "manifest.parquet").metadata or {}).get(b"cxr", b"{}"))
        raw = meta.get("raw")
        if not raw:
            return None
        card = json.loads((Path(raw) / "phantom.json").read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and card.get("phantom") else None


def evaluate_run(
    run_dir: str | Path,
    ckpt: str | Path = "best",
    split: str = "test",
    shards: str | Path | None = None,
    root: str | Path | None = None,
    *,
    out: str | Path | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    device: str | None = "auto",
    batch_size: int = 64,
    workers: int = 0,
    format: str = "auto",
    cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate a run's checkpoint on one split; write RUN/eval/ (or `out`); return the report dict.

    The shard set is the one in the run's config.json unless `shards` (with `root`) names another;
    its card must be the one the checkpoint was trained on (same sha256); a URL set keeps its tars in
    `cache` (default: the run's --cache, else $CXR_CACHE) when given. Thresholds come from the
    `valid` split (Youden per label); with no valid split they stay at 0.5.
    """
    import cxrshards
    from manifests import __version__
    from trainer.checkpoint import card_sha256
    from trainer.plots import plot_curves
    from trainer.predict import load_run
    from trainer.report import comparable_macro, references_for, write_report

    log = log or (lambda _msg: None)
    started = time.perf_counter()
    loaded = load_run(run_dir, ckpt, device)
    run_dir = loaded.run_dir
    inf = loaded.inference
    cfg = inf.config
    if shards is None:
        shards_ref, root_ref = cfg.get("shards"), root if root is not None else cfg.get("root")
    else:
        shards_ref, root_ref = shards, root
    if not shards_ref:
        raise EvalError(f"{run_dir}/config.json names no shard set: pass --shards NAME_OR_PATH")
    shard_dir = cxrshards.resolve_shard_dir(shards_ref, root_ref, cache=cache if cache is not None else cfg.get("cache"),
                                            cache_gb=cfg.get("cache_gb"))
    sha = card_sha256(shard_dir)
    if inf.card_sha256 and sha != inf.card_sha256:
        raise EvalError(
            f"shard set {shard_dir} (card sha256 {sha[:12]}...) is not the one {loaded.ckpt_path} was trained on "
            f"(card sha256 {inf.card_sha256[:12]}...): pass --shards with the run's own shard set "
            f"(its card is copied in {run_dir / 'card.json'}) or train on this one")
    card = cxrshards.read_card(shard_dir)
    card_labels = list(card["labels"])
    missing = [n for n in inf.labels if n not in card_labels]
    if missing:
        raise EvalError(f"shard set {shard_dir} has no label {missing[0]!r} that the checkpoint predicts")
    label_index = [card_labels.index(n) for n in inf.labels]
    counts = {s: int((card.get("splits", {}).get(s) or {}).get("count", 0)) for s in ("train", "valid", "test")}
    if counts.get(split, 0) <= 0:
        present = ", ".join(f"{s} ({n})" for s, n in counts.items() if n) or "none"
        raise EvalError(f"shard set {shard_dir} has no {split!r} samples to evaluate (splits: {present}); "
                        f"pick another with --split")
    out_dir = Path(out) if out is not None else run_dir / "eval"
    # A run trained on some views (`cxr train --views AP`) is evaluated on the same views.
    common = dict(fmt=format, batch_size=batch_size, workers=workers, views=tuple(cfg.get("views") or ()))

    thresholds, threshold_source, valid_summary = None, "valid", None
    if counts["valid"] > 0:
        log(f"predicting the valid split ({counts['valid']} images) for the decision thresholds")
        vp, vy, vkeys = _predict_split(loaded, shard_dir, "valid", label_index, **common)
        thresholds = youden_thresholds(vy, vp, inf.labels)
        vdf = predictions_frame(vkeys, _patient_ids(shard_dir, vkeys), vy, vp, inf.labels, "valid")
        write_predictions(vdf, out_dir / "valid_predictions.parquet", inf.labels, {"split": "valid"})
        from trainer.metrics import macro_auroc

        vmacro = macro_auroc(vy, vp) if len(vkeys) else math.nan
        valid_summary = {"n_samples": len(vkeys), "macro_auroc": None if math.isnan(vmacro) else vmacro}
    else:
        threshold_source = "none (no valid split)"
        log("no valid split: thresholds stay at 0.5")

    if split == "valid" and counts["valid"] > 0:
        probs, y, keys = vp, vy, vkeys
    else:
        log(f"predicting the {split} split ({counts[split]} images)")
        probs, y, keys = _predict_split(loaded, shard_dir, split, label_index, **common)
    patients = _patient_ids(shard_dir, keys)
    df = predictions_frame(keys, patients, y, probs, inf.labels, split)
    write_predictions(df, out_dir / "predictions.parquet", inf.labels, {"split": split})
    # Metrics from exactly the saved (float32, key-sorted) values.
    y_saved, p_saved = frame_arrays(df, inf.labels)
    metrics = compute_metrics(y_saved, p_saved, inf.labels, patient_ids=df["patient_id"].tolist(),
                              thresholds=thresholds, threshold_source=threshold_source, n_boot=n_boot, seed=seed)

    phantom = phantom_info(shard_dir)
    phantom_findings = None
    if phantom is not None:   # macro AUROC over the findings the phantom generator draws into the pixels
        drawn = [n for n in phantom.get("labels_drawn", []) if n in metrics["per_label"]]
        value, used = comparable_macro(metrics["per_label"], drawn)
        phantom_findings = {"labels": drawn, "macro_auroc": value, "labels_used": used}
    refs = references_for(card.get("source"))
    for r in refs:
        r["ours_macro_auroc"], r["ours_labels_used"] = comparable_macro(metrics["per_label"], r.get("labels"))
    ckpt_state = inf.checkpoint
    report = {
        "run": str(run_dir),
        "split": split,
        "views": list(common["views"]) or None,
        "model": cfg.get("model"),
        "task": inf.task,
        "head": inf.head,
        "checkpoint": {"path": str(loaded.ckpt_path), "epoch": ckpt_state.get("epoch"),
                       "best_metric": ckpt_state.get("best_metric"), "best_epoch": ckpt_state.get("best_epoch"),
                       "sha256": hashlib.sha256(loaded.ckpt_path.read_bytes()).hexdigest()},
        "shard_set": {"name": card.get("name"), "path": str(shard_dir), "source": card.get("source"),
                      "size": card.get("size"), "fit": card.get("fit"), "codec": card.get("codec"),
                      "card_sha256": sha, "phantom": phantom is not None},
        "normalize": [inf.mean, inf.std],
        "thresholds": {"source": threshold_source, "method": "youden", "per_label": thresholds or {}},
        "valid": valid_summary,
        "references": refs,
        "phantom_findings": phantom_findings,
        "metrics": metrics,
        "tool_version": __version__,
        "seconds": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{run_dir.name}: {split} split of {card.get('name')}"
    plot_curves("roc", y_saved, p_saved, inf.labels, metrics, out_dir / "roc.png", title=title)
    plot_curves("pr", y_saved, p_saved, inf.labels, metrics, out_dir / "pr.png", title=title)
    report["seconds"] = round(time.perf_counter() - started, 3)
    files = ["report.json", "report.md", "predictions.parquet", "roc.png", "pr.png"]
    if valid_summary is not None:
        files.append("valid_predictions.parquet")
    report["files"] = {name: str(out_dir / name) for name in files}
    write_report(report, out_dir)
    return report
