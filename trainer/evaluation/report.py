"""report.json and report.md of one evaluation, with the seed studies' published figures beside ours
when the shard set's source is the one they were measured on."""
from __future__ import annotations

import json
from pathlib import Path

from manifests.atomic import write_bytes_atomic

# Published figures to read our numbers against. Keyed by the shard card's `source`.
CHEXNET_PER_LABEL = {  # Rajpurkar et al. 2017, Table 1 (DenseNet-121, NIH official test split)
    "Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Effusion": 0.8638, "Infiltration": 0.7345,
    "Mass": 0.8676, "Nodule": 0.7802, "Pneumonia": 0.7680, "Pneumothorax": 0.8887,
    "Consolidation": 0.7901, "Edema": 0.8878, "Emphysema": 0.9371, "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062, "Hernia": 0.9164,
}
REFERENCES: dict[str, list[dict]] = {
    "nih": [{
        "name": "CheXNet paper (Rajpurkar et al. 2017): NIH ChestX-ray14, DenseNet-121, 224 px",
        "macro_auroc": 0.841,
        "labels": list(CHEXNET_PER_LABEL),
        "per_label_auroc": CHEXNET_PER_LABEL,
        "note": "mean over the 14 findings (No Finding excluded); the published reference",
    }],
    "mimic": [{
        "name": "seed study 001: MIMIC-CXR-JPG, first AP image per patient, ResNet-101, BCE with pos_weight",
        "macro_auroc": 0.7594,
        "labels": None,
        "per_label_auroc": {},
        "note": "the seed's own test split (study_id ending in 8 or 9: `--split study-digit`)",
    }],
}


def references_for(source: str | None) -> list[dict]:
    return [dict(r) for r in REFERENCES.get(source or "", [])]


def comparable_macro(per_label: dict, labels: list[str] | None) -> tuple[float | None, int]:
    """(our macro AUROC over the reference's labels that are defined here, how many those are).

    A reference without a label list (None) compares with our macro over all defined labels."""
    names = list(per_label) if labels is None else [n for n in labels if n in per_label]
    vals = [per_label[n]["auroc"] for n in names if per_label[n]["auroc"] is not None]
    return (sum(vals) / len(vals) if vals else None), len(vals)


# --------------------------------------------------------------------------- rendering

