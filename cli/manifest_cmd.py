"""`cxr manifest build` and `cxr manifest info`: label manifests from the tables alone."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cli.app import app, console

if TYPE_CHECKING:  # pragma: no cover
    from manifests.build import Manifest
from cli.options import (
    FetchListOpt, LabelColsOpt, LabelOpt, LabelsOpt, NegativeOpt, PathColOpt, PathFormatOpt, PatientColOpt,
    PatientPatternOpt, RatiosOpt, RawOpt, RejectsOpt, SeedOpt, SourceOpt, SexColOpt, AgeColOpt, SplitColOpt, SplitOpt, StudyColOpt, TableOpt,
    UncertainOpt, ValidFractionOpt, ViewColOpt, ViewsOpt, manifest_kwargs, manifest_options,
)
# manifests.build / manifests.table (pandas) are imported inside the commands: `cxr --help` stays fast.

manifest_app = typer.Typer(
    help="Label manifests: which images, which labels, which split (tables only, no pixels).",
    no_args_is_help=True,
)
app.add_typer(manifest_app, name="manifest")

OutOpt = Annotated[Path, typer.Option("--out", metavar="FILE.parquet", show_default=False,
                                      help="Manifest to write (Parquet, written atomically).")]


@manifest_app.command("build")
def build(
    source: SourceOpt,
    raw: RawOpt,
    out: OutOpt,
    seed: SeedOpt = 0,
    views: ViewsOpt = "",
    valid_fraction: ValidFractionOpt = 0.1,
    labels: LabelsOpt = "negbio",
    uncertain: UncertainOpt = "zeros",
    split: SplitOpt = "auto",
    fetch_list: FetchListOpt = None,
    label: LabelOpt = None,
    ratios: RatiosOpt = "7:1:2",
    patient_pattern: PatientPatternOpt = None,
    negative: NegativeOpt = "normal",
    table: TableOpt = None,
    path_col: PathColOpt = None,
    patient_col: PatientColOpt = None,
    label_cols: LabelColsOpt = "",
    study_col: StudyColOpt = None,
    view_col: ViewColOpt = None,
    split_col: SplitColOpt = None,
    path_format: PathFormatOpt = None,
    sex_col: SexColOpt = None,
    age_col: AgeColOpt = None,
    rejects: RejectsOpt = None,
) -> None:
    """Select images, labels and a patient-level split from a raw dataset's tables; write a Parquet manifest."""
    from manifests.build import build_manifest
    from manifests.table import write_manifest, write_rejects

    options = manifest_options(source, seed=seed, **manifest_kwargs(locals()))
    manifest = build_manifest(raw, options)
    write_manifest(manifest, out)
    if rejects is not None:
        write_rejects(manifest.rejects, rejects)
    console.print(f"[bold]wrote {out}[/]: {len(manifest.table):,} images, {len(manifest.labels)} labels",
                  highlight=False, soft_wrap=True)
    _print_counts(manifest)
    _print_demographics(manifest)
    _print_rejects(manifest, rejects)
    found = manifest.meta.get("images_found")
    nih = manifest.meta["source"] == "nih"     # NIH without any image is a tables-only build: no note
    if found is not None and (0 < found or not nih) and found < len(manifest.table):
        where = "the others have the path images/<name>" if nih else "the shard build rejects the missing ones"
        console.print(f"[yellow]note:[/] only {found:,} of {len(manifest.table):,} images were found under {raw}; "
                      + where)
    if fetch_list is not None:
        console.print(f"fetch list: {fetch_list} ({len(manifest.table):,} paths)")


@manifest_app.command("info")
def info(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A manifest written by `cxr manifest build`.")],
) -> None:
    """Counts, patients, sex and age, and label prevalence per split of a manifest."""
    from manifests.table import SPLITS, read_manifest, split_summary

    manifest = read_manifest(file)
    meta = manifest.meta
    console.print(f"[bold]{file}[/]: source {meta.get('source')}, {len(manifest.table):,} images, "
                  f"{len(manifest.labels)} labels, tool {meta.get('version')}", highlight=False, soft_wrap=True)
    _print_counts(manifest)
    _print_demographics(manifest)
    summary = split_summary(manifest.table, manifest.labels)
    console.print("label prevalence: positives (share of usable labels)")
    prevalence = Table()
    prevalence.add_column("label")
    for split in SPLITS:
        prevalence.add_column(split, justify="right")
    for name in manifest.labels:
        prevalence.add_row(name, *(f"{summary[s]['positives'][name]:,} ({summary[s]['prevalence'][name]:.1%})"
                                   for s in SPLITS))
    console.print(prevalence)


def _print_counts(manifest: Manifest) -> None:
    from manifests.table import SPLITS, split_summary

    summary = split_summary(manifest.table, manifest.labels)
    table = Table()
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("patients", justify="right")
    for split in SPLITS:
        table.add_row(split, f"{summary[split]['count']:,}", f"{summary[split]['patients']:,}")
    console.print(table)


def _print_demographics(manifest: Manifest) -> None:
    """Sex counts and age summary per split, and where they come from (a manifest written before the
    columns existed, or a source without them, shows every image as missing)."""
    from manifests.table import SPLITS, demographics_summary

    summary = demographics_summary(manifest.table)
    read = manifest.meta.get("demographics") or {}
    columns = [c for c in (read.get("sex_column"), read.get("age_column")) if c]
    note = f"read from {', '.join(repr(c) for c in columns)}" if columns else "not recorded by this source"
    if not read:
        note = "not recorded (manifest written before sex and age were)"
    console.print(f"sex and age ({note})", highlight=False, soft_wrap=True)
    table = Table()
    for name in ("split", "F", "M", "sex missing", "age min-median-max", "age mean", "age missing"):
        table.add_column(name, justify="left" if name == "split" else "right")
    for split in SPLITS:
        sex, age = summary[split]["sex"], summary[split]["age"]
        span = "-" if age["known"] == 0 else f"{age['min']:.0f}-{age['median']:.0f}-{age['max']:.0f}"
        mean = "-" if age["known"] == 0 else f"{age['mean']:.1f}"
        table.add_row(split, f"{sex['F']:,}", f"{sex['M']:,}", f"{sex['missing']:,}", span, mean,
                      f"{age['missing']:,}")
    console.print(table)
    above = int(read.get("ages_above_max") or 0)
    if above:
        console.print(f"[yellow]note:[/] {above:,} ages above {read.get('max_age', 120):g} years in the table "
                      "were made missing", highlight=False)


def _print_rejects(manifest: Manifest, path: Path | None) -> None:
    from manifests.table import reject_counts

    counts = reject_counts(manifest.rejects)
    if not counts:
        console.print("rejects: none")
        return
    console.print(f"rejects: {len(manifest.rejects):,}" + (f" (written to {path})" if path else ""), highlight=False)
    table = Table()
    table.add_column("reason")
    table.add_column("images", justify="right")
    for reason, n in counts.items():
        table.add_row(reason, f"{n:,}")
    console.print(table)
