"""`cxr eval` (a run's checkpoint on a split of its shard set -> RUN/eval/) and `cxr predict` (raw images)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from cli.app import app, console
from manifests.errors import CxrError


def _f(x, digits: int = 3) -> str:
    return "[dim]undefined[/]" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary_table(report: dict, title: str | None = None) -> Table:
    """One row per label (AUROC, AUPRC, sensitivity/specificity at the valid threshold), then macro/micro."""
    m = report["metrics"]
    shards = report.get("shard_set", {})
    table = Table(title=title or f"{report['run']}: {report['split']} split of {shards.get('name')} "
                  f"({m['n_samples']} images, {m.get('n_patients')} patients)", title_justify="left")
    table.add_column("label", no_wrap=True, min_width=max(len(n) for n in m["labels"]))
    for col in ("pos / n", "AUROC", "AUPRC", "threshold", "sens", "spec"):
        table.add_column(col, justify="right")
    for name in m["labels"]:
        e = m["per_label"][name]
        t = e["at_threshold"]
        thr = f"{t['threshold']:.3f}" if e["threshold_source"] == "valid" else "0.5*"
        table.add_row(name, f"{e['positives']} / {e['n']}", _f(e["auroc"]), _f(e["auprc"]), thr,
                      _pct(t["sensitivity"]), _pct(t["specificity"]))
    table.add_section()
    table.add_row("[bold]macro[/]", f"{len(m['defined_labels'])} labels", f"[bold]{_f(m['macro_auroc'])}[/]",
                  _f(m["macro_auprc"]), "", "", "")
    table.add_row("[bold]micro[/]", "", _f(m["micro_auroc"]), _f(m["micro_auprc"]), "",
                  f"acc {_pct(m['accuracy_at_threshold'])}", "")
    return table


def print_report(report: dict, title: str | None = None) -> None:
    m = report["metrics"]
    console.print(summary_table(report, title))
    ci = m.get("macro_auroc_ci") or {}
    if ci.get("low") is not None:
        console.print(f"macro AUROC {_f(m['macro_auroc'])}, 95% CI {ci['low']:.3f} to {ci['high']:.3f} "
                      f"({ci['n_used']} bootstrap resamples of patients, seed {ci['seed']})")
    pf = report.get("phantom_findings") or {}
    if pf.get("labels"):
        console.print(f"phantom data: macro AUROC over the {pf['labels_used']} finding(s) drawn into the pixels "
                      f"[bold]{_f(pf.get('macro_auroc'))}[/]")
    if m["undefined_labels"]:
        console.print("undefined (no positive or no negative in this split, left out of macro): "
                      + ", ".join(m["undefined_labels"]))
    if report["thresholds"]["source"] != "valid":
        console.print("* no valid split: thresholds at 0.5")
    for r in report.get("references") or []:
        note = " (phantom data: not comparable)" if report["shard_set"].get("phantom") else ""
        console.print(f"reference: {r['name']}: macro AUROC {r['macro_auroc']:.3f}; ours on "
                      f"{r.get('ours_labels_used', 0)} of its labels {_f(r.get('ours_macro_auroc'))}{note}")
    eval_dir = Path(report["files"]["report.json"]).parent
    console.print(f"wrote {eval_dir}/: " + ", ".join(Path(f).name for f in report["files"].values()))


def external_table(report: dict) -> Table:
    """Internal vs external: per matched label, AUROC [95% CI] on the run's own test split and on the
    other set, and the difference; then macro AUROC over the matched labels."""
    ext = report["external"]
    own, other = ext["run_shard_set"].get("name"), report["shard_set"].get("name")
    table = Table(title=f"internal ({own}, test) vs external ({other}, {report['split']}): AUROC [95% CI]",
                  title_justify="left")
    table.add_column("label (shared name)", no_wrap=True)
    table.add_column(f"internal {own}", justify="right")
    table.add_column(f"external {other}", justify="right")
    table.add_column("difference", justify="right")

    def cell(side: dict | None) -> str:
        if side is None:
            return "-"
        if side["auroc"] is None:
            return "[dim]undefined[/]"
        ci = f" [{side['low']:.3f}, {side['high']:.3f}]" if side.get("low") is not None else ""
        return f"{side['auroc']:.3f}{ci}"

    names = {m["shared"]: m for m in ext["labels"]["matched"]}
    for row in ext["comparison"]:
        m = names[row["label"]]
        label = row["label"] + (f" ({m['set']})" if m["set"] != row["label"] else "")
        diff = "-" if row["difference"] is None else f"{row['difference']:+.3f}"
        table.add_row(label, cell(row["internal"]), cell(row["external"]), diff)
    macro = ext["comparison_macro"]
    table.add_section()
    diff = "-" if macro["difference"] is None else f"{macro['difference']:+.3f}"
    table.add_row("[bold]macro[/]", cell(macro["internal"]), cell(macro["external"]), diff)
    return table


def subgroup_tables(result: dict) -> list[Table]:
    """Per grouping column: each group's images, patients, macro AUROC [95% CI] and underdiagnosis [95% CI],
    each with its difference from the rest of the column (* when that interval excludes 0)."""
    def ci(e: dict | None) -> str:
        if not e or e.get("value") is None:
            return "-"
        return f"{e['value']:.3f}" + (f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None else "")

    def diff(e: dict | None) -> str:
        if not e or e.get("difference") is None:
            return "-"
        star = " *" if e.get("low") is not None and (e["low"] > 0 or e["high"] < 0) else ""
        return f"{e['difference']:+.3f}" + (f" [{e['low']:+.3f}, {e['high']:+.3f}]" if e.get("low") is not None else "") + star

    tables = []
    for column in result["columns"]:
        table = Table(title=f"by {column['column']}" + (f" ({column['missing_images']} images without a value)"
                                                         if column["missing_images"] else ""), title_justify="left")
        for name, justify in (("group", "left"), ("images", "right"), ("patients", "right"),
                              ("macro AUROC [95% CI]", "right"), ("vs rest", "right"),
                              ("underdiagnosis [95% CI]", "right"), ("vs rest", "right")):
            table.add_column(name, justify=justify)
        for g in column["groups"]:
            rest = g["vs_rest"]
            table.add_row(g["value"], f"{g['images']:,}", f"{g['patients']:,}", ci(g["macro_auroc"]),
                          diff(rest["macro_auroc"]), ci(g["underdiagnosis"]), diff(rest["underdiagnosis"]))
        tables.append(table)
    return tables


def print_subgroups(result: dict) -> None:
    console.print(f"[bold]Subgroups[/] ({result['bootstrap']['n_boot']} patient resamples; underdiagnosis: "
                  f"{result['underdiagnosis_definition']['text']})", highlight=False)
    for table in subgroup_tables(result):
        console.print(table)


def print_external(report: dict) -> None:
    ext = report["external"]
    labels = ext["labels"]
    console.print(external_table(report))
    console.print(f"internal numbers: {ext['internal']['source']}; thresholds: {report['thresholds']['from']}",
                  highlight=False)
    console.print(f"label map: {labels['map']}; run labels the set lacks: {', '.join(labels['run_only']) or 'none'}; "
                  f"set labels the run lacks: {', '.join(labels['set_only']) or 'none'}", highlight=False)
    if ext["preprocessing"].get("views_note"):
        console.print(ext["preprocessing"]["views_note"], highlight=False)


@app.command("eval")
def eval_command(
    run: str = typer.Option(..., "--run", help="Run folder written by `cxr train --out RUN`."),
    ckpt: str = typer.Option("best", "--ckpt", help="best | last | PATH of a checkpoint file."),
    split: str = typer.Option("test", "--split", help="Split to evaluate: test | valid | train."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shard set NAME, path or URL (default: the one in the run's config.json)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="URL shard sets: keep downloaded tars here (default: the run's --cache, else $CXR_CACHE, else stream)."),
    root: Optional[str] = typer.Option(None, "--root", help="Shard root for --shards (default: the run's, else $CXR_SHARDS or ./shards)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/eval)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Patient resamples for the 95% CI of macro AUROC (0 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    label_map: Optional[Path] = typer.Option(None, "--label-map", help="CSV source,label,shared over the built-in label map: how the run's labels meet another shard set's (external evaluation)."),
    gallery: bool = typer.Option(True, "--gallery/--no-gallery", help="Also draw gallery.png: the highest-scored true and false positives of the labels with the most positives, with Grad-CAM heatmaps."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress while predicting."),
    by: str = typer.Option("", "--by", metavar="COL,COL", help="Subgroup report by these columns: sex, age (in --age-bands), view, set, or a column --demographics adds (e.g. race)."),
    age_bands: str = typer.Option("0,20,40,60,80", "--age-bands", metavar="A,B,...", help="--by age: band edges in years, each band closed on the left; the last is open (80+)."),
    min_group: int = typer.Option(20, "--min-group", help="--by: a label needs this many positives (and negatives) in a group for an AUROC; fewer say 'too few'."),
    demographics: Optional[Path] = typer.Option(None, "--demographics", help="CSV/Parquet joined by patient before --by: MIMIC-IV patients.csv(.gz) as it is (subject_id, gender, anchor_age), any other table with --demographics-key."),
    demographics_key: Optional[str] = typer.Option(None, "--demographics-key", metavar="COL", help="--demographics: the column holding the patient id."),
) -> None:
    """Evaluate a run: report.html (one self-contained page), report.json, report.md, predictions.parquet, roc.png,
    pr.png, gallery.png in RUN/eval/.

    With --shards naming another shard set than the run's own: an external evaluation, in RUN/eval/NAME/,
    with the internal vs external table."""
    from trainer.evaluation.pipeline import evaluate_run
    from trainer.metrics import EvalError

    if split not in ("train", "valid", "test"):
        raise EvalError(f"--split {split!r}: expected test, valid or train")
    try:
        bands = tuple(float(a) for a in age_bands.split(",") if a.strip())
    except ValueError:
        raise EvalError(f"--age-bands {age_bands!r}: expected increasing ages in years, e.g. 0,20,40,60,80") from None
    if demographics_key and demographics is None:
        raise EvalError("--demographics-key names the patient column of --demographics FILE: pass --demographics too")
    report = evaluate_run(run, ckpt=ckpt, split=split, shards=shards, root=root, out=out, n_boot=bootstrap,
                          seed=seed, device=device, batch_size=batch_size, workers=workers, label_map=label_map, cache=cache,
                          log=lambda msg: console.print(f"[dim]{msg}[/]"), gallery=gallery, quiet=quiet,
                          by=[c.strip() for c in by.split(",") if c.strip()], age_bands=bands, min_group=min_group,
                          demographics=demographics, demographics_key=demographics_key)
    print_report(report, title=f"{report['run']}: {report['split']} split, pooled over "
                 f"{', '.join(report['per_set'])} ({report['metrics']['n_samples']} images)" if report.get("per_set") else None)
    for name, part in (report.get("per_set") or {}).items():
        m = part["metrics"]
        console.print(summary_table({**report, **part}, title=f"{name}: {report['split']} split ({m['n_samples']} "
                                    f"images, {m.get('n_patients')} patients)"))
    if report.get("external"):
        print_external(report)
    if report.get("subgroups"):
        print_subgroups(report["subgroups"])
    console.print(f"open in a browser (self-contained, works offline): [bold]{report['files']['report.html']}[/]",
                  soft_wrap=True)   # a path broken over two lines cannot be copied or clicked


@app.command("predict")
def predict_command(
    images: List[Path] = typer.Argument(..., help="Image files: PNG, JPEG, DICOM."),
    run: Optional[str] = typer.Option(None, "--run", help="Run folder written by `cxr train --out RUN` (PyTorch)."),
    model: Optional[Path] = typer.Option(None, "--model", metavar="DIR", show_default=False,
                                         help="Export folder written by `cxr export --out DIR`: onnxruntime, no "
                                              "PyTorch (instead of --run)."),
    ckpt: str = typer.Option("best", "--ckpt", help="--run: best | last | PATH of a checkpoint file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object) instead of a table."),
    device: str = typer.Option("auto", "--device", help="--run: auto | cpu | cuda."),
    cam: Optional[Path] = typer.Option(None, "--cam", metavar="OUTDIR", show_default=False,
                                       help="--run: also write per image OUTDIR/NNN-NAME.png: the image with a "
                                            "Grad-CAM heatmap per label."),
    labels: str = typer.Option("", "--labels", metavar="A,B", help="--cam: these labels (default: --top)."),
    top: int = typer.Option(3, "--top", help="--cam: the N most probable labels, when --labels is not given."),
) -> None:
    """Per-label probabilities for raw images, preprocessed exactly as the run's shard set was built."""
    if (run is None) == (model is None):
        raise CxrError("pass either --run RUN (the PyTorch checkpoint) or --model DIR (an export of "
                       "`cxr export`), not both" if run else "pass --run RUN or --model DIR (an export of `cxr export`)")
    wanted = [name.strip() for name in labels.split(",") if name.strip()]
    if wanted and cam is None:
        raise CxrError("--labels chooses the heatmaps of --cam OUTDIR: pass --cam too")
    if model is not None:   # onnxruntime: torch is never imported on this path
        if cam is not None:
            raise CxrError("--cam needs the run (Grad-CAM differentiates the PyTorch model): pass --run RUN "
                           "instead of --model")
        from trainer.runtime import predict_exported

        result = predict_exported(images, model)
    else:
        from trainer.predict import predict_images

        result = predict_images(images, run, ckpt, device=device, cam_dir=cam, cam_labels=wanted, cam_top=top)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    pre = result["preprocessing"]
    table = Table(title=f"{result['checkpoint']} ({pre['size']} px, fit {pre['fit']}, codec {pre['codec']})",
                  title_justify="left")
    table.add_column("label")
    for p in result["predictions"]:
        table.add_column(Path(p["image"]).name, justify="right")
    for name in result["labels"]:
        table.add_row(name, *(f"{p['probabilities'][name]:.3f}" for p in result["predictions"]))
    console.print(table)
    if cam is not None:
        console.print(f"wrote {len(result['predictions'])} heatmap figure(s) to {cam}/", highlight=False)