def _f(x, digits: int = 4) -> str:
    return "undefined" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """report.md: what was evaluated, the headline numbers, references, one row per label."""
    m = report["metrics"]
    shards = report.get("shard_set", {})
    ckpt = report.get("checkpoint", {})
    ci = m.get("macro_auroc_ci") or {}
    out = [f"# Evaluation: {report.get('run', '')}", ""]
    out.append(
        f"Checkpoint `{ckpt.get('path', '?')}` (epoch {ckpt.get('epoch', '?')}, model {report.get('model', '?')}, "
        f"task {report.get('task', '?')}) on the **{report.get('split', '?')}** split of shard set "
        f"`{shards.get('name', '?')}` (source {shards.get('source', '?')}, {shards.get('size', '?')} px, "
        f"card sha256 `{str(shards.get('card_sha256', ''))[:12]}`): {m['n_samples']} images"
        + (f" of {m['n_patients']} patients." if m.get("n_patients") is not None else ".")
    )
    if shards.get("phantom"):
        out += ["", "> These are **phantom** (synthetic) images from `cxr demo-data`: the numbers show the "
                "pipeline works, they say nothing about real X-rays, and the published figures below do not apply."]
        pf = report.get("phantom_findings") or {}
        if pf.get("labels"):
            out += ["", f"Macro AUROC over the {pf['labels_used']} findings the phantom draws into the pixels "
                    f"({', '.join(pf['labels'])}): **{_f(pf.get('macro_auroc'))}**."]
    out += ["", "## Summary", ""]
    ci_txt = (f"{_f(ci.get('low'))} to {_f(ci.get('high'))}" if ci.get("low") is not None else "-")
    rows = [
        ["macro AUROC", _f(m["macro_auroc"]), f"mean over {len(m['defined_labels'])} defined labels"],
        ["macro AUROC 95% CI", ci_txt, f"bootstrap: {ci.get('n_used', 0)} resamples of patients, seed {ci.get('seed')}"],
        ["micro AUROC", _f(m["micro_auroc"]), "all usable label entries pooled"],
        ["macro AUPRC", _f(m["macro_auprc"]), "average precision"],
        ["micro AUPRC", _f(m["micro_auprc"]), ""],
        ["accuracy at 0.5", _pct(m["accuracy"]), "pooled over labels"],
        ["accuracy at valid thresholds", _pct(m["accuracy_at_threshold"]), "Youden threshold per label, chosen on valid"],
    ]
    out.append(_table(["metric", "value", "note"], rows))
    if m["undefined_labels"]:
        out += ["", "Undefined (no positive or no negative in this split, left out of the macro averages): "
                + ", ".join(f"`{n}`" for n in m["undefined_labels"]) + "."]

    if report.get("external"):
        out += external_section(report)
    if report.get("per_set"):
        out += per_set_section(report)

    refs = report.get("references") or []
    if refs:
        out += ["", "## Published figures", ""]
        rows = []
        for r in refs:
            theirs = len(r["labels"]) if r.get("labels") else None
            used = r.get("ours_labels_used", 0)
            span = f" ({used} of {theirs} labels)" if theirs else f" ({used} labels)"
            rows.append([r["name"], _f(r["macro_auroc"]), _f(r.get("ours_macro_auroc")) + span, r.get("note", "")])
        out.append(_table(["reference", "their macro AUROC", "ours (their labels)", "note"], rows))

    out += ["", "## Per label", ""]
    ref_pl = {}
    for r in refs:
        ref_pl.update(r.get("per_label_auroc") or {})
    header = ["label", "n", "positives", "prevalence", "AUROC", "AUPRC", "sens@0.5", "spec@0.5",
              "threshold", "sens@thr", "spec@thr"]
    if ref_pl:
        header.append("published AUROC")
    rows = []
    for name in m["labels"]:
        e = m["per_label"][name]
        a, t = e["at_0.5"], e["at_threshold"]
        thr = "0.5 (default)" if e["threshold_source"] != "valid" else f"{t['threshold']:.3f}"
        row = [name, e["n"], e["positives"], _pct(e["prevalence"]), _f(e["auroc"]), _f(e["auprc"]),
               _pct(a["sensitivity"]), _pct(a["specificity"]), thr, _pct(t["sensitivity"]), _pct(t["specificity"])]
        if ref_pl:
            row.append(_f(ref_pl.get(name)) if name in ref_pl else "-")
        rows.append(row)
    out.append(_table(header, rows))
    out += ["", "## Curves", "", "![ROC curves](roc.png)", "", "![Precision-recall curves](pr.png)", ""]
    if report.get("calibration"):
        out += calibration_section(report["calibration"])
    if report.get("subgroups"):
        from trainer.evaluation.subgroups import subgroups_markdown

        out += [subgroups_markdown(report["subgroups"]), "![Subgroups: macro AUROC with 95% CI](subgroups.png)", ""]
    if report.get("gallery"):
        out += ["## Gallery", "", "Per label (most positives first), the highest-scored true positives and false positives "
                "at or above the label's threshold chosen on valid, with Grad-CAM heatmaps.", "",
                "![Gallery](gallery.png)", ""]
    out += ["Files: `report.json` (every number here), `predictions.parquet` (key, patient_id, true labels, "
            "`prob_LABEL` per label), `valid_predictions.parquet` (the valid split the thresholds come from).", ""]
    return "\n".join(out)


def calibration_section(cal: dict) -> list[str]:
    """Brier score and ECE per label and macro, with their patient-bootstrap intervals, and the diagram."""
    def ci(e: dict | None) -> str:
        if not e or e.get("value") is None:
            return "-"
        return f"{e['value']:.4f}" + (f" [{e['low']:.4f}, {e['high']:.4f}]" if e.get("low") is not None else "")

    rows = [[name, e["n"], e["positives"], ci(e["brier"]), ci(e["ece"])] for name, e in cal["per_label"].items()]
    macro = cal["macro"]
    rows.append(["**macro**", "", "", ci(macro["brier"]), ci(macro["ece"])])
    return ["## Calibration", "",
            f"Brier score and expected calibration error (ECE, {cal['n_bins']} equal-width bins of the predicted "
            "probability, Guo et al. 2017), each with its patient-bootstrap 95% CI; lower is better. The reliability "
            "diagram plots the observed rate against the mean probability of each bin, with its count.", "",
            _table(["label", "n", "positives", "Brier [95% CI]", "ECE [95% CI]"], rows), "",
            "![Reliability diagram](calibration.png)", ""]


