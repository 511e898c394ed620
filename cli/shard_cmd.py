"""`cxr shard build | verify | info`: write a shard set, check it, describe it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from cli.app import app, console
from cli.options import (
    FetchListOpt, LabelColsOpt, LabelOpt, LabelsOpt, NegativeOpt, PathColOpt, PathFormatOpt, PatientColOpt,
    PatientPatternOpt, RatiosOpt, RawOpt, SeedOpt, SourceOpt, SexColOpt, AgeColOpt, SplitColOpt, SplitOpt, StudyColOpt, TableOpt,
    MANIFEST_DEFAULTS, UncertainOpt, ValidFractionOpt, ViewColOpt, ViewsOpt, manifest_kwargs, manifest_options,
)
from manifests.errors import CxrError

if TYPE_CHECKING:  # pragma: no cover
    from cxrshards.build import BuildResult

shard_app = typer.Typer(help="Shard sets: decode the raw images once into WebDataset tars and HDF5.",
                        no_args_is_help=True)
app.add_typer(shard_app, name="shard")

# BuildConfig's defaults, written out so that importing this module (every `cxr` command, `cxr --help`)
# does not import the builder (pandas, OpenCV); tests/test_shard_cli.py checks they are the same.
DEFAULTS = {"size": 224, "format": "both", "codec": "png", "jpeg_quality": 95, "fit": "pad",
            "max_reject_fraction": 0.01}
RootOpt = Annotated[Optional[str], typer.Option("--root", metavar="ROOT", show_default=False,
                                                help="Where shard sets live [default: $CXR_SHARDS or ./shards].")]


@shard_app.command("build")
def build(
    source: SourceOpt = None,
    raw: RawOpt = None,
    manifest: Annotated[Optional[Path], typer.Option(
        "--manifest", metavar="FILE.parquet", show_default=False,
        help="Use this manifest (from `cxr manifest build`) instead of building one; its recorded manifest "
             "options apply, and --source/--raw default to the ones it records.")] = None,
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
    size: Annotated[int, typer.Option("--size", help="Output side in pixels (images are SIZE x SIZE).")] = DEFAULTS["size"],
    format: Annotated[str, typer.Option("--format", metavar="wds|hdf5|both",
                                        help="WebDataset tars, one HDF5 file per split, or both.")] = DEFAULTS["format"],
    codec: Annotated[str, typer.Option("--codec", metavar="png|jpeg|raw",
                                       help="How a tar sample stores its pixels (HDF5 holds the decoded pixels).")] = DEFAULTS["codec"],
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="Quality of --codec jpeg.")] = DEFAULTS["jpeg_quality"],
    fit: Annotated[str, typer.Option("--fit", metavar="pad|squash|crop",
                                     help="pad: keep the aspect ratio, pad with black; squash: stretch; "
                                          "crop: centre square.")] = DEFAULTS["fit"],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="ROOT", show_default=False,
                                                help="Root of shard sets [default: $CXR_SHARDS or ./shards].")] = None,
    name: Annotated[Optional[str], typer.Option("--name", show_default=False,
                                                help="Shard set folder under ROOT [default: SOURCE-SIZE].")] = None,
    shard_size: Annotated[Optional[int], typer.Option(
        "--shard-size", metavar="N", show_default=False,
        help="Samples per tar [default: 10,000, fewer if a tar would pass ~1 GB].")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", metavar="N", show_default=False,
                                                   help="Decoding processes [default: all cores].")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild everything, even shards a previous run finished.")] = False,
    verify_sources: Annotated[bool, typer.Option(
        "--verify-sources", help="Record each source image's sha256, and on resume reuse finished work only if its "
                                 "sources re-hash equal (size and mtime are always checked).")] = False,
    max_reject_fraction: Annotated[float, typer.Option(
        "--max-reject-fraction", help="Exit 1 (after writing everything) when more of the manifest's images "
                                      "than this are unreadable.")] = DEFAULTS["max_reject_fraction"],
    scheduler: Annotated[Optional[str], typer.Option(
        "--scheduler", metavar="tcp://HOST:PORT", show_default=False,
        help="Run the per-shard tasks on this Dask scheduler (--out must be reachable by every worker).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Decode, resize and encode every image of a manifest into ROOT/NAME (resumable, byte-reproducible)."""
    if scheduler is None and workers != 1:
        from cxrshards.pool import start_worker_server

        start_worker_server()   # the workers import their decoders while this process imports the builder
    from cxrshards.build import BuildConfig, RejectLimitError, build_shards

    given = manifest_kwargs(locals())
    if manifest is not None:
        changed = [f"--{k.replace('_', '-')}" for k, v in given.items() if v != MANIFEST_DEFAULTS[k]]
        if changed:
            raise CxrError(f"{', '.join(changed)} cannot be used with --manifest: the options it records apply")
        options = None
    elif source is None or raw is None:
        raise CxrError("give --source and --raw (or --manifest FILE.parquet)")
    else:
        options = manifest_options(source, seed=seed, **given)
    config = BuildConfig(source=source.lower() if source else None, raw=raw, manifest=manifest, size=size, fit=fit,
                         codec=codec, jpeg_quality=jpeg_quality, format=format, shard_size=shard_size, seed=seed,
                         out=out, name=name, workers=workers, scheduler=scheduler, force=force, verify_sources=verify_sources,
                         max_reject_fraction=max_reject_fraction, quiet=quiet)
    try:
        result = build_shards(config, options)
    except RejectLimitError as exc:
        _summary(exc.result)
        raise
    _summary(result)


