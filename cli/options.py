"""The manifest options, declared once for every command that builds a manifest.

`cxr manifest build` and `cxr shard build` take the very same options. Declare the parameters with
these aliases and turn them into the frozen `ManifestOptions` with `manifest_options(...)`:

    from cli.options import (FetchListOpt, LabelOpt, LabelsOpt, PatientPatternOpt, RatiosOpt, RawOpt,
                             SeedOpt, SourceOpt, SplitOpt, UncertainOpt, ValidFractionOpt, ViewsOpt,
                             manifest_options)

    @shard_app.command("build")
    def build(source: SourceOpt, raw: RawOpt, seed: SeedOpt = 0, views: ViewsOpt = "",
              valid_fraction: ValidFractionOpt = 0.1, labels: LabelsOpt = "negbio",
              uncertain: UncertainOpt = "zeros", split: SplitOpt = "auto", fetch_list: FetchListOpt = None,
              label: LabelOpt = None, ratios: RatiosOpt = "7:1:2",
              patient_pattern: PatientPatternOpt = None, ...):
        options = manifest_options(source, seed=seed, views=views, valid_fraction=valid_fraction,
                                   labels=labels, uncertain=uncertain, split=split, fetch_list=fetch_list,
                                   label=label, ratios=ratios, patient_pattern=patient_pattern)

Choices are checked by `ManifestOptions` (a one-line `ManifestError`, exit 1) and listed in the help.
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from manifests.errors import ManifestError
from manifests.options import LABEL_SETS, SPLIT_MODES, UNCERTAIN_POLICIES, ManifestOptions
from manifests.vocab import SOURCES

SourceOpt = Annotated[str, typer.Option(
    "--source", metavar="|".join(SOURCES), show_default=False,
    help="Dataset kind: nih (ChestX-ray14), mimic (MIMIC-CXR-JPG), chexpert (CheXpert-v1.0[-small]), table "
         "(any CSV/Parquet of labels, see --table), cardiomegaly (folder set labelled Cardiomegaly) or folder "
         "(class folders: RAW/normal, RAW/PNEUMONIA, ...).")]
RawOpt = Annotated[Path, typer.Option(
    "--raw", metavar="DIR", show_default=False,
    help="Raw root: the folder holding the source's tables (NIH, MIMIC; CheXpert: the CheXpert-v1.0[-small] "
         "folder or its parent) or class folders (folder sets). "
         "Paths in the manifest are relative to it.")]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Seed of every random patient-level split (same seed, same split).")]
ViewsOpt = Annotated[str, typer.Option(
    "--views", metavar="PA,AP",
    help="NIH: keep only these View Position values; CheXpert: these AP/PA values (frontal images only); "
         "comma-separated (default: all views).")]
ValidFractionOpt = Annotated[float, typer.Option(
    "--valid-fraction",
    help="Fraction of patients for valid: of the train_val list (NIH official lists), of the non-test "
         "subjects (MIMIC --split study-digit) or of train.csv's patients (CheXpert without test.csv).")]
LabelsOpt = Annotated[str, typer.Option(
    "--labels", metavar="|".join(LABEL_SETS),
    help="MIMIC: label table, mimic-cxr-2.0.0-negbio or -chexpert.")]
UncertainOpt = Annotated[str, typer.Option(
    "--uncertain", metavar="|".join(UNCERTAIN_POLICIES),
    help="MIMIC, CheXpert, table: uncertain (-1) labels become 0 (zeros), 1 (ones) or NaN, not used "
         "(ignore); blank is always 0.")]
SplitOpt = Annotated[str, typer.Option(
    "--split", metavar="|".join(SPLIT_MODES),
    help="auto: the official split (NIH lists, MIMIC split file, pre-split folders) when present, else "
         "random; official: require it; random: seeded patient split by --ratios; study-digit (MIMIC): "
         "study_id ending in 8 or 9 is test, the rest split train/valid by --valid-fraction.")]
FetchListOpt = Annotated[Optional[Path], typer.Option(
    "--fetch-list", metavar="FILE", show_default=False,
    help="Also write the selected images' paths relative to the raw root, one per line (e.g. to "
         "download only those MIMIC images).")]
LabelOpt = Annotated[Optional[str], typer.Option(
    "--label", metavar="NAME", show_default=False,
    help="folder: name of the label of the one positive class folder [default: the folder's name; "
         "abnormal/: Cardiomegaly]. An error with several positive class folders.")]
RatiosOpt = Annotated[str, typer.Option(
    "--ratios", metavar="TRAIN:VALID:TEST",
    help="Proportions of patients in a random split (folder sets stratified by class; NIH without "
         "official lists; MIMIC without split file).")]
PatientPatternOpt = Annotated[Optional[str], typer.Option(
    "--patient-pattern", metavar="REGEX", show_default=False,
    help="folder: regex whose first group, searched in each file's path below its class folder, is the "
         "patient id, so a patient's files never straddle splits, e.g. 'person(\\d+)_'. Unmatched files "
         "are their own patient; without a pattern a DICOM's patient is its PatientID and every other file is "
         "its own patient.")]
NegativeOpt = Annotated[str, typer.Option(
    "--negative", metavar="NAME",
    help="folder: the all-zero class folder (any case); every other class folder becomes one label named "
         "after it.")]
TableOpt = Annotated[Optional[Path], typer.Option(
    "--table", metavar="FILE.csv|.parquet", show_default=False,
    help="table: the label table (CSV, CSV.gz or Parquet), one or more rows per image.")]
PathColOpt = Annotated[Optional[str], typer.Option(
    "--path-col", metavar="COL", show_default=False,
    help="table: column holding each image's path relative to --raw (or an id, with --path-format).")]
PatientColOpt = Annotated[Optional[str], typer.Option(
    "--patient-col", metavar="COL", show_default=False, help="table: column holding the patient id.")]
LabelColsOpt = Annotated[str, typer.Option(
    "--label-cols", metavar="A,B,C", help="table: the label columns, comma-separated, in this order.")]
StudyColOpt = Annotated[Optional[str], typer.Option(
    "--study-col", metavar="COL", show_default=False, help="table: column holding the study id.")]
ViewColOpt = Annotated[Optional[str], typer.Option(
    "--view-col", metavar="COL", show_default=False, help="table: column holding the view (AP, PA, ...).")]
SplitColOpt = Annotated[Optional[str], typer.Option(
    "--split-col", metavar="COL", show_default=False,
    help="table: column holding train/valid/test (val, validate accepted; any case). Default: a seeded, "
         "stratified patient split by --ratios.")]
PathFormatOpt = Annotated[Optional[str], typer.Option(
    "--path-format", metavar="'images/{}.dcm'", show_default=False,
    help="table: turns the --path-col value into a path relative to --raw ({} is the value).")]
SexColOpt = Annotated[Optional[str], typer.Option(
    "--sex-col", metavar="COL", show_default=False,
    help="table: column holding the sex: F, M, Female, Male (any case); blank, Unknown, U, O, Other are "
         "missing; anything else is an error.")]
AgeColOpt = Annotated[Optional[str], typer.Option(
    "--age-col", metavar="COL", show_default=False,
    help="table: column holding the age in years (or a DICOM age: 045Y, 006M, 010W, 003D); blank or Unknown "
         "is missing, above 120 is made missing and counted, anything else is an error.")]
RejectsOpt = Annotated[Optional[Path], typer.Option(
    "--rejects", metavar="FILE", show_default=False,
    help="Also write every image left out (key, path, reason) to this Parquet file.")]


def manifest_options(
    source: str,
    *,
    seed: int = 0,
    views: str = "",
    valid_fraction: float = 0.1,
    labels: str = "negbio",
    uncertain: str = "zeros",
    split: str = "auto",
    fetch_list: Path | str | None = None,
    label: str | None = None,
    ratios: str = "7:1:2",
    patient_pattern: str | None = None,
    negative: str = "normal",
    table: Path | str | None = None,
    path_col: str | None = None,
    patient_col: str | None = None,
    label_cols: str = "",
    study_col: str | None = None,
    view_col: str | None = None,
    split_col: str | None = None,
    path_format: str | None = None,
    sex_col: str | None = None,
    age_col: str | None = None,
) -> ManifestOptions:
    """The frozen `ManifestOptions` from the CLI's raw option values (ManifestError on a bad value)."""
    return ManifestOptions(
        source=source.lower(),
        seed=seed,
        views=parse_views(views),
        valid_fraction=valid_fraction,
        labels=labels.lower(),
        uncertain=uncertain.lower(),
        split=split.lower(),
        fetch_list=str(fetch_list) if fetch_list is not None else None,
        label=label,
        ratios=parse_ratios(ratios),
        patient_pattern=patient_pattern,
        negative=negative,
        table=str(table) if table is not None else None,
        path_col=path_col,
        patient_col=patient_col,
        label_cols=parse_label_cols(label_cols),
        study_col=study_col,
        view_col=view_col,
        split_col=split_col,
        path_format=path_format,
        sex_col=sex_col,
        age_col=age_col,
    )


