"""Evaluation of a trained run on one split of its shard set: loading, predicting, writing RUN/eval/.

The metric math (AUROC/AUPRC, Youden thresholds, the patient bootstrap, `compute_metrics`, prediction
tables) lives in `trainer.metrics`; every name is re-exported here. `evaluate_run(run_dir, ...)` loads a
checkpoint, predicts the `valid` split (for the Youden thresholds) and the evaluated split, writes
`RUN/eval/` and returns the report dict. A shard set other than the run's own (another card sha256) is
an external evaluation (`trainer.external`), written to `RUN/eval/NAME/`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from trainer.metrics import (  # noqa: F401 - re-exported: tests and other modules import them from here
    BOOTSTRAP_SEED,
    CI_LEVEL,
    N_BOOTSTRAP,
    PROB_PREFIX,
    EvalError,
    bootstrap_label_aurocs,
    bootstrap_macro_auroc,
    compute_metrics,
    fast_auroc,
    frame_arrays,
    is_defined,
    metrics_from_predictions,
    predictions_frame,
    read_predictions,
    write_predictions,
    youden_threshold,
    youden_thresholds,
)


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
                   batch_size: int, workers: int, views: tuple[str, ...] = (),
                   quiet: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predict one split; progress as `cxr train` shows it (a bar, or plain lines off a terminal)."""
    import torch

    import cxrshards
    from trainer.loop import predict
    from trainer.watch import Progress

    stream = cxrshards.open_shards(shard_dir, split, format=fmt, shuffle=False, batch_size=batch_size,
                                   rank=0, world_size=1, keys=_view_keys(shard_dir, split, views))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    inf = loaded.inference
    progress = Progress(epochs=1, quiet=quiet, what=f"predict {split}")
    progress.start_epoch(0, len(loader))
    try:
        probs, labels, keys = predict(inf.model, loader, loaded.device, mean=inf.mean, std=inf.std, head=inf.head,
                                      label_index=label_index, gather=False, on_batch=progress.update)
    finally:
        progress.end_epoch(None)
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
    label_map: str | Path | None = None,
    cache: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    gallery: bool = True,
    quiet: bool = False,
) -> dict:
    """Evaluate a run's checkpoint on one split; write RUN/eval/ (or `out`); return the report dict.

    The shard set is the one in the run's config.json unless `shards` (with `root`) names another.
    The run's own set (the card sha256 the checkpoint was trained on): thresholds come from its `valid`
    split (Youden per label); with no valid split they stay at 0.5. `gallery`: also gallery.png
    (`trainer.cam.write_gallery`); `quiet`: no progress while predicting. Any other set is an external
    evaluation (`trainer.external.evaluate_external`, labels matched through `label_map`), written to
    RUN/eval/NAME/ (or `out`). A URL set keeps its tars in `cache` (default: the run's --cache, else
    $CXR_CACHE) when given.
    """
    import cxrshards
    from manifests import __version__
    from trainer.checkpoint import card_sha256
    from trainer.external import evaluate_external, run_card_sha256
    from trainer.predict import load_run
    from trainer.report import comparable_macro, references_for

    log = log or (lambda _msg: None)
    started = time.perf_counter()
    loaded = load_run(run_dir, ckpt, device)
    run_dir = loaded.run_dir
    inf = loaded.inference
    cfg = inf.config
    from trainer.multiset_eval import evaluate_multiset, evaluate_multiset_external, is_multiset

    if is_multiset(cfg):   # a run over several shard sets (trainer.multiset_eval)
        common = dict(n_boot=n_boot, seed=seed, batch_size=batch_size, workers=workers, format=format, log=log)
        if shards is None:   # each of its sets and the pooled one
            return evaluate_multiset(loaded, split=split, root=root, out=out, **common)
        return evaluate_multiset_external(loaded, cxrshards.resolve_shard_dir(shards, root), split=split,
                                          label_map=label_map, out=out, **common)
    if shards is None:
        shards_ref, root_ref = cfg.get("shards"), root if root is not None else cfg.get("root")
    else:
        shards_ref, root_ref = shards, root
    if not shards_ref:
        raise EvalError(f"{run_dir}/config.json names no shard set: pass --shards NAME_OR_PATH")
    shard_dir = cxrshards.resolve_shard_dir(shards_ref, root_ref, cache=cache if cache is not None else cfg.get("cache"),
                                            cache_gb=cfg.get("cache_gb"))
    sha = card_sha256(shard_dir)
    if sha != run_card_sha256(loaded):   # another shard set: an external evaluation
        return evaluate_external(loaded, shard_dir, split=split, label_map=label_map, out=out, n_boot=n_boot,
                                 seed=seed, batch_size=batch_size, workers=workers, format=format, log=log)
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
    common = dict(fmt=format, batch_size=batch_size, workers=workers, views=tuple(cfg.get("views") or ()),
                  quiet=quiet)

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
    report = {
        **report_head(loaded, split, common["views"]),
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
    if gallery:
        from trainer.cam import write_gallery

        log("drawing gallery.png: the highest-scored true and false positives with Grad-CAM heatmaps")
        out_dir.mkdir(parents=True, exist_ok=True)
        if write_gallery(loaded, shard_dir, split, df["key"].tolist(), y_saved, p_saved, inf.labels,
                         out_dir / "gallery.png") is not None:
            report["gallery"] = str(out_dir / "gallery.png")
    return write_outputs(report, out_dir, y_saved, p_saved, inf.labels,
                         f"{run_dir.name}: {split} split of {card.get('name')}", started)


def report_head(loaded, split: str, views: Sequence[str]) -> dict:
    """The first entries of a report: which run, checkpoint, split and views."""
    inf = loaded.inference
    ckpt_state = inf.checkpoint
    return {
        "run": str(loaded.run_dir),
        "split": split,
        "views": list(views) or None,
        "model": inf.config.get("model"),
        "task": inf.task,
        "head": inf.head,
        "checkpoint": {"path": str(loaded.ckpt_path), "epoch": ckpt_state.get("epoch"),
                       "best_metric": ckpt_state.get("best_metric"), "best_epoch": ckpt_state.get("best_epoch"),
                       "sha256": hashlib.sha256(loaded.ckpt_path.read_bytes()).hexdigest()},
    }


def write_outputs(report: dict, out_dir: Path, y: np.ndarray, p: np.ndarray, labels: Sequence[str], title: str,
                  started: float) -> dict:
    """roc.png, pr.png, then report.json and report.md (with `files` and `seconds`) into `out_dir`."""
    from trainer.plots import plot_curves
    from trainer.report import write_report

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves("roc", y, p, labels, report["metrics"], out_dir / "roc.png", title=title)
    plot_curves("pr", y, p, labels, report["metrics"], out_dir / "pr.png", title=title)
    report["seconds"] = round(time.perf_counter() - started, 3)
    files = ["report.json", "report.md", "predictions.parquet", "roc.png", "pr.png"]
    if report.get("valid") is not None:
        files.append("valid_predictions.parquet")
    report["files"] = {name: str(out_dir / name) for name in files}
    write_report(report, out_dir)
    return report