@shard_app.command("verify")
def verify(
    shard_set: Annotated[str, typer.Argument(metavar="ROOT/NAME", help="Shard set folder (or NAME under --root).")],
    root: RootOpt = None,
) -> None:
    """Recompute every checksum and sample count against dataset.json and manifest.parquet; exit 1 on any problem."""
    from cxrshards.verify import verify_shards

    path = _resolve(shard_set, root)
    report = verify_shards(path)
    samples = ", ".join(f"{s} {n:,}" for s, n in report.samples.items())
    if report.ok:
        console.print(f"[bold green]ok[/] {path}: {report.files_checked} files checked ({samples})", highlight=False)
        return
    for problem in report.problems:
        console.print(f"[bold red]bad[/] {problem}", highlight=False, soft_wrap=True)
    raise CxrError(f"{path}: {len(report.problems)} problem(s) in {report.files_checked} files checked")


@shard_app.command("push")
def push(
    shard_set: Annotated[str, typer.Argument(metavar="NAME_OR_PATH", help="Shard set NAME (under --root) or folder.")],
    url: Annotated[str, typer.Argument(metavar="URL", help="Folder to upload into: s3://BUCKET/PATH, gs://..., or a "
                                                          "local path.")],
    root: RootOpt = None,
) -> None:
    """Verify a finished shard set and upload it to URL, its card (dataset.json) last."""
    from cxrshards.remote import push_shards

    path = _resolve(shard_set, root)
    names = push_shards(path, url, log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False))
    console.print(f"[bold green]pushed[/] {path} -> {url.rstrip('/')}/ ({len(names)} files, card last)",
                  highlight=False, soft_wrap=True)


@shard_app.command("pull")
def pull(
    url: Annotated[str, typer.Argument(metavar="URL", help="Shard set folder: http(s)://, s3://, gs://, ...")],
    root: RootOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", show_default=False,
                                                help="Folder under ROOT [default: the URL's last part].")] = None,
) -> None:
    """Download a shard set from URL into ROOT/NAME (resumable: files already there are kept), then verify it."""
    from cxrshards.paths import shards_root
    from cxrshards.remote import check_name, pull_shards

    name = check_name(name or url.rstrip("/").rsplit("/", 1)[-1], url)
    dest = shards_root(root) / name
    report = pull_shards(url, dest, log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False))
    samples = ", ".join(f"{s} {n:,}" for s, n in report.samples.items())
    console.print(f"[bold green]pulled[/] {url} -> {dest}: {report.files_checked} files verified ({samples})",
                  highlight=False, soft_wrap=True)


@shard_app.command("show")
def show(
    shard_set: Annotated[str, typer.Argument(metavar="NAME_OR_PATH", help="Shard set NAME (under --root) or folder.")],
    out: Annotated[Path, typer.Option("--out", metavar="SHEET.png", help="The contact sheet to write (PNG).")],
    split: Annotated[str, typer.Option("--split", help="Which split to draw from.")] = "train",
    label: Annotated[Optional[str], typer.Option("--label", metavar="L", show_default=False,
                                                 help="Only samples positive for this label.")] = None,
    n: Annotated[int, typer.Option("--n", help="How many samples (the first in shard order).")] = 36,
    root: RootOpt = None,
) -> None:
    """Draw a contact sheet of a shard set's samples, each titled with its key and positive labels."""
    from cxrshards.sheet import contact_sheet

    path = contact_sheet(shard_set, out, split=split, label=label, n=n, root=root)
    console.print(f"[bold]wrote {path}[/]", highlight=False, soft_wrap=True)


