"""Where a run meets another shard set's labels, and how the two sides compare.

- The run's labels in shared names are the checkpoint's `shared_labels`, else mapped from its first card's
  source (`run_shared_labels`). A set's labels meet them through the same map (`match_labels`): matched labels
  in the run's order, the run's labels the set lacks, the set's labels the run lacks.
- `comparison_rows`: per matched label, the AUROC with its patient-bootstrap 95% CI on the run's own test split
  (internal) and on the other set (external), and the difference external - internal; then the macro.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from manifests.labelmap import LabelMap
from trainer.metrics import EvalError, bootstrap_label_aurocs, frame_arrays, patient_keys


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
    cis = bootstrap_label_aurocs(y, p, patient_keys(df), range(len(labels)), n_boot=n_boot, seed=seed)
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