def parse_views(text: str) -> tuple[str, ...]:
    """'PA,AP' -> ('PA', 'AP'); '' -> () (all views). Also splits --label-cols."""
    return tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))


def parse_label_cols(text: str) -> tuple[str, ...]:
    """'A,B' -> ('A', 'B'); a column named twice is an error (it would silently become one label)."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise ManifestError(f"--label-cols names {', '.join(repr(c) for c in twice)} twice")
    return tuple(names)


def parse_ratios(text: str) -> tuple[float, float, float]:
    """'7:1:2' -> (0.7, 0.1, 0.2): three non-negative numbers, scaled to sum to 1."""
    parts = text.replace(",", ":").split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ManifestError(f"--ratios {text!r} must be three non-negative numbers TRAIN:VALID:TEST, e.g. 7:1:2")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


# Every option `manifest_options` takes besides source and seed, with its CLI default: the commands pass
# their parameters through `manifest_kwargs` instead of listing each one again.
MANIFEST_DEFAULTS: dict = {name: p.default for name, p in inspect.signature(manifest_options).parameters.items()
                           if p.kind is p.KEYWORD_ONLY and name != "seed"}


def manifest_kwargs(values: dict) -> dict:
    """The manifest options among a command's parameters (e.g. its `locals()`)."""
    return {name: values[name] for name in MANIFEST_DEFAULTS}