def per_set_section(report: dict) -> list[str]:
    """A run over several shard sets: macro/micro AUROC on each set's split and on the pooled one."""
    rows = []
    parts = [(name, part["metrics"]) for name, part in report["per_set"].items()] + [("pooled", report["metrics"])]
    for name, m in parts:
        ci = m.get("macro_auroc_ci") or {}
        ci_txt = f"{_f(ci.get('low'))} to {_f(ci.get('high'))}" if ci.get("low") is not None else "-"
        rows.append([name, m["n_samples"], _f(m["macro_auroc"]), ci_txt, _f(m["micro_auroc"]),
                     ", ".join(m["undefined_labels"]) or "-"])
    return ["", "## Per shard set", "",
            f"Thresholds for every set: {report['thresholds'].get('from', 'valid')}. A label a set lacks is "
            "undefined on it.", "",
            _table(["shard set", "images", "macro AUROC", "95% CI", "micro AUROC", "undefined labels"], rows)]


def _auroc_ci(side: dict | None) -> str:
    if side is None:
        return "-"
    if side["auroc"] is None:
        return "undefined"
    ci = f" [{side['low']:.3f}, {side['high']:.3f}]" if side.get("low") is not None else ""
    return f"{side['auroc']:.4f}{ci}"


def external_section(report: dict) -> list[str]:
    """report.md of an external evaluation: the label match, how it was done, internal vs external."""
    ext = report["external"]
    labels, pre, internal = ext["labels"], ext["preprocessing"], ext["internal"]
    own, other = ext["run_shard_set"].get("name"), report["shard_set"].get("name")
    out = ["", "## Internal vs external", "",
           f"The run was trained on `{own}` (source {ext['run_shard_set'].get('source')}); this is an **external** "
           f"evaluation on `{other}` (source {report['shard_set'].get('source')}). Labels meet through shared names "
           f"(label map: {labels['map']}).", ""]
    rows = []
    for row, m in zip(ext["comparison"], labels["matched"]):
        diff = "-" if row["difference"] is None else f"{row['difference']:+.4f}"
        rows.append([m["shared"], f"`{m['run']}`", f"`{m['set']}`", _auroc_ci(row["internal"]),
                     _auroc_ci(row["external"]), diff])
    macro = ext["comparison_macro"]
    diff = "-" if macro["difference"] is None else f"{macro['difference']:+.4f}"
    rows.append(["**macro**", "", "", _auroc_ci(macro["internal"]), _auroc_ci(macro["external"]), diff])
    out.append(_table(["label (shared)", "run's name", "set's name", f"internal AUROC [95% CI] ({own} test)",
                       f"external AUROC [95% CI] ({other} {report['split']})", "difference (ext - int)"], rows))
    out += ["", "95% CIs: percentile bootstrap resampling patients, the same resamples (seed "
            f"{(report['metrics'].get('macro_auroc_ci') or {}).get('seed')}) as the macro interval; "
            "macro = mean over the matched labels defined on that side.", "",
            f"- Run labels this set lacks: {', '.join(f'`{n}`' for n in labels['run_only']) or 'none'}.",
            f"- Set labels the run lacks: {', '.join(f'`{n}`' for n in labels['set_only']) or 'none'}.",
            f"- Internal numbers: {internal['source']}.",
            f"- Thresholds (Youden per label): {report['thresholds'].get('from')}.",
            f"- Pixels: {pre['pixels']}; the run's normalisation mean {pre['normalize'][0]:.4f}, "
            f"std {pre['normalize'][1]:.4f}"
            + (f" (the run's own set was built with fit {pre['run_fit']})" if pre.get("run_fit") != report["shard_set"].get("fit") else "")
            + ".",
            f"- Views: {pre['views_note'] or (', '.join(pre['views']) if pre.get('views') else 'all')}.",
            "- Files here: `predictions.parquet` (this set, matched labels under their shared names), "
            "`valid_predictions.parquet` (the run's own valid split: the thresholds), "
            "`internal_predictions.parquet` (the run's own test split: the internal column)."]
    return out


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html (the same text with every figure embedded) into `out_dir`
    (atomically); returns their paths."""
    from trainer.evaluation.html import write_html

    out_dir = Path(out_dir)
    paths = {"report.json": out_dir / "report.json", "report.md": out_dir / "report.md"}
    write_bytes_atomic(paths["report.json"], (json.dumps(report, indent=2, sort_keys=False) + "\n").encode())
    text = render_markdown(report)
    write_bytes_atomic(paths["report.md"], text.encode())
    paths["report.html"] = write_html(text, out_dir, f"cxr evaluation: {report.get('run', '')}")
    return paths
