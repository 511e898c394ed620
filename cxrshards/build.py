"""`build_shards`: a manifest in, a shard set `ROOT/NAME/` out (DESIGN.md section 2).

The plan is fixed before any pixel is read: per split, rows sorted by key, permuted by
`default_rng([seed, 0x5EED])`, cut into shards of `shard_size`. Shards are cut into pieces (runs of
consecutive samples) that worker processes, or Dask workers, encode independently
(`cxrshards.tasks.run_piece`); the parent joins the pieces of a shard into its tar byte for byte
(`cxrshards.writers`), then writes `SPLIT.h5`, the manifest, the rejects, `build.json` and last the card
`dataset.json`. A rejected image is absent from its shard; it never moves another sample.

Resume: each finished piece leaves a record in `.work/`, each finished shard one in `.progress/`, both
written after their files and naming their sha256. A re-run with the same options reuses every shard and
piece whose record and checksums still match, and whose sources are unchanged (size and mtime as
recorded; with --verify-sources also their sha256, re-hashed), and rebuilds the rest; the result is
byte-identical to a clean build of the sources as they are now. A successful build removes `.work/` and
`.progress/`.

One build per folder: the whole build holds `ROOT/NAME` (`manifests.lock.folder_lock`); a second build into
it fails at once naming the holder, and touches nothing there.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from cxrshards.card import (BUILD_NAME, CARD_NAME, MANIFEST_NAME, REJECTS_NAME, make_card, write_json,
                            write_located_manifest)
from cxrshards.paths import shards_root
from cxrshards.pool import mp_context, start_worker_server
from cxrshards.choices import CODECS, FITS
from cxrshards.sheet import README_NAME, render_readme
from cxrshards.tasks import PieceTask, file_sha256, run_piece, shard_fingerprint, source_stamp
from cxrshards.writers import copy_into, sample_json, sha256_file, tar_end, write_h5
from manifests import __version__
from manifests.atomic import atomic_path, write_bytes_atomic
from manifests.build import build_manifest
from manifests.errors import CxrError, ManifestError
from manifests.lock import LOCK_NAME, folder_lock
from manifests.options import ManifestOptions
from manifests.vocab import SOURCES
from manifests.table import (SPLITS, Manifest, audit_leakage, concat_rejects, conform, make_rejects, read_manifest,
                             reject_counts, write_rejects)

FORMATS = ("wds", "hdf5", "both")
ORDER_STREAM = 0x5EED           # salts the sample-order RNG: default_rng([seed, 0x5EED])
MAX_SHARD_SAMPLES = 10_000
MAX_SHARD_BYTES = 1 << 30        # ~1 GB per tar
MAX_PIECE = 256                  # samples per work unit at most (a piece never spans two shards)
PIECES_PER_SLOT = 8              # pieces per worker slot over a whole build: the last ones are small
WORK_DIR, PROGRESS_DIR = ".work", ".progress"
OPTIONS_RECORD = "options.json"
SHARD_FILE = re.compile(r"^(train|valid|test)-\d{6}\.tar$")
H5_FILE = re.compile(r"^(train|valid|test)\.h5$")
DASK_CONNECT_TIMEOUT = "20s"
_EST_BYTES = {"png": 0.6, "jpeg": 0.3, "raw": 1.0}   # rough bytes per pixel of one encoded sample


class RejectLimitError(CxrError):
    """More images were rejected than `max_reject_fraction` allows. Everything else was written."""

    def __init__(self, message: str, result: "BuildResult") -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class BuildConfig:
    """Every option of `cxr shard build` besides the manifest options. Saved as `build.json`."""

    # what to read
    source: str | None = None            # one of manifests.vocab.SOURCES; None: the manifest's
    raw: Path | None = None              # raw root; None: the one recorded in --manifest
    manifest: Path | None = None         # a manifest.parquet to use instead of building one from raw
    # pixels
    size: int = 224                      # output side, pixels
    fit: str = "pad"                     # pad | squash | crop
    codec: str = "png"                   # png | jpeg | raw (.npy)
    jpeg_quality: int = 95
    # layout
    format: str = "both"                 # wds | hdf5 | both
    shard_size: int | None = None        # samples per tar; None: 10,000 or ~1 GB, whichever is fewer
    seed: int = 0                        # sample order within splits
    # where
    out: Path | None = None              # ROOT; None: $CXR_SHARDS or ./shards
    name: str | None = None              # NAME; None: SOURCE-SIZE
    # how (never changes the output bytes)
    workers: int | None = None           # processes; None: all cores; 1: inline
    scheduler: str | None = None         # tcp://HOST:PORT of a Dask scheduler instead of local processes
    force: bool = False                  # rebuild everything, even shards that could be reused
    verify_sources: bool = False         # record sources' sha256; reuse only pieces whose sources re-hash equal
    max_reject_fraction: float = 0.01    # pixel rejects / manifest rows above this: exit non-zero
    quiet: bool = False                  # no progress bar

    def __post_init__(self) -> None:
        _choice("--fit", self.fit, FITS)
        _choice("--codec", self.codec, CODECS)
        _choice("--format", self.format, FORMATS)
        if not 8 <= int(self.size) <= 4096:
            raise CxrError(f"--size must be between 8 and 4096 pixels, got {self.size}")
        if not 1 <= int(self.jpeg_quality) <= 100:
            raise CxrError(f"--jpeg-quality must be 1..100, got {self.jpeg_quality}")
        if self.shard_size is not None and int(self.shard_size) < 1:
            raise CxrError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.workers is not None and int(self.workers) < 1:
            raise CxrError(f"--workers must be at least 1, got {self.workers}")
        if not 0.0 <= float(self.max_reject_fraction) <= 1.0:
            raise CxrError(f"--max-reject-fraction must be in [0, 1], got {self.max_reject_fraction}")
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise CxrError(f"--name must be a plain folder name, got {self.name!r}")
        if self.scheduler is not None and "://" not in self.scheduler:
            raise CxrError(f"--scheduler must be an address such as tcp://HOST:8786, got {self.scheduler!r}")
        if self.raw is None and self.manifest is None:
            raise CxrError("give --raw (the raw image root) or --manifest (a manifest.parquet)")
        if self.source is None and self.manifest is None:
            raise CxrError(f"give --source ({', '.join(SOURCES)}) or --manifest")

    @property
    def formats(self) -> tuple[str, ...]:
        return ("wds", "hdf5") if self.format == "both" else (self.format,)

    def resolved(self, source: str | None = None, raw: Path | None = None) -> "BuildConfig":
        """Defaults filled in: source/raw (from the manifest when given), out, name, shard_size, workers."""
        source = self.source or source
        raw = Path(self.raw if self.raw is not None else raw).resolve()
        return replace(
            self, source=source, raw=raw,
            manifest=None if self.manifest is None else Path(self.manifest).resolve(),
            out=Path(self.out if self.out is not None else shards_root()).resolve(),
            name=self.name or f"{source}-{self.size}",
            shard_size=int(self.shard_size or default_shard_size(self.size, self.codec)),
            workers=int(self.workers or os.cpu_count() or 1),
        )

    def shard_options(self) -> dict:
        """The options that shape the output bytes (recorded in the card, compared on resume)."""
        return {"size": int(self.size), "fit": self.fit, "codec": self.codec, "jpeg_quality": int(self.jpeg_quality),
                "format": self.format, "shard_size": self.shard_size, "seed": int(self.seed)}

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote and how it went."""

    path: Path                       # ROOT/NAME
    card: dict                       # the dataset.json written
    rejects: dict[str, int]          # pixel rejects by reason
    reject_fraction: float           # pixel rejects / manifest rows
    shards_built: int
    shards_reused: int
    images: int                      # images decoded by this run (reused shards excluded)
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Shard:
    """One planned shard: its file stem, split, and (key, path, json) items in tar order."""

    stem: str
    split: str
    items: list[tuple[str, str, bytes]]
    shard_id: str = ""
    record: dict | None = None                         # set when whole (built or reused)
    pieces: dict[int, dict] = field(default_factory=dict)   # start -> piece record
    starts: list[int] = field(default_factory=list)