@shard_app.command("info")
def info(
    shard_set: Annotated[str, typer.Argument(metavar="NAME_OR_PATH", help="Shard set NAME (under --root) or folder.")],
    root: RootOpt = None,
) -> None:
    """Print a shard set's card (dataset.json) as tables."""
    from cxrshards.card import read_json

    path = _resolve(shard_set, root)
    card = read_json(path / "dataset.json")
    head = Table(title=f"{card.get('name')} ({path})", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    mean, std = card.get("pixel_mean"), card.get("pixel_std")
    for key, value in (("source", card.get("source")), ("size", f"{card.get('size')} x {card.get('size')}"),
                       ("codec", card.get("codec") + (f" (quality {card.get('jpeg_quality')})" if card.get("codec") == "jpeg" else "")),
                       ("fit", card.get("fit")), ("formats", ", ".join(card.get("formats", []))),
                       ("labels", f"{len(card.get('labels', []))}: {', '.join(card.get('labels', []))}"),
                       ("train pixel mean / std", "-" if mean is None else f"{mean:.4f} / {std:.4f}"),
                       ("rejects", f"{card.get('rejects', 0):,} (unreadable images: {card.get('pixel_rejects', 0):,})"),
                       ("tool version", card.get("tool_version"))):
        head.add_row(key, str(value))
    console.print(head)

    splits = card.get("splits", {})
    counts = Table(title="splits")
    for column in ("split", "images", "patients"):
        counts.add_column(column, justify="left" if column == "split" else "right")
    for split, s in splits.items():
        counts.add_row(split, f"{s.get('count', 0):,}", f"{s.get('patients', 0):,}")
    console.print(counts)

    prevalence = Table(title="label positives (prevalence among usable labels)")
    prevalence.add_column("label")
    for split in splits:
        prevalence.add_column(split, justify="right")
    for label in card.get("labels", []):
        prevalence.add_row(label, *(f"{splits[s].get('positives', {}).get(label, 0):,} "
                                    f"({splits[s].get('prevalence', {}).get(label, 0.0):.1%})" for s in splits))
    console.print(prevalence)

    files = Table(title="files")
    for column in ("file", "split", "samples", "MiB", "sha256"):
        files.add_column(column, justify="right" if column in ("samples", "MiB") else "left")
    for entry in card.get("files", []):
        file = path / entry["file"]
        mib = f"{file.stat().st_size / 2**20:,.1f}" if file.is_file() else "missing"
        files.add_row(entry["file"], entry["split"], f"{entry['count']:,}", mib, entry["sha256"][:16])
    console.print(files)

    build_options = Table(title="build options")
    build_options.add_column("option")
    build_options.add_column("value")
    for group, values in card.get("build", {}).items():
        for key, value in (values or {}).items():
            build_options.add_row(f"{group}: {key}", str(value))
    console.print(build_options)


def _resolve(shard_set: str, root: str | None) -> Path:
    from cxrshards.reader import resolve_shard_dir

    return resolve_shard_dir(shard_set, root)


def _summary(result: BuildResult) -> None:
    card = result.card
    console.print(f"[bold]wrote {result.path}[/]: {card['source']} {card['size']}px {card['codec']} "
                  f"({', '.join(card['formats'])}), {result.shards_built} shard(s) built, "
                  f"{result.shards_reused} reused; {result.images:,} images in {result.seconds:.1f} s "
                  f"({result.images_per_second:,.1f} images/s)", highlight=False)
    table = Table()
    for column in ("split", "images", "patients", "files"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split, s in card["splits"].items():
        n_files = sum(1 for f in card["files"] if f["split"] == split)
        table.add_row(split, f"{s['count']:,}", f"{s['patients']:,}", str(n_files))
    console.print(table)
    if result.rejects:
        reasons = ", ".join(f"{reason}: {n:,}" for reason, n in result.rejects.items())
        console.print(f"[yellow]rejected {sum(result.rejects.values()):,} unreadable image(s)[/] ({reasons}; "
                      f"{result.reject_fraction:.2%}), listed in {result.path / 'rejects.parquet'}", highlight=False)
    console.print(f"pixel mean / std (train): {card['pixel_mean'] if card['pixel_mean'] is None else round(card['pixel_mean'], 4)}"
                  f" / {card['pixel_std'] if card['pixel_std'] is None else round(card['pixel_std'], 4)}", highlight=False)
