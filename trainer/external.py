"""External evaluation: a run scored on a shard set it was not trained on (another hospital's images).

The rules (the one place where a run and another shard set meet):
- Same image size, or a one-line error naming the `cxr shard build ... --size N` to run.
- Labels meet through shared names (`manifests.labelmap`). The run's shared names are the checkpoint's
  `shared_labels` when it carries them, else `map.shared(run card source, label)`; the set's are
  `map.shared(set card source, label)`. The map is `--label-map FILE` (built-in + its rows) when given,
  else the checkpoint's `label_map` when it carries one, else the built-in table.
- Only matched labels are scored; the report lists them (shared, run name, set name), the run's labels
  the set lacks and the set's labels the run lacks. No matched label: one-line error.
- Thresholds: Youden per label on the run's own `valid` split, never on the external set.
- Pixels: the set's, as stored (its fit and codec); normalisation: the run's mean/std (checkpoint).
  The run's `--views` apply when the set records views; a set without views (folders) is used whole,
  and the report says so.
- Internal numbers (the run's own test split) are reused from `RUN/eval/` when its report names the same
  checkpoint (sha256), the test split and the run's own card; otherwise they are predicted afresh.
  `RUN/eval/` itself is never written.
- Output `RUN/eval/NAME/` (NAME = the set's card name): predictions.parquet (the set's split, matched
  labels under their shared names), valid_predictions.parquet (the run's valid split: the thresholds),
  internal_predictions.parquet (the run's test split), report.json, report.md, roc.png, pr.png. Every
  number equals scikit-learn's on those files.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from manifests.errors import CxrError
from manifests.labelmap import LabelMap, load_label_map
from trainer.metrics import (
    BOOTSTRAP_SEED,
    N_BOOTSTRAP,
    EvalError,
    bootstrap_label_aurocs,
    compute_metrics,
    frame_arrays,
    predictions_frame,
    read_predictions,
    write_predictions,
    youden_thresholds,
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class LabelMatch:
    """How a run's labels meet a shard set's, through shared names."""
    matched: list[dict] = field(default_factory=list)   # {"shared", "run", "set"} in the run's label order
    run_only: list[str] = field(default_factory=list)   # run labels (run's names) the set lacks
    set_only: list[str] = field(default_factory=list)   # set labels (set's names) the run lacks
    map: str = "built-in"                               # which label map was used

    @property
    def shared(self) -> list[str]:
        return [m["shared"] for m in self.matched]


def label_map_for(checkpoint: dict, override: str | Path | None = None) -> tuple[LabelMap, str]:
    """(map, description): `--label-map FILE` over the built-in table, else the checkpoint's, else built-in."""
    if override is not None:
        return load_label_map(override), f"built-in with {override} on top (--label-map)"
    rows = checkpoint.get("label_map")
    if rows:
        return LabelMap(renames={(r["source"], r["label"]): r["shared"] for r in rows}), "the checkpoint's (used at training)"
    return load_label_map(), "built-in (manifests/label_map.csv)"


def match_labels(run_labels: list[str], run_shared: list[str], set_source: str, set_labels: list[str],
                 label_map: LabelMap, map_text: str = "built-in") -> LabelMatch:
    """Pair the run's labels with the set's by shared name (run order)."""
    set_shared = label_map.shared_labels(set_source, list(set_labels))
    by_shared = dict(zip(set_shared, set_labels))
    matched = [{"shared": s, "run": r, "set": by_shared[s]} for r, s in zip(run_labels, run_shared) if s in by_shared]
    taken = {m["set"] for m in matched}
    return LabelMatch(matched=matched, run_only=[r for r, s in zip(run_labels, run_shared) if s not in by_shared],
                      set_only=[lab for lab in set_labels if lab not in taken], map=map_text)


