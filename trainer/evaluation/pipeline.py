"""`cxr eval`: one pipeline for every evaluation of a run. score -> predictions table -> metrics -> report files.

An internal evaluation (the run's own shard sets, one or several), and an external one (another hospital's set)
differ only in their inputs, never in their path:
- **which sets**: the run's own (config.json `shards`, checked against the card sha256s the checkpoint recorded:
  `trainer.runs.run_sets`), or `shards` = another set. A set whose card sha256s equal the run's is its own.
- **which label matching**: on its own sets a run reports its labels under its own names; on another set only the
  labels matched through shared names (`trainer.evaluation.matching`), under the shared names.
- **which split gives the thresholds**: always the run's own pooled `valid` split (Youden per label), never the
  evaluated set; with no valid split, 0.5.

The steps: (1) score (`trainer.evaluation.score`): the run's own valid split, the evaluated split, and on another
set also the run's own test split (the internal column; reused from RUN/eval/ when its report comes from this very
checkpoint and sets, else predicted again). (2) metrics (`trainer.metrics.compute_metrics`) of the pooled table, and
of each set when there are several; patients are (set, patient_id). (3) report files into `out` (default RUN/eval/,
or RUN/eval/NAME/ for another set): predictions.parquet, valid_predictions.parquet, internal_predictions.parquet
(another set), report.json, report.md, report.html (one self-contained page), roc.png, pr.png, calibration.png
(every report), subgroups.png (with `by`), gallery.png. Calibration (Brier, 15-bin ECE, patient-bootstrap CIs)
is in every report; subgroups (`by`) on the evaluated split, after an optional demographics join. Every number
equals scikit-learn's on the saved tables. The run's `--views` apply to a set whose split records views; a set recording none is used whole,
and the report says so.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from cxrshards import mix
from manifests import __version__
from manifests.errors import CxrError
from trainer.checkpoint import card_sha256, sets_sha256, trained_card_shas
from trainer.evaluation.calibration import calibration_metrics, plot_calibration
from trainer.evaluation.demographics import join_demographics, read_demographics
from trainer.evaluation.matching import LabelMatch, comparison_rows, match_labels, run_shared_labels
from trainer.evaluation.report import comparable_macro, references_for, write_report
from trainer.evaluation.score import CONTEXT_COLUMNS, manifest_context, score, select_keys
from trainer.evaluation.subgroups import AGE_BANDS, MIN_GROUP, plot_subgroups, subgroup_metrics
from trainer.metrics import (BOOTSTRAP_SEED, N_BOOTSTRAP, PROB_PREFIX, EvalError, compute_metrics, frame_arrays,
                             macro_auroc, patient_keys, read_predictions, write_predictions, youden_thresholds)
from trainer.runs import LoadedRun, label_map_for, load_run, run_sets

EVAL_FORMAT = 2   # report.json `eval_format`: tables with `set`, own-set ids; release 0.1's reports have none
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
Log = Callable[[str], None]


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
    log: Log | None = None,
    gallery: bool = True,
    quiet: bool = False,
    by: Sequence[str] = (),
    age_bands: Sequence[float] = AGE_BANDS,
    min_group: int = MIN_GROUP,
    demographics: str | Path | None = None,
    demographics_key: str | None = None,
) -> dict:
    """Evaluate a run's checkpoint on one split of its own shard sets, or of `shards` (with `root`); write the
    report files (RUN/eval/, RUN/eval/NAME/ for another set, or `out`); return the report dict.

    `label_map`: CSV over the built-in map for matching another set's labels (default: the checkpoint's map).
    A URL set keeps its tars in `cache` (default: the run's --cache, else $CXR_CACHE) when given. `gallery`:
    also gallery.png; `quiet`: no progress while predicting. `demographics`: a table joined by patient
    (`evaluation.demographics`; MIMIC-IV patients.csv as it is, else by `demographics_key`) before `by`:
    grouping columns (sex, age in `age_bands`, view, set, any joined column) for the subgroup report
    (`evaluation.subgroups`, a label needs `min_group` positives and negatives in a group)."""
    log = log or (lambda _msg: None)
    started = time.perf_counter()
    if demographics is not None:
        read_demographics(demographics, demographics_key)   # a bad table is an error before any prediction
    loaded = load_run(run_dir, ckpt, device)
    inf, ckpt_state = loaded.inference, loaded.inference.checkpoint
    remote = {"cache": cache if cache is not None else inf.config.get("cache"), "cache_gb": inf.config.get("cache_gb")}
    train_map, _ = label_map_for(ckpt_state)
    lmap, map_text = label_map_for(ckpt_state, label_map)
    trained = trained_card_shas(ckpt_state)
    given = None if shards is None else mix.resolve_sets([shards], root, lmap, **remote)
    if given is not None and [card_sha256(s.shard_dir) for s in given] == trained:
        own, internal = mix.resolve_sets([shards], root, train_map, **remote), True
    else:
        own, internal = run_sets(loaded, train_map, root, **remote), given is None
    targets = own if internal else given
    names = list(inf.labels)
    run_shared = run_shared_labels(ckpt_state, names, str(loaded.card.get("source")), lmap)
    match = None if internal else _external_match(loaded, targets[0], names, run_shared, lmap, map_text)
    out_dir = Path(out) if out is not None else loaded.run_dir / "eval" / ("" if internal else targets[0].name)
    views = tuple(inf.config.get("views") or ())
    common = dict(fmt=format, batch_size=batch_size, workers=workers, quiet=quiet)

    # (1) score: the run's own valid split (thresholds), the evaluated split, and the internal column
    own_context = manifest_context(own)
    valid_df = _score_split(loaded, own, "valid", run_shared, names, own_context, views, common, log)[0]
    thresholds = youden_thresholds(*frame_arrays(valid_df, names), names) if valid_df is not None else None
    context = own_context if internal else manifest_context(targets)
    df, notes = _score_split(loaded, targets, split, run_shared, names, context, views, common, log)
    if df is None:
        counts = {s.name: _count(s, split) for s in targets}
        raise EvalError(f"{', '.join(counts)} has no {split!r} samples to evaluate"
                        + (f" with the run's views {','.join(views)}" if views and any(counts.values()) else "")
                        + "; pick another split with --split")
    internal_df, internal_source = None, None
    if match is not None:
        internal_df, internal_source = _internal_column(loaded, own, run_shared, names, own_context, views, common,
                                                        log)
        labels = match.shared
        df, valid_df, internal_df = (_restrict(f, match) for f in (df, valid_df, internal_df))
        thresholds = thresholds and {m["shared"]: thresholds[m["run"]] for m in match.matched}
    else:
        labels = names
    if demographics is not None:
        df = join_demographics(df, demographics, demographics_key)
    write_predictions(df, out_dir / "predictions.parquet", labels,
                      {"split": split, "sets": [s.name for s in targets],
                       **({"label_match": match.matched} if match else {})})
    if valid_df is not None:
        write_predictions(valid_df, out_dir / "valid_predictions.parquet", labels,
                          {"split": "valid", "sets": [s.name for s in own], "note": "the run's own valid split"})
    if internal_df is not None:
        write_predictions(internal_df, out_dir / "internal_predictions.parquet", labels,
                          {"split": "test", "sets": [s.name for s in own]})

    # (2) metrics
    source = "valid" if thresholds is not None else "none (no valid split)"

    def metrics_of(frame: pd.DataFrame) -> dict:
        y, p = frame_arrays(frame, labels)
        return compute_metrics(y, p, labels, patient_ids=patient_keys(frame), thresholds=thresholds,
                               threshold_source=source, n_boot=n_boot, seed=seed)

    metrics = metrics_of(df)
    present = [s for s in targets if (df["set"] == s.name).any()]
    per_set = {s.name: {"shard_set": describe([s]), "metrics": metrics_of(df[df["set"] == s.name].reset_index(drop=True))}
               for s in present} if len(present) > 1 else None
    phantom = _phantom_findings(targets, metrics, names if internal else None, run_shared)
    calibration = calibration_metrics(df, labels, n_boot=n_boot, seed=seed)
    subgroups = None
    if by:
        log(f"subgroups by {', '.join(by)}: {n_boot} patient resamples")
        subgroups = subgroup_metrics(df, labels, list(by), thresholds, age_bands=age_bands, min_group=min_group,
                                     n_boot=n_boot, seed=seed)

    # (3) report files
    shard_set = describe(targets)
    report = {
        **report_head(loaded, split, views if len(notes) < len(present) else ()),
        "shard_set": shard_set,
        "normalize": [inf.mean, inf.std],
        "thresholds": {"source": source, "method": "youden", "per_label": thresholds or {},
                       "from": (f"the run's own valid split ({loaded.name})" if thresholds is not None
                                else f"none: the run's own sets ({loaded.name}) have no valid split, 0.5 is used")},
        "valid": None if valid_df is None else {"n_samples": len(valid_df), "macro_auroc": _nan_none(
            macro_auroc(*frame_arrays(valid_df, labels)))},
        "references": _references(shard_set["source"], metrics),
        "phantom_findings": phantom,
        "metrics": metrics,
        "calibration": calibration,
        **({"subgroups": subgroups} if subgroups else {}),
        **({"demographics": df.attrs["demographics"]} if "demographics" in df.attrs else {}),
        **({"per_set": per_set} if per_set else {}),
        **({"external": _external_section(loaded, targets[0], match, lmap, metrics, internal_df, df, internal_source,
                                          metrics_of, notes, views, labels, n_boot, seed)} if match else {}),
        "notes": notes,
        "tool_version": __version__,
        "seconds": None,
    }
    if gallery:
        from trainer.cam import write_gallery

        log("drawing gallery.png: the highest-scored true and false positives with Grad-CAM heatmaps")
        out_dir.mkdir(parents=True, exist_ok=True)
        picked = write_gallery(loaded, targets, split, run_shared, df, labels, thresholds, out_dir / "gallery.png")
        if picked is not None:
            report["gallery"] = str(out_dir / "gallery.png")
    title = (f"{loaded.run_dir.name}: {split} split of {shard_set['name']}" + (" (pooled)" if per_set else "")
             + ("" if internal else " (external)"))
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_calibration(calibration, out_dir / "calibration.png", title=title)
    if subgroups:
        plot_subgroups(subgroups, out_dir / "subgroups.png", title=title)
    y, p = frame_arrays(df, labels)
    return write_outputs(report, out_dir, y, p, labels, title, started)


# --------------------------------------------------------------------------- the steps

def _count(s: mix.MixSet, split: str) -> int:
    return int((s.card.get("splits", {}).get(split) or {}).get("count", 0))


def _score_split(loaded: LoadedRun, sets: Sequence[mix.MixSet], split: str, shared: list[str], names: list[str],
                 context: pd.DataFrame, views: tuple[str, ...], common: dict,
                 log: Log) -> tuple[pd.DataFrame | None, list[str]]:
    """(the predictions table of `split` of those sets that have it, view notes); None when no image is left."""
    having = [s for s in sets if _count(s, split) > 0]
    keys, notes = select_keys(context[context["set"].isin([s.name for s in having])], split, views)
    if not keys:
        return None, notes
    log(f"predicting the {split} split of {'+'.join(s.name for s in having)} ({len(keys)} images)")
    return score(loaded, having, split, shared, names, keys, context, **common), notes


def _external_match(loaded: LoadedRun, target: mix.MixSet, names: list[str], run_shared: list[str], lmap,
                    map_text: str) -> LabelMatch:
    """The label match of a run and another set, after the checks only another set needs (size, name)."""
    run_size = int(loaded.card["size"])
    if int(target.card["size"]) != run_size:
        raise EvalError(f"shard set {target.name} holds {target.card['size']} px images but {loaded.run_dir} was "
                        f"trained on {run_size} px: build the set at the run's size with "
                        f"`{_build_hint(target.card, run_size)}` and evaluate that")
    if not _SAFE_NAME.match(target.name):
        raise EvalError(f"{target.shard_dir}/dataset.json: name {target.name!r} cannot be a folder under "
                        f"{loaded.run_dir}/eval/")
    match = match_labels(names, run_shared, target.source, target.labels, lmap, map_text)
    if not match.matched:
        raise EvalError(f"run {loaded.run_dir} ({', '.join(run_shared)}) and shard set {target.name} "
                        f"({', '.join(target.labels)}) share no label, even through the label map: "
                        f"pass --label-map FILE (source,label,shared) naming what is the same")
    return match


def _build_hint(card: dict, size: int) -> str:
    raw = ((card.get("build") or {}).get("shard options") or {}).get("raw") or "RAW"
    return f"cxr shard build --source {card.get('source', 'SOURCE')} --raw {raw} --size {size}"


def _restrict(frame: pd.DataFrame | None, match: LabelMatch) -> pd.DataFrame | None:
    """A predictions table restricted to the matched labels, under their shared names."""
    if frame is None:
        return None
    run = [m["run"] for m in match.matched]
    out = frame[[c for c in CONTEXT_COLUMNS if c in frame.columns] + run + [PROB_PREFIX + r for r in run]].copy()
    names = {m["run"]: m["shared"] for m in match.matched}
    return out.rename(columns={**names, **{PROB_PREFIX + k: PROB_PREFIX + v for k, v in names.items()}})


def _internal_column(loaded: LoadedRun, own: Sequence[mix.MixSet], shared: list[str], names: list[str],
                     context: pd.DataFrame, views: tuple[str, ...], common: dict,
                     log: Log) -> tuple[pd.DataFrame | None, str]:
    """The run's own test split (all its labels): reused from RUN/eval/ when that report comes from this very
    checkpoint and sets, else predicted here."""
    eval_dir = loaded.run_dir / "eval"
    try:
        report = json.loads((eval_dir / "report.json").read_text())
        reusable = (report.get("eval_format") == EVAL_FORMAT and report.get("split") == "test"
                    and (report.get("checkpoint") or {}).get("sha256") == _sha256(loaded.ckpt_path)
                    and (report.get("shard_set") or {}).get("card_sha256s") == [card_sha256(s.shard_dir) for s in own])
        test, got = read_predictions(eval_dir / "predictions.parquet") if reusable else (None, [])
    except (OSError, ValueError, CxrError):
        test, got = None, []
    if test is not None and got == names:
        log(f"internal numbers: reusing {eval_dir}/predictions.parquet (same checkpoint)")
        return test, f"reused {eval_dir / 'predictions.parquet'} (same checkpoint sha256)"
    frame = _score_split(loaded, own, "test", shared, names, context, views, common, log)[0]
    return frame, f"predicted on the run's own shard sets ({'+'.join(s.name for s in own)})"


def _external_section(loaded: LoadedRun, target: mix.MixSet, match: LabelMatch, lmap, metrics: dict,
                      internal_df: pd.DataFrame | None, df: pd.DataFrame, internal_source: str, metrics_of,
                      notes: list[str], views: tuple[str, ...], labels: list[str], n_boot: int, seed: int) -> dict:
    internal = metrics_of(internal_df) if internal_df is not None else None
    rows, macro = comparison_rows(internal, metrics, internal_df, df, labels, n_boot, seed)
    run_card = loaded.card
    return {
        "run_shard_set": {"name": loaded.name, "source": "+".join(dict.fromkeys(str(c.get("source")) for c in loaded.cards)),
                          "size": run_card.get("size"), "fit": run_card.get("fit"),
                          "card_sha256": loaded.inference.checkpoint.get("card_sha256")},
        "labels": {"matched": match.matched, "run_only": match.run_only, "set_only": match.set_only,
                   "map": match.map, "map_rows": lmap.to_rows()},
        "preprocessing": {"pixels": f"{target.name}'s as stored (fit {target.card.get('fit')}, codec "
                                    f"{target.card.get('codec')})",
                          "run_fit": run_card.get("fit"), "normalize": [loaded.inference.mean, loaded.inference.std],
                          "views": list(views) if views and not notes else None,
                          "views_note": "; ".join(notes) or None},
        "internal": {"split": "test", "source": internal_source, "metrics": internal},
        "comparison": rows,
        "comparison_macro": macro,
    }


def _phantom_findings(targets: Sequence[mix.MixSet], metrics: dict, run_names: list[str] | None,
                      run_shared: list[str]) -> dict | None:
    """Macro AUROC over the findings a phantom generator drew into the pixels (None for real sets). Labels are
    named as in the report: the run's names on its own sets, shared names on another set."""
    infos = [(s, phantom_info(s.shard_dir)) for s in targets]
    if all(info is None for _, info in infos):
        return None
    drawn_shared = [s.shared[s.labels.index(n)] for s, info in infos if info is not None
                    for n in info.get("labels_drawn", []) if n in s.labels]
    named = dict(zip(run_shared, run_names)) if run_names is not None else {n: n for n in run_shared}
    drawn = [named[n] for n in dict.fromkeys(drawn_shared) if n in named and named[n] in metrics["per_label"]]
    drawn = [n for n in metrics["labels"] if n in drawn]
    value, used = comparable_macro(metrics["per_label"], drawn)
    return {"labels": drawn, "macro_auroc": value, "labels_used": used}


def _references(source: str, metrics: dict) -> list[dict]:
    refs = references_for(source)
    for r in refs:
        r["ours_macro_auroc"], r["ours_labels_used"] = comparable_macro(metrics["per_label"], r.get("labels"))
    return refs


def _nan_none(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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


def describe(sets: Sequence[mix.MixSet]) -> dict:
    """The evaluated shard set(s) in a report: one set's card fields; several joined with + (names, sources)."""
    shas = [card_sha256(s.shard_dir) for s in sets]

    def joined(key: str) -> str:
        return "+".join(dict.fromkeys(str(s.card.get(key)) for s in sets))

    return {"name": "+".join(s.name for s in sets), "path": ", ".join(str(s.shard_dir) for s in sets),
            "source": joined("source"), "size": sets[0].card.get("size"), "fit": joined("fit"),
            "codec": joined("codec"), "card_sha256": sets_sha256(shas), "card_sha256s": shas,
            "phantom": any(phantom_info(s.shard_dir) is not None for s in sets), "sets": [s.name for s in sets]}


def report_head(loaded: LoadedRun, split: str, views: Sequence[str]) -> dict:
    """The first entries of a report: which run, checkpoint, split and views."""
    inf = loaded.inference
    state = inf.checkpoint
    return {
        "eval_format": EVAL_FORMAT,
        "run": str(loaded.run_dir),
        "split": split,
        "views": list(views) or None,
        "model": inf.config.get("model"),
        "task": inf.task,
        "head": inf.head,
        "checkpoint": {"path": str(loaded.ckpt_path), "epoch": state.get("epoch"),
                       "best_metric": state.get("best_metric"), "best_epoch": state.get("best_epoch"),
                       "sha256": _sha256(loaded.ckpt_path)},
    }


def write_outputs(report: dict, out_dir: Path, y: np.ndarray, p: np.ndarray, labels: Sequence[str], title: str,
                  started: float) -> dict:
    """roc.png, pr.png, then report.json and report.md (with `files` and `seconds`) into `out_dir`."""
    from trainer.plots import plot_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    plot_curves("roc", y, p, labels, report["metrics"], out_dir / "roc.png", title=title)
    plot_curves("pr", y, p, labels, report["metrics"], out_dir / "pr.png", title=title)
    report["seconds"] = round(time.perf_counter() - started, 3)
    files = ["report.json", "report.md", "report.html", "predictions.parquet", "roc.png", "pr.png",
             "calibration.png"]
    files += [f for f, made in (("subgroups.png", "subgroups" in report),("valid_predictions.parquet", report.get("valid") is not None),
                                ("internal_predictions.parquet", ((report.get("external") or {}).get("internal") or {})
                                 .get("metrics") is not None),
                                ("gallery.png", "gallery" in report)) if made]
    report["files"] = {name: str(out_dir / name) for name in files}
    write_report(report, out_dir)
    return report
