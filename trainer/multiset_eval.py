"""`cxr eval --run RUN` of a run trained on several shard sets: each set's split and the pooled one.

The rules:
- The sets are the run's own (config.json `shards`, the checkpoint's `sets`); each card must still have the
  sha256 the run was trained on. They are read as in training (`cxrshards.mix`, the checkpoint's label map),
  so keys are `NAME/KEY`, patient ids `NAME/ID` (patients of two sets are never merged in the bootstrap) and a
  run label a set lacks is NaN for its rows (left out of that label's numbers).
- Thresholds: Youden per label on the pooled valid split (one model, one threshold per label), used for
  every set. The run's `--views` apply to every set.
- `cxr eval --run RUN --shards OTHER` (external, `trainer.external`): the internal side is the pooled test
  split of the run's own sets, taken from `RUN/eval/` when it holds this checkpoint's test evaluation, else
  evaluated first (writing `RUN/eval/` as `cxr eval --run RUN` does); the run is named `A+B` in the report.
- Output `RUN/eval/` (or `out`): predictions.parquet (pooled split; a set's rows are the keys `NAME/...`),
  valid_predictions.parquet, report.json (`metrics` = pooled, `per_set` = {NAME: {"shard_set", "metrics"}}),
  report.md, roc.png, pr.png (pooled). Every number equals scikit-learn's on those rows.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cxrshards import mix
from manifests.labelmap import LabelMap, load_label_map
from trainer.metrics import EvalError, compute_metrics, frame_arrays, predictions_frame, write_predictions, youden_thresholds


def is_multiset(config: dict) -> bool:
    """True for a run trained on several shard sets (its config.json lists them)."""
    shards = config.get("shards")
    return isinstance(shards, list) and len(shards) > 1


def run_sets(loaded, root=None) -> list[mix.MixSet]:
    """The run's shard sets, checked against the card sha256s its checkpoint recorded."""
    from trainer.checkpoint import card_sha256

    inf = loaded.inference
    rows = inf.checkpoint.get("label_map")
    lmap = LabelMap(renames={(r["source"], r["label"]): r["shared"] for r in rows}) if rows else load_label_map()
    sets = mix.resolve_sets(inf.config["shards"], root if root is not None else inf.config.get("root"), lmap)
    recorded = {s["name"]: s.get("card_sha256") for s in inf.checkpoint.get("sets") or []}
    for s in sets:
        if recorded.get(s.name) not in (None, card_sha256(s.shard_dir)):
            raise EvalError(f"shard set {s.shard_dir} is no longer the one {loaded.run_dir} was trained on (card "
                            f"sha256 differs): rebuild it as it was, or restore it")
    return sets


def _predict(loaded, sets, split: str, keys, *, fmt: str, batch_size: int, workers: int):
    import torch

    from trainer.loop import predict

    inf = loaded.inference
    stream = mix.open_mix(sets, split, inf.labels, format=fmt, shuffle=False, batch_size=batch_size, rank=0,
                          world_size=1, keys=keys)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    probs, labels, out_keys = predict(inf.model, loader, loaded.device, mean=inf.mean, std=inf.std, head=inf.head,
                                      gather=False)
    return probs.reshape(len(out_keys), -1), labels.reshape(len(out_keys), -1), list(out_keys)


def _set_card(s: mix.MixSet) -> dict:
    from trainer.checkpoint import card_sha256

    c = s.card
    return {"name": s.name, "path": str(s.shard_dir), "source": c.get("source"), "size": c.get("size"),
            "fit": c.get("fit"), "codec": c.get("codec"), "card_sha256": card_sha256(s.shard_dir), "phantom": False}