def run_shared_labels(checkpoint: dict, labels: list[str], run_source: str, label_map: LabelMap) -> list[str]:
    """The run's labels in shared names: the checkpoint's record, else mapped from its card's source."""
    recorded = checkpoint.get("shared_labels")
    if recorded:
        if len(recorded) != len(labels):
            raise EvalError(f"{checkpoint.get('path', 'checkpoint')}: shared_labels has {len(recorded)} names for "
                            f"{len(labels)} labels")
        return list(recorded)
    return label_map.shared_labels(run_source, list(labels))


def run_card_sha256(loaded) -> str:
    """sha256 of the card the run was trained on: the checkpoint's record, else RUN/card.json's bytes."""
    if loaded.inference.card_sha256:
        return loaded.inference.card_sha256
    return hashlib.sha256((loaded.run_dir / "card.json").read_bytes()).hexdigest()


def _build_hint(card: dict, size: int) -> str:
    raw = ((card.get("build") or {}).get("shard options") or {}).get("raw") or "RAW"
    return f"cxr shard build --source {card.get('source', 'SOURCE')} --raw {raw} --size {size}"


def _set_views(shard_dir: Path, split: str, views: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The run's views to apply on this set's split, and a note when they cannot apply (no view recorded)."""
    if not views:
        return (), None
    import pyarrow.parquet as pq

    table = pq.read_table(shard_dir / "manifest.parquet", columns=["split", "view"]).to_pandas()
    if table.loc[table["split"] == split, "view"].isna().all():
        return (), (f"the run was trained on views {','.join(views)}; this set records no views, "
                    f"so all its {split} images are used")
    return views, None


def _reusable_internal(loaded, run_sha: str, run_labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame | None] | None:
    """The run's own RUN/eval predictions (test, valid) when they come from this very checkpoint and card."""
    eval_dir = loaded.run_dir / "eval"
    try:
        report = json.loads((eval_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    ckpt_sha = hashlib.sha256(loaded.ckpt_path.read_bytes()).hexdigest()
    if (report.get("split") != "test" or (report.get("checkpoint") or {}).get("sha256") != ckpt_sha
            or (report.get("shard_set") or {}).get("card_sha256") != run_sha):
        return None
    try:
        test, labels = read_predictions(eval_dir / "predictions.parquet")
        valid = None
        if report.get("valid") is not None:
            valid, vlabels = read_predictions(eval_dir / "valid_predictions.parquet")
            if not set(run_labels) <= set(vlabels):
                return None
    except (EvalError, OSError, ValueError):
        return None
    if not set(run_labels) <= set(labels):
        return None
    return test, valid


def _rename(df: pd.DataFrame, matched: list[dict], side: str) -> pd.DataFrame:
    """A predictions frame restricted to the matched labels, renamed to their shared names."""
    from trainer.metrics import PROB_PREFIX

    cols = ["key", "patient_id", "split"]
    names = {m[side]: m["shared"] for m in matched}
    out = df[cols + [m[side] for m in matched] + [PROB_PREFIX + m[side] for m in matched]].copy()
    return out.rename(columns={**names, **{PROB_PREFIX + k: PROB_PREFIX + v for k, v in names.items()}})


def _internal_predictions(loaded, run_sha: str, match: LabelMatch, views: tuple[str, ...], common: dict,
                          log: Callable[[str], None]) -> tuple[pd.DataFrame | None, pd.DataFrame | None, str]:
    """(test frame, valid frame, where they came from) on the run's own shard set, matched labels, shared names."""
    import cxrshards
    from trainer.checkpoint import card_sha256
    from trainer.evaluate import _patient_ids, _predict_split

    inf = loaded.inference
    run_labels = [m["run"] for m in match.matched]
    reused = _reusable_internal(loaded, run_sha, run_labels)
    if reused is not None:
        test, valid = reused
        log(f"internal numbers: reusing {loaded.run_dir / 'eval'}/predictions.parquet (same checkpoint)")
        return (_rename(test, match.matched, "run"), None if valid is None else _rename(valid, match.matched, "run"),
                f"reused {loaded.run_dir / 'eval' / 'predictions.parquet'} (same checkpoint sha256)")
    cfg = inf.config
    ref = cfg.get("shards")
    try:
        own_dir = cxrshards.resolve_shard_dir(ref, cfg.get("root"))
    except CxrError as exc:   # the resolver's message, and why the internal side needs the set
        raise EvalError(f"the run's own shard set {ref!r} is not found ({str(exc).splitlines()[0]}): external "
                        f"evaluation needs its valid split (thresholds) and test split (internal column); "
                        f"make it reachable (--root of the run) or run `cxr eval --run {loaded.run_dir}` where it is") from None
    if card_sha256(own_dir) != run_sha:
        raise EvalError(f"shard set {own_dir} in {loaded.run_dir}/config.json is no longer the one the run was "
                        f"trained on (card sha256 differs): rebuild it as it was, or restore it")
    own_card = cxrshards.read_card(own_dir)
    own_labels = list(own_card["labels"])
    index = [own_labels.index(n) for n in inf.labels]
    counts = {s: int((own_card.get("splits", {}).get(s) or {}).get("count", 0)) for s in ("valid", "test")}
    frames = {}
    for split in ("valid", "test"):
        if counts[split] <= 0:
            frames[split] = None
            continue
        log(f"predicting the run's own {split} split ({counts[split]} images of {own_card.get('name')})")
        probs, y, keys = _predict_split(loaded, own_dir, split, index, views=views, **common)
        df = predictions_frame(keys, _patient_ids(own_dir, keys), y, probs, inf.labels, split)
        frames[split] = _rename(df, match.matched, "run")
    return frames["test"], frames["valid"], f"predicted on the run's own shard set {own_dir}"


def _side(metrics: dict | None, boot: list[dict] | None, k: int, label: str) -> dict | None:
    if metrics is None:
        return None
    e = metrics["per_label"][label]
    ci = boot[k] if boot else {}
    return {"auroc": e["auroc"], "low": ci.get("low"), "high": ci.get("high"), "n": e["n"], "positives": e["positives"]}


def _label_cis(metrics: dict | None, df: pd.DataFrame | None, labels: list[str], n_boot: int, seed: int):
    """Per-label patient-bootstrap intervals (None where the label is undefined on that side)."""
    if metrics is None:
        return None
    y, p = frame_arrays(df, labels)
    cis = bootstrap_label_aurocs(y, p, df["patient_id"].astype(str).tolist(), range(len(labels)), n_boot=n_boot, seed=seed)
    return [ci if metrics["per_label"][n]["defined"] else {} for ci, n in zip(cis, labels)]


def comparison_rows(internal: dict | None, external: dict, internal_df: pd.DataFrame | None,
                    external_df: pd.DataFrame, labels: list[str], n_boot: int, seed: int) -> tuple[list[dict], dict]:
    """Per matched label: AUROC and 95% CI on the run's own test split and on the other set, and the
    difference (external - internal); plus the same for macro AUROC."""
    ext_ci = _label_cis(external, external_df, labels, n_boot, seed)
    int_ci = _label_cis(internal, internal_df, labels, n_boot, seed)
    rows = []
    for k, name in enumerate(labels):
        a, b = _side(internal, int_ci, k, name), _side(external, ext_ci, k, name)
        diff = None if a is None or a["auroc"] is None or b["auroc"] is None else b["auroc"] - a["auroc"]
        rows.append({"label": name, "internal": a, "external": b, "difference": diff})

    def _macro(m: dict | None) -> dict | None:
        if m is None:
            return None
        ci = m.get("macro_auroc_ci") or {}
        return {"auroc": m["macro_auroc"], "low": ci.get("low"), "high": ci.get("high"),
                "labels": len(m["defined_labels"])}

    mi, me = _macro(internal), _macro(external)
    diff = None if mi is None or mi["auroc"] is None or me["auroc"] is None else me["auroc"] - mi["auroc"]
    return rows, {"internal": mi, "external": me, "difference": diff}


def evaluate_external(
    loaded,
    shard_dir: Path,
    *,
    split: str = "test",
    label_map: str | Path | None = None,
    out: str | Path | None = None,
    n_boot: int = N_BOOTSTRAP,
    seed: int = BOOTSTRAP_SEED,
    batch_size: int = 64,
    workers: int = 0,
    format: str = "auto",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Evaluate a loaded run (`trainer.predict.load_run`) on another shard set; write RUN/eval/NAME/ (or
    `out`); return the report dict (its `external` entry holds the label match and the comparison)."""
    import cxrshards
    from manifests import __version__
    from trainer.checkpoint import card_sha256
    from trainer.evaluate import _patient_ids, _predict_split, phantom_info, report_head
    from trainer.plots import plot_curves
    from trainer.report import comparable_macro, write_report

    log = log or (lambda _msg: None)
    started = time.perf_counter()
    inf, run_card, run_dir = loaded.inference, loaded.card, loaded.run_dir
    card = cxrshards.read_card(shard_dir)
    name = str(card.get("name") or shard_dir.name)
    if int(card["size"]) != int(run_card["size"]):
        raise EvalError(f"shard set {name} holds {card['size']} px images but {run_dir} was trained on "
                        f"{run_card['size']} px: build the set at the run's size with "
                        f"`{_build_hint(card, int(run_card['size']))}` and evaluate that")
    if not _SAFE_NAME.match(name):
        raise EvalError(f"{shard_dir}/dataset.json: name {name!r} cannot be a folder under {run_dir}/eval/")
    run_sha = run_card_sha256(loaded)
    lmap, map_text = label_map_for(inf.checkpoint, label_map)
    run_shared = run_shared_labels(inf.checkpoint, inf.labels, str(run_card.get("source")), lmap)
    match = match_labels(inf.labels, run_shared, str(card.get("source")), list(card["labels"]), lmap, map_text)
    if not match.matched:
        raise EvalError(f"run {run_dir} ({', '.join(run_shared)}) and shard set {name} "
                        f"({', '.join(card['labels'])}) share no label, even through the label map: "
                        f"pass --label-map FILE (source,label,shared) naming what is the same")
    counts = {s: int((card.get("splits", {}).get(s) or {}).get("count", 0)) for s in ("train", "valid", "test")}
    if counts.get(split, 0) <= 0:
        present = ", ".join(f"{s} ({n})" for s, n in counts.items() if n) or "none"
        raise EvalError(f"shard set {shard_dir} has no {split!r} samples to evaluate (splits: {present}); "
                        f"pick another with --split")
    out_dir = Path(out) if out is not None else run_dir / "eval" / name
    shared = match.shared
    log(f"external evaluation on {name}: {len(shared)} matched label(s): {', '.join(shared)}")

    run_views = tuple(inf.config.get("views") or ())
    common = dict(fmt=format, batch_size=batch_size, workers=workers)
    internal_df, valid_df, internal_source = _internal_predictions(loaded, run_sha, match, run_views, common, log)
    thresholds = youden_thresholds(*frame_arrays(valid_df, shared), shared) if valid_df is not None else None
    threshold_source = "valid" if thresholds is not None else "none (the run's set has no valid split)"

    views, views_note = _set_views(shard_dir, split, run_views)
    log(f"predicting the {split} split of {name} ({counts[split]} images)")
    set_labels = list(card["labels"])
    probs, y, keys = _predict_split(loaded, shard_dir, split, [set_labels.index(m["set"]) for m in match.matched],
                                    views=views, **common)
    run_idx = [inf.labels.index(m["run"]) for m in match.matched]
    df = predictions_frame(keys, _patient_ids(shard_dir, keys), y, probs[:, run_idx], shared, split)
    meta = {"split": split, "shard_set": name, "label_match": match.matched}
    write_predictions(df, out_dir / "predictions.parquet", shared, meta)
    if valid_df is not None:
        write_predictions(valid_df, out_dir / "valid_predictions.parquet", shared,
                          {"split": "valid", "shard_set": run_card.get("name"), "note": "the run's own valid split"})
    if internal_df is not None:
        write_predictions(internal_df, out_dir / "internal_predictions.parquet", shared,
                          {"split": "test", "shard_set": run_card.get("name")})

    y_saved, p_saved = frame_arrays(df, shared)
    metrics = compute_metrics(y_saved, p_saved, shared, patient_ids=df["patient_id"].tolist(), thresholds=thresholds,
                              threshold_source=threshold_source, n_boot=n_boot, seed=seed)
    internal = None
    if internal_df is not None:
        yi, pi = frame_arrays(internal_df, shared)
        internal = compute_metrics(yi, pi, shared, patient_ids=internal_df["patient_id"].tolist(),
                                   thresholds=thresholds, threshold_source=threshold_source, n_boot=n_boot, seed=seed)
    rows, macro = comparison_rows(internal, metrics, internal_df, df, shared, n_boot, seed)

    phantom = phantom_info(shard_dir)
    phantom_findings = None
    if phantom is not None:
        drawn = [m["shared"] for m in match.matched if m["set"] in phantom.get("labels_drawn", [])]
        value, used = comparable_macro(metrics["per_label"], drawn)
        phantom_findings = {"labels": drawn, "macro_auroc": value, "labels_used": used}
    report = {
        **report_head(loaded, split, views),
        "shard_set": {"name": name, "path": str(shard_dir), "source": card.get("source"), "size": card.get("size"),
                      "fit": card.get("fit"), "codec": card.get("codec"), "card_sha256": card_sha256(shard_dir),
                      "phantom": phantom is not None},
        "normalize": [inf.mean, inf.std],
        "thresholds": {"source": threshold_source, "method": "youden", "per_label": thresholds or {},
                       "from": (f"the run's own valid split ({run_card.get('name')}), not {name}'s" if thresholds is not None
                                else f"none: the run's own set ({run_card.get('name')}) has no valid split, 0.5 is used")},
        "valid": None,
        "references": [],
        "phantom_findings": phantom_findings,
        "metrics": metrics,
        "external": {
            "run_shard_set": {"name": run_card.get("name"), "source": run_card.get("source"),
                              "size": run_card.get("size"), "fit": run_card.get("fit"), "card_sha256": run_sha},
            "labels": {"matched": match.matched, "run_only": match.run_only, "set_only": match.set_only,
                       "map": match.map, "map_rows": lmap.to_rows()},
            "preprocessing": {"pixels": f"{name}'s as stored (fit {card.get('fit')}, codec {card.get('codec')})",
                              "run_fit": run_card.get("fit"), "normalize": [inf.mean, inf.std],
                              "views": list(views) or None, "views_note": views_note},
            "internal": {"split": "test", "source": internal_source, "metrics": internal},
            "comparison": rows,
            "comparison_macro": macro,
        },
        "tool_version": __version__,
        "seconds": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{run_dir.name} on {split} split of {name} (external)"
    plot_curves("roc", y_saved, p_saved, shared, metrics, out_dir / "roc.png", title=title)
    plot_curves("pr", y_saved, p_saved, shared, metrics, out_dir / "pr.png", title=title)
    report["seconds"] = round(time.perf_counter() - started, 3)
    files = ["report.json", "report.md", "predictions.parquet", "roc.png", "pr.png"]
    files += [f for f, d in (("valid_predictions.parquet", valid_df), ("internal_predictions.parquet", internal_df))
              if d is not None]
    report["files"] = {f: str(out_dir / f) for f in files}
    write_report(report, out_dir)
    return report


__all__ = ["LabelMatch", "comparison_rows", "evaluate_external", "label_map_for", "match_labels",
           "run_card_sha256", "run_shared_labels"]