def default_shard_size(size: int, codec: str) -> int:
    """10,000 samples, or fewer when that would pass ~1 GB per tar (an estimate from size and codec)."""
    per_sample = size * size * _EST_BYTES[codec] + 2048
    return max(1, min(MAX_SHARD_SAMPLES, int(MAX_SHARD_BYTES // per_sample)))


def sample_order(keys: Iterable[str], seed: int) -> list[str]:
    """Keys of one split in shard order: sorted, then permuted by default_rng([seed, 0x5EED])."""
    ordered = sorted(keys)
    perm = np.random.default_rng([int(seed), ORDER_STREAM]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def build_shards(config: BuildConfig, manifest_options: ManifestOptions | None = None) -> BuildResult:
    """Build (or resume) the shard set described by `config`. One call does everything.

    `manifest_options` select the images when `config.manifest` is None (default: ManifestOptions(source,
    seed)); with a manifest file its recorded options apply. Raises CxrError for user mistakes, and RejectLimitError (after writing every file) when the pixel
    rejects exceed `config.max_reject_fraction`.
    """
    started = time.perf_counter()
    if config.scheduler is None and (config.workers is None or int(config.workers) > 1):
        start_worker_server()   # the workers' process server imports its decoders while the manifest loads
    manifest, manifest_options = _load_manifest(config, manifest_options)
    config = config.resolved(source=manifest.meta.get("source"), raw=manifest.meta.get("raw"))
    out_dir = config.out / config.name
    with folder_lock(out_dir, "shard build", hint="wait for it to finish, or pass another --name or --out"):
        return _build_locked(config, manifest, manifest_options, out_dir, started)


def _build_locked(config: BuildConfig, manifest: Manifest, manifest_options: dict, out_dir: Path,
                  started: float) -> BuildResult:
    """The build proper, run while this process holds `out_dir` (`manifests.lock.folder_lock`)."""
    labels = list(manifest.labels)
    table = conform(manifest.table, labels)
    shard_options = config.shard_options()
    _prepare_dir(out_dir, config.force, {"manifest options": manifest_options, "shard options": shard_options})

    shards = _plan(table, labels, config)
    work, progress_dir = out_dir / WORK_DIR, out_dir / PROGRESS_DIR
    client = _dask_client(config.scheduler) if config.scheduler else None
    try:
        slots = sum(client.nthreads().values()) if client is not None else config.workers
        tasks = _pieces(shards, config, work, slots)
        reused = _reuse(shards, tasks, config, work, progress_dir)
        by_stem = {s.stem: s for s in shards}
        pending = [t for t in tasks if t.start not in by_stem[t.shard].pieces]

        def done(record: dict) -> None:
            shard = by_stem[record["shard"]]
            shard.pieces[record["start"]] = record
            if len(shard.pieces) == len(shard.starts):
                _assemble(shard, config, out_dir, work, progress_dir)

        for shard in shards:   # every piece reused but not yet joined
            if shard.record is None and len(shard.pieces) == len(shard.starts):
                _assemble(shard, config, out_dir, work, progress_dir)
        images = sum(len(t.items) for t in pending)
        _execute(pending, config, client, done, images)
    finally:
        if client is not None:
            client.close()

    result = _finish(out_dir, config, manifest, manifest_options, table, labels, shards, work,
                     built=len(shards) - reused, reused=reused, images=images, started=started)
    if result.reject_fraction > config.max_reject_fraction:
        n = sum(result.rejects.values())
        reasons = ", ".join(f"{r}: {c}" for r, c in result.rejects.items())
        raise RejectLimitError(
            f"{n} of {len(table)} images rejected ({result.reject_fraction:.2%} > --max-reject-fraction "
            f"{config.max_reject_fraction:.2%}; {reasons}); the shard set was written anyway, "
            f"see {out_dir / REJECTS_NAME}", result)
    return result


# --- manifest and output folder ---------------------------------------------------------------------


def _load_manifest(config: BuildConfig, options: ManifestOptions | None) -> tuple[Manifest, dict]:
    if config.manifest is not None:
        manifest = read_manifest(config.manifest)
        try:   # refused before any pixel is read (the shard set's manifest.parquet is audited again when written)
            audit_leakage(manifest.table)
        except ManifestError as exc:
            raise ManifestError(f"{config.manifest}: {exc}") from None
        opts = manifest.meta.get("options") or {}
        if config.source and manifest.meta.get("source") not in (None, config.source):
            raise CxrError(f"{config.manifest} is a {manifest.meta.get('source')} manifest, not --source {config.source}")
        if config.raw is None and not manifest.meta.get("raw"):
            raise CxrError(f"{config.manifest} records no raw root: give --raw")
        return manifest, json.loads(json.dumps(opts))
    options = options or ManifestOptions(source=config.source, seed=config.seed)
    if options.source != config.source:
        raise CxrError(f"manifest options are for source {options.source}, the build for {config.source}")
    manifest = build_manifest(config.raw, options)
    return manifest, options.to_dict()


def _prepare_dir(out_dir: Path, force: bool, options: dict) -> None:
    """Refuse a folder built with other options (unless force); clear stale temporaries; record options."""
    progress = out_dir / PROGRESS_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise CxrError(f"{out_dir} exists and is not a folder")
    if force:
        _remove_outputs(out_dir)
    elif out_dir.is_dir() and any(e.name not in (WORK_DIR, PROGRESS_DIR, LOCK_NAME) and not e.name.endswith(".tmp")
                                  for e in out_dir.iterdir()):
        previous = _read_record(progress / OPTIONS_RECORD)
        if previous is None:
            previous = (_read_record(out_dir / CARD_NAME) or {}).get("build")
        if previous is None:
            raise CxrError(f"{out_dir} exists and is not a cxr shard set (no {CARD_NAME}); "
                           "choose another --name or --out, or --force")
        diffs = _option_diffs(previous, options)
        if diffs:
            raise CxrError(f"{out_dir} was built with other options ({'; '.join(diffs)}); "
                           "use --force to rebuild it, or another --name")
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in (out_dir, out_dir / WORK_DIR, progress):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):   # left by a killed writer (atomic_path)
                tmp.unlink(missing_ok=True)
    progress.mkdir(exist_ok=True)
    write_json(progress / OPTIONS_RECORD, options)
    (out_dir / CARD_NAME).unlink(missing_ok=True)   # written last: its presence means "complete"


def _option_diffs(previous: dict, now: dict) -> list[str]:
    diffs = []
    for group in ("shard options", "manifest options"):
        old, new = previous.get(group) or {}, now.get(group) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                flag = "--" + key.replace("_", "-")
                diffs.append(f"{flag}: was {old.get(key)!r}, now {new.get(key)!r}")
    return diffs


def _remove_outputs(out_dir: Path) -> None:
    """Delete what a build writes (and only that) from out_dir."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        if entry.name in (WORK_DIR, PROGRESS_DIR) and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.is_file() and (SHARD_FILE.match(entry.name) or H5_FILE.match(entry.name) or entry.name in (
                CARD_NAME, MANIFEST_NAME, REJECTS_NAME, BUILD_NAME) or entry.name.endswith(".tmp")):
            entry.unlink()


# --- planning ---------------------------------------------------------------------------------------


def _plan(table: pd.DataFrame, labels: list[str], config: BuildConfig) -> list[_Shard]:
    """Every shard of every split with its items, decided from the manifest alone."""
    pixel_options = {"size": config.size, "fit": config.fit, "codec": config.codec,
                     "jpeg_quality": config.jpeg_quality, "formats": list(config.formats), "raw": str(config.raw),
                     "version": __version__}
    keys_all = table["key"].to_numpy(dtype=object)
    paths = table["path"].astype("str").to_numpy(dtype=object)
    patients = table["patient_id"].astype("str").to_numpy(dtype=object)
    splits = table["split"].to_numpy(dtype=object)
    label_values = table[labels].to_numpy(dtype=np.float32)
    position = {k: i for i, k in enumerate(keys_all)}
    shards: list[_Shard] = []
    for split in SPLITS:
        keys = sample_order(keys_all[splits == split], config.seed)
        for number, lo in enumerate(range(0, len(keys), config.shard_size)):
            items = []
            for key in keys[lo:lo + config.shard_size]:
                i = position[key]
                values = {name: (None if np.isnan(v) else float(v)) for name, v in zip(labels, label_values[i])}
                items.append((key, paths[i], sample_json(key, values, split, patients[i])))
            shard = _Shard(stem=f"{split}-{number:06d}", split=split, items=items)
            shard.shard_id = shard_fingerprint({**pixel_options, "shard": shard.stem}, items)
            shards.append(shard)
    return shards


def _pieces(shards: list[_Shard], config: BuildConfig, work: Path, slots: int) -> list[PieceTask]:
    """Cut shards into pieces that keep every worker slot busy to the end, largest first.

    The piece size comes from the whole build's size and the slots: about PIECES_PER_SLOT pieces per slot,
    at most MAX_PIECE samples. Each shard is cut into near-equal pieces of at most that size (a small split's
    shard is not left as one long piece beside a tiny one), and the tasks are returned largest first (ties in
    shard order), so the smallest pieces fill the last gaps. Piece boundaries never change the output bytes:
    a shard's tar and pixels are its pieces' members concatenated in sample order.
    """
    total = sum(len(s.items) for s in shards)
    piece = max(1, min(MAX_PIECE, math.ceil(total / max(1, PIECES_PER_SLOT * slots))))
    tasks = []
    for shard in shards:
        n = len(shard.items)
        count = max(1, math.ceil(n / piece))
        base, extra = divmod(n, count)
        lengths = [base + (1 if i < extra else 0) for i in range(count)]
        shard.starts = [0, *itertools.accumulate(lengths[:-1])]
        for start, length in zip(shard.starts, lengths):
            tasks.append(PieceTask(
                shard=shard.stem, start=start, items=tuple(shard.items[start:start + length]), raw=str(config.raw),
                size=config.size, fit=config.fit, codec=config.codec, jpeg_quality=config.jpeg_quality,
                wds="wds" in config.formats, hdf5="hdf5" in config.formats, work=str(work), shard_id=shard.shard_id,
                hash_sources=config.verify_sources))
    return sorted(tasks, key=lambda t: -len(t.items))   # stable: equal sizes stay in shard order


# --- resume -------------------------------------------------------------------------------------------


def _reuse(shards: list[_Shard], tasks: list[PieceTask], config: BuildConfig, work: Path, progress: Path) -> int:
    """Mark shards and pieces whose records, checksums and sources match; returns the number of shards reused."""
    reused = 0
    fresh = _fresh_sources(config)
    for shard in shards:
        record = _read_record(progress / f"{shard.stem}.json")
        if (record and record.get("id") == shard.shard_id and fresh(record, shard.items)
                and _files_match(shard, record, config, work)):
            shard.record = record
            shard.pieces = {start: {} for start in shard.starts}
            reused += 1
    by_stem = {s.stem: s for s in shards}
    for task in tasks:
        shard = by_stem[task.shard]
        if shard.record is not None:
            continue
        paths = task.paths()
        record = _read_record(paths["record"])
        if not record or record.get("task") != task.task_id or not fresh(record, task.items):
            continue
        if task.wds and (not paths["tarpart"].is_file() or sha256_file(paths["tarpart"]) != record["tarpart_sha256"]):
            continue
        if task.hdf5 and (not paths["u8"].is_file() or sha256_file(paths["u8"]) != record["u8_sha256"]):
            continue
        shard.pieces[task.start] = record
    return reused


def _fresh_sources(config: BuildConfig) -> Callable[[dict, Iterable], bool]:
    """`fresh(record, items)`: were the record's files made from the items' sources as they are now?

    Always: every source's size and mtime (ns) equal the recorded ones (a source missing then must be missing
    now). With --verify-sources: also its sha256, re-hashed now, equals the recorded one; a record made
    without hashes is never trusted then. Files are hashed at most once per run (threads: hashlib releases
    the GIL)."""
    raw = Path(config.raw)
    hashes: dict[str, str | None] = {}

    def fresh(record: dict, items) -> bool:
        sources = record.get("sources")
        if not isinstance(sources, list) or [s[0] for s in sources] != [rel for _, rel, _ in items]:
            return False
        for rel, size, mtime_ns, _ in sources:
            if source_stamp(raw / rel, False)[:2] != [size, mtime_ns]:
                return False
        if not config.verify_sources:
            return True
        todo = [rel for rel, size, _, _ in sources if size is not None and rel not in hashes]
        with cf.ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
            hashes.update(zip(todo, pool.map(lambda rel: file_sha256(raw / rel), todo)))
        return all(size is None or (sha is not None and hashes[rel] == sha) for rel, size, _, sha in sources)

    return fresh


def _files_match(shard: _Shard, record: dict, config: BuildConfig, work: Path) -> bool:
    out_dir = work.parent
    if "wds" in config.formats:
        tar = out_dir / f"{shard.stem}.tar"
        if not tar.is_file() or sha256_file(tar) != record.get("tar_sha256"):
            return False
    if "hdf5" in config.formats:
        u8 = work / f"{shard.stem}.u8"
        if not u8.is_file() or sha256_file(u8) != record.get("u8_sha256"):
            return False
    return True


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- running ------------------------------------------------------------------------------------------


def _dask_client(address: str):
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - dask[distributed] is a dependency
        raise CxrError("--scheduler needs dask[distributed] installed") from None
    try:
        return Client(address, timeout=DASK_CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise CxrError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def _execute(tasks: list[PieceTask], config: BuildConfig, client, done: Callable[[dict], None], images: int) -> None:
    """Run every task (inline, in local processes, or on Dask), calling `done(record)` in the parent as each ends."""
    if not tasks:
        return
    with _progress_bar(images, config.quiet) as advance:
        if client is not None:
            from distributed import as_completed

            futures = [client.submit(run_piece, t, key=f"cxr-piece-{t.stem}-{t.task_id[:16]}", pure=False)
                       for t in tasks]
            sizes = {f.key: len(t.items) for f, t in zip(futures, tasks)}
            try:
                for future in as_completed(futures):
                    done(future.result())
                    advance(sizes[future.key])
            finally:
                for future in futures:
                    future.cancel()
        elif config.workers <= 1 or len(tasks) == 1:
            for task in tasks:
                done(run_piece(task))
                advance(len(task.items))
        else:
            with cf.ProcessPoolExecutor(max_workers=min(config.workers, len(tasks)), mp_context=mp_context()) as pool:
                futures = {pool.submit(run_piece, t): len(t.items) for t in tasks}
                try:
                    for future in cf.as_completed(futures):
                        done(future.result())
                        advance(futures[future])
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise


class _progress_bar:
    """Context manager yielding `advance(n)`: a rich bar with images/s and ETA, silent when quiet or not a TTY."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.progress = total, quiet, None

    def __enter__(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        console = Console(stderr=True)
        if self.quiet or not console.is_terminal:
            return lambda n: None
        self.progress = Progress(
            TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} images/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False)
        self.progress.start()
        task = self.progress.add_task("build", total=self.total, rate="-")
        t0 = time.perf_counter()

        def advance(n: int) -> None:
            done = self.progress.tasks[0].completed + n
            rate = done / max(1e-9, time.perf_counter() - t0)
            self.progress.update(task, advance=n, rate=f"{rate:,.0f}")

        return advance

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


# --- joining pieces and finishing ------------------------------------------------------------------


def _assemble(shard: _Shard, config: BuildConfig, out_dir: Path, work: Path, progress: Path) -> None:
    """Join a shard's pieces into its tar (and pixel file), record it, drop the pieces."""
    records = [shard.pieces[s] for s in shard.starts]
    stems = [f"{shard.stem}.{s:06d}" for s in shard.starts]
    record = {"id": shard.shard_id, "count": sum(r["count"] for r in records),
              "keys": [k for r in records for k in r["keys"]],
              "rejects": [x for r in records for x in r["rejects"]],
              "sources": [x for r in records for x in r["sources"]],
              "hist": np.sum([np.asarray(r["hist"], dtype=np.int64) for r in records], axis=0).tolist()}
    if "wds" in config.formats:
        digest = hashlib.sha256()
        with atomic_path(out_dir / f"{shard.stem}.tar") as tmp, open(tmp, "wb") as fh:
            length = sum(copy_into(fh, work / f"{stem}.tarpart", digest) for stem in stems)
            end = tar_end(length)
            fh.write(end)
            digest.update(end)
        record["tar_sha256"] = digest.hexdigest()
    if "hdf5" in config.formats:
        digest = hashlib.sha256()
        with atomic_path(work / f"{shard.stem}.u8", fsync=False) as tmp, open(tmp, "wb") as fh:   # checked on reuse
            for stem in stems:
                copy_into(fh, work / f"{stem}.u8", digest)
        record["u8_sha256"] = digest.hexdigest()
    write_bytes_atomic(progress / f"{shard.stem}.json", json.dumps(record).encode())
    shard.record = record
    for stem in stems:
        for suffix in (".tarpart", ".u8", ".json"):
            (work / f"{stem}{suffix}").unlink(missing_ok=True)


def _finish(out_dir: Path, config: BuildConfig, manifest: Manifest, manifest_options: dict, table: pd.DataFrame,
            labels: list[str], shards: list[_Shard], work: Path, *, built: int, reused: int, images: int,
            started: float) -> BuildResult:
    """Write SPLIT.h5, manifest.parquet, rejects.parquet, build.json, then dataset.json; clean up."""
    files: list[dict] = []
    locations: list[tuple[str, str | None, int, int]] = []
    for split in SPLITS:
        split_shards = [s for s in shards if s.split == split]
        h5_row = 0
        for shard in split_shards:
            keys = shard.record["keys"]
            if "wds" in config.formats:
                files.append({"file": f"{shard.stem}.tar", "split": split, "count": len(keys),
                              "bytes": (out_dir / f"{shard.stem}.tar").stat().st_size,
                              "sha256": shard.record["tar_sha256"]})
            for index, key in enumerate(keys):
                locations.append((key, f"{shard.stem}.tar" if "wds" in config.formats else None,
                                  index if "wds" in config.formats else -1,
                                  h5_row + index if "hdf5" in config.formats else -1))
            h5_row += len(keys)
        if "hdf5" in config.formats and h5_row:
            keys = [k for s in split_shards for k in s.record["keys"]]
            values = table.set_index("key").loc[keys, labels].to_numpy(dtype=np.float32)
            sha = write_h5(out_dir / f"{split}.h5", split=split, size=config.size, labels=labels, keys=keys,
                           label_matrix=values,
                           pixel_files=[(work / f"{s.stem}.u8", len(s.record["keys"])) for s in split_shards])
            files.append({"file": f"{split}.h5", "split": split, "count": h5_row,
                          "bytes": (out_dir / f"{split}.h5").stat().st_size, "sha256": sha})
        elif (out_dir / f"{split}.h5").exists():
            (out_dir / f"{split}.h5").unlink()

    where = pd.DataFrame(locations, columns=["key", "shard", "shard_index", "h5_index"])
    located = where.merge(table, on="key", how="left", validate="one_to_one")
    located = located[[*table.columns, "shard", "shard_index", "h5_index"]]
    located["shard"] = located["shard"].astype("str").where(located["shard"].notna().to_numpy())
    located["shard_index"] = located["shard_index"].astype(np.int64)
    located["h5_index"] = located["h5_index"].astype(np.int64)
    meta = dict(manifest.meta, labels=labels)
    write_located_manifest(out_dir / MANIFEST_NAME, located, meta)

    pixel_rejects = [r for s in shards for r in s.record["rejects"]]
    pixel_frame = make_rejects([r[0] for r in pixel_rejects], [r[1] for r in pixel_rejects],
                               pd.Series([r[2] for r in pixel_rejects], dtype="str"))
    rejects = concat_rejects([manifest.rejects, pixel_frame])
    write_rejects(rejects, out_dir / REJECTS_NAME)

    write_json(out_dir / BUILD_NAME, {**config.to_dict(), "manifest_options": manifest_options,
                                      "tool_version": __version__})
    train_hist = np.sum([np.asarray(s.record["hist"], dtype=np.int64) for s in shards if s.split == "train"]
                        or [np.zeros(256, np.int64)], axis=0)
    reasons = reject_counts(pixel_frame) if len(pixel_frame) else {}
    card = make_card(
        name=config.name, source=config.source, size=config.size, codec=config.codec,
        jpeg_quality=config.jpeg_quality, fit=config.fit, formats=config.formats, labels=labels, table=located,
        train_hist=train_hist, manifest_options=manifest_options, shard_options=config.shard_options(),
        rejects=len(rejects), pixel_rejects=len(pixel_frame), reject_reasons=reasons,
        manifest_sha256=sha256_file(out_dir / MANIFEST_NAME), files=files)
    _remove_strays(out_dir, {f["file"] for f in files})
    write_bytes_atomic(out_dir / README_NAME, render_readme(card, str(config.raw)).encode("utf-8"))
    write_json(out_dir / CARD_NAME, card)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    fraction = len(pixel_frame) / len(table) if len(table) else 0.0
    return BuildResult(path=out_dir, card=card, rejects=reasons, reject_fraction=fraction, shards_built=built,
                       shards_reused=reused, images=images, seconds=time.perf_counter() - started)


def _remove_strays(out_dir: Path, keep: set[str]) -> None:
    """Shard and HDF5 files of an earlier, different plan (never produced by this one)."""
    for entry in out_dir.iterdir():
        if (SHARD_FILE.match(entry.name) or H5_FILE.match(entry.name)) and entry.name not in keep:
            entry.unlink()


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise CxrError(f"{flag} {value!r} is not one of {', '.join(choices)}")