def evaluate_multiset(loaded, *, split: str = "test", root=None, out: str | Path | None = None, n_boot: int,
                      seed: int, batch_size: int = 64, workers: int = 0, format: str = "auto",
                      log: Callable[[str], None] | None = None) -> dict:
    """Evaluate a loaded multi-set run (`trainer.predict.load_run`) on each of its sets and pooled."""
    from manifests import __version__
    from trainer.evaluate import report_head, write_outputs

    log = log or (lambda _msg: None)
    started = time.perf_counter()
    inf, run_dir = loaded.inference, loaded.run_dir
    labels = list(inf.labels)
    sets = run_sets(loaded, root)
    table = mix.combined_table(sets, labels)
    views = tuple(inf.config.get("views") or ())

    def keys_of(which: str):
        rows = table[(table["split"] == which) & (table["view"].isin(views) if views else True)]
        return rows["key"].tolist()

    patients = dict(zip(table["key"], table["patient_id"]))
    counts = {s: len(keys_of(s)) for s in ("valid", split)}
    if counts[split] == 0:
        raise EvalError(f"the shard sets of {run_dir} have no {split!r} samples to evaluate; pick another with --split")
    out_dir = Path(out) if out is not None else run_dir / "eval"
    common = dict(fmt=format, batch_size=batch_size, workers=workers)
    names = [s.name for s in sets]

    def split_sets(which: str) -> list[mix.MixSet]:   # a set without this split is left out (and listed)
        return [s for s in sets if int((s.card.get("splits", {}).get(which) or {}).get("count", 0)) > 0]

    thresholds, threshold_source, valid_summary = None, "none (no valid split)", None
    if counts["valid"]:
        log(f"predicting the pooled valid split ({counts['valid']} images of {', '.join(names)}) for the thresholds")
        vsets = split_sets("valid")
        vp, vy, vkeys = _predict(loaded, vsets, "valid", [k for k in keys_of("valid")
                                                          if mix.split_key(k)[0] in {s.name for s in vsets}], **common)
        thresholds, threshold_source = youden_thresholds(vy, vp, labels), "valid"
        vdf = predictions_frame(vkeys, [patients[k] for k in vkeys], vy, vp, labels, "valid")
        write_predictions(vdf, out_dir / "valid_predictions.parquet", labels, {"split": "valid", "sets": names})
        valid_summary = {"n_samples": len(vkeys)}
    log(f"predicting the {split} split of {', '.join(names)} ({counts[split]} images)")
    tsets = split_sets(split)
    probs, y, keys = _predict(loaded, tsets, split, [k for k in keys_of(split)
                                                     if mix.split_key(k)[0] in {s.name for s in tsets}], **common)
    df = predictions_frame(keys, [patients[k] for k in keys], y, probs, labels, split)
    write_predictions(df, out_dir / "predictions.parquet", labels, {"split": split, "sets": names})

    def metrics_of(frame):
        ys, ps = frame_arrays(frame, labels)
        return compute_metrics(ys, ps, labels, patient_ids=frame["patient_id"].tolist(), thresholds=thresholds,
                               threshold_source=threshold_source, n_boot=n_boot, seed=seed)

    y_saved, p_saved = frame_arrays(df, labels)
    pooled = metrics_of(df)
    of_set = np.array([mix.split_key(k)[0] for k in df["key"]])
    per_set = {}
    for s in tsets:
        part = df[of_set == s.name].reset_index(drop=True)
        per_set[s.name] = {"shard_set": _set_card(s), "metrics": metrics_of(part)}
    report = {
        **report_head(loaded, split, views),
        "shard_set": {"name": "+".join(names), "path": ", ".join(str(s.shard_dir) for s in sets),
                      "source": "+".join(s.source for s in sets), "size": sets[0].card.get("size"),
                      "card_sha256": inf.checkpoint.get("card_sha256"), "phantom": False, "sets": names},
        "normalize": [inf.mean, inf.std],
        "thresholds": {"source": threshold_source, "method": "youden", "per_label": thresholds or {},
                       "from": "the pooled valid split of the run's sets"},
        "valid": valid_summary,
        "references": [],
        "phantom_findings": None,
        "metrics": pooled,
        "per_set": per_set,
        "tool_version": __version__,
        "seconds": None,
    }
    return write_outputs(report, out_dir, y_saved, p_saved, labels,
                         f"{run_dir.name}: {split} split of {' + '.join(names)} (pooled)", started)


def evaluate_multiset_external(loaded, shard_dir: Path, *, split: str = "test", label_map=None,
                               out: str | Path | None = None, n_boot: int, seed: int, batch_size: int = 64,
                               workers: int = 0, format: str = "auto", log: Callable[[str], None] | None = None) -> dict:
    """A multi-set run on another shard set: `trainer.external.evaluate_external` with the pooled test split of
    the run's own sets (RUN/eval/) as the internal side."""
    from trainer.external import _reusable_internal, evaluate_external, run_card_sha256

    log = log or (lambda _msg: None)
    common = dict(n_boot=n_boot, seed=seed, batch_size=batch_size, workers=workers, format=format, log=log)
    if _reusable_internal(loaded, run_card_sha256(loaded), list(loaded.inference.labels)) is None:
        log(f"the internal side is the pooled test split of the run's own sets: evaluating it first "
            f"({loaded.run_dir / 'eval'})")
        evaluate_multiset(loaded, split="test", **common)
    names = [s["name"] for s in loaded.inference.checkpoint.get("sets") or []]
    as_one = dataclasses.replace(loaded, card={**loaded.card, "name": "+".join(names)})
    return evaluate_external(as_one, shard_dir, split=split, label_map=label_map, out=out, **common)
