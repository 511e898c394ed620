"""Read throughput: shard sets back into uint8 batches on ONE core, against the seeds' per-image loader.

`run(workdir, shard_dir_by_codec=None) -> str` returns a markdown section for BENCHMARKS.md. Without shard
sets it makes a phantom NIH tree of 1024 px PNGs and builds them (`cxrshards.build`): png (wds + hdf5),
jpeg and raw (wds). Every reader runs in its own child process pinned to one core (torch and OpenCV set
to one thread, `num_workers=0`), so each peak RSS is that reader's own. Standalone:
`python bench/read_bench.py [--workdir DIR] [--images N]`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZE = 224
BATCH = 64
IMAGES = 400               # phantom images (all splits); the bench reads the train split
MIN_SECONDS = 2.0          # each reader repeats epochs until at least this long
BASELINE_IMAGES = 120      # the seeds' loader is slow: this many source images are enough
REAL_NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "nih-1024"
TARGETS = {"jpeg": 40, "raw": 100, "hdf5": 100}
READERS = (("wds", "png"), ("wds", "jpeg"), ("wds", "raw"), ("hdf5", "png"))
REMOTE_CODECS = ("raw", "jpeg")  # wds sets read over HTTP against the same set on disk
REMOTE_TARGET = 0.5              # goal: the HTTP rate is at least half the disk rate
REMOTE_ROUNDS = 5                # interleaved disk/HTTP rounds; the better round of each side is reported
MIX_ROUNDS = 3                   # interleaved open_shards / mix-of-one rounds
SCALING_IMAGES = (500, 2000)  # shard sets of growing size for the loader-memory check (256 px phantoms)
# glibc raises its mmap threshold after large frees, so freed batch buffers then stay on the heap and RSS
# drifts by tens of MiB run to run; a fixed threshold shows the reader's own memory.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# --- child process: one measurement ----------------------------------------------------------------


def _one_core() -> None:
    """Pin this process to one core and one thread everywhere."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _read_epochs(stream) -> dict:
    """Samples/s of full epochs of `stream` (after one warm-up epoch), with the process's peak RSS."""
    rss_before = peak = _rss_mib()
    n = sum(len(keys) for _, _, keys in stream)  # warm-up: page cache, first-use imports
    samples, epochs, started = 0, 0, time.perf_counter()
    while time.perf_counter() - started < MIN_SECONDS:
        epochs += 1
        stream.set_epoch(epochs)
        for images, labels, keys in stream:
            samples += images.shape[0]
            peak = max(peak, _rss_mib())
    seconds = time.perf_counter() - started
    return {"samples_per_s": samples / seconds, "samples": n, "epochs": epochs,
            "peak_rss_mib": peak, "rss_before_mib": rss_before}


def measure_shards(shard_dir: str, fmt: str) -> dict:
    """Samples/s of full epochs of the train split into uint8 batches of 64 (after one warm-up epoch).

    `shard_dir` may be a URL: then every epoch streams the tars again (no cache)."""
    _one_core()
    import cxrshards

    return _read_epochs(cxrshards.open_shards(shard_dir, "train", format=fmt, batch_size=BATCH, seed=0))


def measure_mix_of_one(shard_dir: str, fmt: str) -> dict:
    """`measure_shards` through the training read path: the set as a mix of one (`cxrshards.mix.open_mix`)."""
    _one_core()
    from cxrshards import mix
    from manifests.labelmap import load_label_map

    sets = mix.resolve_sets([shard_dir], None, load_label_map())
    return _read_epochs(mix.open_mix(sets, "train", mix.run_labels(sets).shared, format=fmt, batch_size=BATCH, seed=0))


def mix_rows(dirs: dict[str, Path], rounds: int = MIX_ROUNDS) -> list[str]:
    """Markdown rows: one set read as a mix of one (what `cxr train` reads) against `open_shards` of the same
    set (what release 0.1 trained on), in interleaved rounds; the better round of each side."""
    rows = []
    for fmt, codec in (("wds", "raw"), ("wds", "jpeg"), ("hdf5", "png")):
        if codec not in dirs or (fmt == "hdf5" and not (dirs[codec] / "train.h5").exists()):
            continue
        alone, mixed = [], []
        for _ in range(rounds):
            alone.append(_in_child("shards", str(dirs[codec]), fmt)["samples_per_s"])
            mixed.append(_in_child("mix", str(dirs[codec]), fmt)["samples_per_s"])
        a, m = max(alone), max(mixed)
        rows.append(f"| {fmt} {codec} | {a:,.0f} | {m:,.0f} | {m / a:.2f} | "
                    + ", ".join(f"{x / 1000:.1f}k/{y / 1000:.1f}k" for x, y in zip(alone, mixed)) + " |")
    return rows


def mix_section(dirs: dict[str, Path]) -> str:
    return "\n".join([
        "", "### One set as a mix of one (the training read path)", "",
        f"`cxr train` reads every run through `cxrshards.mix.open_mix`, one set as a mix of one; release 0.1 read a "
        f"one-set run through `open_shards`. Same set, same settings as above, {MIX_ROUNDS} interleaved rounds per "
        f"reader, each in its own child pinned to one core; the better round of each side.", "",
        "| shard set | open_shards samples/s | mix of one samples/s | mix / open_shards | rounds (open_shards/mix) |",
        "|---|---:|---:|---:|---|", *mix_rows(dirs)])


def measure_seed_loader(paths: list[str]) -> dict:
    """The seeds' loader: per sample cv2.imread of the 1024 px file + Resize(224)/ToTensor/Normalize, then
    the DataLoader's default collation into batches of 64."""
    _one_core()
    import cv2
    import torch
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(SIZE), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def sample(path: str) -> torch.Tensor:
        return tf(Image.fromarray(cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)))

    rss_before = peak = _rss_mib()
    sample(paths[0])  # warm-up
    started = time.perf_counter()
    for i in range(0, len(paths), BATCH):
        torch.stack([sample(p) for p in paths[i:i + BATCH]])
        peak = max(peak, _rss_mib())
    seconds = time.perf_counter() - started
    return {"samples_per_s": len(paths) / seconds, "samples": len(paths), "epochs": 1,
            "peak_rss_mib": peak, "rss_before_mib": rss_before}


def _in_child(kind: str, *args, env: dict | None = None) -> dict:
    """Run one measurement in a fresh interpreter (own peak RSS, own core)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(list(args))],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"read_bench child {kind!r} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- inputs ------------------------------------------------------------------------------------------


def make_phantom(raw: str, images: int, image_size: int = 1024) -> dict:
    from phantom import make_demo_data

    make_demo_data("nih", raw, images, image_size=image_size, seed=0)
    return {"raw": raw}


def build_sets(raw: str, out: str, codecs: tuple[str, ...] = ("png", "jpeg", "raw"), with_hdf5: str = "png") -> dict:
    from cxrshards.build import BuildConfig, build_shards

    dirs = {}
    for codec in codecs:
        config = BuildConfig(source="nih", raw=Path(raw), size=SIZE, codec=codec,
                             format="both" if codec == with_hdf5 else "wds", out=Path(out),
                             name=f"nih-{SIZE}-{codec}", workers=os.cpu_count() or 1, quiet=True,
                             max_reject_fraction=1.0)
        dirs[codec] = str(build_shards(config).path)
    return dirs


def memory_scaling(workdir: Path) -> list[str]:
    """Markdown rows: the reader's RSS growth on shard sets of growing size (it should stay flat)."""
    rows = []
    for images in SCALING_IMAGES:
        base = Path(workdir) / "read_bench" / f"scaling-{images}"
        raw = base / "raw"
        if not (raw / "phantom.json").is_file():
            _in_child("phantom", str(raw), images, 256)
        shard_dir = _in_child("build", str(raw), str(base / "shards"), ["raw"], "raw")["raw"]
        for fmt in ("wds", "hdf5"):
            r = _in_child("shards", shard_dir, fmt, env=FIXED_MMAP_THRESHOLD)
            rows.append(f"| {r['samples']:,} | {fmt} (raw codec) | {r['samples_per_s']:,.0f} | "
                        f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} |")
    return rows


def build_inputs(workdir: Path, images: int = IMAGES) -> dict[str, Path]:
    """A phantom NIH tree of 1024 px PNGs and shard sets at 224 px for each codec (reused when present).

    Drawing and building run in separate fresh processes: the builder forks worker processes, which is
    only safe from a parent that has not started threads of its own (OpenCV's, torch's)."""
    base = Path(workdir) / "read_bench"
    raw = base / "raw-nih-1024"
    made = json.loads((raw / "phantom.json").read_text()) if (raw / "phantom.json").is_file() else {}
    if (made.get("n"), made.get("image_size"), made.get("seed")) != (images, 1024, 0):
        _in_child("phantom", str(raw), images)
    return {k: Path(v) for k, v in _in_child("build", str(raw), str(base / "shards")).items()}


def _source_paths(shard_dir: Path, limit: int) -> list[str]:
    """The raw 1024 px files behind the train split of a shard set (for the seeds' loader)."""
    import pandas as pd

    build = json.loads((shard_dir / "build.json").read_text())
    raw = Path(build.get("raw") or build.get("config", {}).get("raw"))
    table = pd.read_parquet(shard_dir / "manifest.parquet", columns=["path", "split"])
    paths = [str(raw / p) for p in table.loc[table["split"] == "train", "path"]]
    return paths[:limit]


def remote_rows(dirs: dict[str, Path], rounds: int = REMOTE_ROUNDS) -> list[str]:
    """Markdown: each wds set read from disk and from a local HTTP server (no cache, every epoch streams),
    `rounds` interleaved rounds of each; the better round of each side (the machine is shared and noisy)."""
    from tests.http_server import serve_folder

    lines = []
    for codec in REMOTE_CODECS:
        if codec not in dirs:
            continue
        shard_dir = Path(dirs[codec])
        disk_rates, http_rates = [], []
        with serve_folder(shard_dir.parent) as server:  # served from this process, read in a pinned child
            for _ in range(rounds):
                disk_rates.append(_in_child("shards", str(shard_dir), "wds")["samples_per_s"])
                gets_before, heads_before = server.tar_gets(), server.tar_heads()
                http = _in_child("shards", f"{server.url}/{shard_dir.name}", "wds")
                http_rates.append(http["samples_per_s"])
            gets, heads = server.tar_gets() - gets_before, server.tar_heads() - heads_before
        disk, remote_rate = max(disk_rates), max(http_rates)
        ratio = remote_rate / disk
        tars = sum(1 for _ in shard_dir.glob("train-*.tar"))
        rounds_text = ", ".join(f"{h / 1000:.1f}k/{d / 1000:.1f}k" for d, h in zip(disk_rates, http_rates))
        lines.append(f"| wds {codec} | {disk:,.0f} | {remote_rate:,.0f} | {ratio:.2f} | "
                     f"{'meets' if ratio >= REMOTE_TARGET else 'MISSES'} >= {REMOTE_TARGET} | {rounds_text} | "
                     f"{gets} GETs, {heads} HEADs for {http['epochs'] + 1} epochs of {tars} train tars (last round) |")
    return lines


def remote_section(dirs: dict[str, Path]) -> str:
    lines = [f"### Reading over HTTP ({SIZE} px, one core, uint8 batches of {BATCH})", "",
             "The same shard set read from disk and from a local HTTP server (`tests/http_server.py` on "
             "127.0.0.1, a thread of the bench process, range requests sent in 4 MiB writes) through "
             "`open_shards(URL, ...)` without a cache, so every epoch streams every tar again; reader settings as "
             f"above; {REMOTE_ROUNDS} interleaved rounds (disk, HTTP, disk, ...), the better round of each side. "
             f"Goal: at least {REMOTE_TARGET} x the disk rate. Tar requests counted by the server "
             "(one GET per tar per epoch, never one per sample; no HEAD, the card gives each tar's size).", "",
             "| shard set | disk samples/s | HTTP samples/s | HTTP / disk | goal | rounds (HTTP/disk) | tar requests |",
             "|---|---:|---:|---:|---|---|---|", *remote_rows(dirs)]
    return "\n".join(lines) + "\n"


# --- the section -------------------------------------------------------------------------------------


def run(workdir: Path, shard_dir_by_codec: dict | None = None) -> str:
    """Measure every reader and the seeds' loader; return the markdown section."""
    dirs = {k: Path(v) for k, v in (shard_dir_by_codec or build_inputs(Path(workdir))).items()}
    phantom = _in_child("seed", _source_paths(dirs.get("png") or next(iter(dirs.values())), BASELINE_IMAGES))
    real_files = sorted(str(p) for p in REAL_NIH.glob("*.png")) if REAL_NIH.is_dir() else []
    real = _in_child("seed", [real_files[i % len(real_files)] for i in range(BASELINE_IMAGES)]) if real_files else None
    # ratios against the faster baseline: the conservative figure
    base = max((r for r in (phantom, real) if r is not None), key=lambda r: r["samples_per_s"])
    rows = []
    for fmt, codec in READERS:
        if fmt == "hdf5":
            codec = next((c for c in ("png", "jpeg", "raw") if c in dirs and (dirs[c] / "train.h5").exists()), None)
            if codec is None:
                continue
        elif codec not in dirs:
            continue
        result = _in_child("shards", str(dirs[codec]), fmt)
        rows.append((fmt, codec, result))

    b = base["samples_per_s"]
    baselines = [("seeds' loader on the phantom 1024 px PNGs the shards were built from", phantom)]
    if real is not None:
        baselines.append((f"seeds' loader on the {len(real_files)} real NIH 1024 px PNGs "
                          f"(`../shared/data/real/nih-1024`, cycled)", real))
    lines = [
        f"## Read throughput (one core, {SIZE} px, uint8 batches of {BATCH})",
        "",
        f"Each reader runs in its own process pinned to one core (`torch.set_num_threads(1)`, "
        f"`cv2.setNumThreads(1)`, `num_workers=0`) and reads whole shuffled epochs of the train split "
        f"({rows[0][2]['samples'] if rows else '?'} samples) through `cxrshards.open_shards(..., batch_size={BATCH})` "
        f"for at least {MIN_SECONDS:.0f} s after a warm-up epoch (files in the page cache). Baseline: the seeds' "
        f"loader, per sample `cv2.imread` of the 1024 px source PNG + torchvision `Resize({SIZE})`/`ToTensor`/"
        f"`Normalize`, stacked into batches ({base['samples']} reads), on the phantom sources and on the real "
        f"NIH images; ratios are against the faster of the two ({b:,.0f} samples/s). Peak RSS is each process's "
        f"own, sampled after every batch (psutil; `ru_maxrss` would carry the parent's peak across exec), "
        f"most of it the imports (torch); the last column is the growth after opening the reader.",
        "",
        "| reader | samples/s | x seeds' loader | target | peak RSS (MiB) | RSS growth while reading (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for title, r in baselines:
        lines.append(f"| {title} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / b:.2f} | | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |")
    verdicts = []
    for fmt, codec, r in rows:
        ratio = r["samples_per_s"] / b
        target = TARGETS.get("hdf5" if fmt == "hdf5" else codec)
        name = "hdf5 (uint8 chunks)" if fmt == "hdf5" else f"wds {codec}"
        lines.append(f"| {name} | {r['samples_per_s']:,.0f} | {ratio:,.0f} | {f'>= {target}x' if target else ''} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} |")
        if target:
            verdicts.append(f"{name}: {ratio:.0f}x ({'meets' if ratio >= target else 'MISSES'} {target}x)")
    lines += ["", "Targets: " + "; ".join(verdicts) + "." if verdicts else ""]
    lines += ["", "Loader memory as the shard set grows (train split of phantom NIH sets of "
              f"{' and '.join(f'{n:,}' for n in SCALING_IMAGES)} images, same reader settings, glibc "
              "`MALLOC_MMAP_THRESHOLD_=131072` so that freed batch buffers go back to the OS): RSS growth after "
              "opening the reader should not follow the set's size.", "",
              "| train samples | reader | samples/s | RSS growth while reading (MiB) |", "|---:|---|---:|---:|",
              *memory_scaling(workdir), "",
              "HDF5 holds one batch at a time. The tar reader also holds its shuffle buffer of encoded samples "
              "(at most `shuffle_buffer`=1000, about 50 MiB at 224 px raw): it fills with the whole split while "
              "the split is smaller than that, and stays bounded beyond. Throughput here is lower than above "
              "because every buffer is a fresh mmap.", mix_section(dirs), "", remote_section(dirs)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--images", type=int, default=IMAGES, help="phantom images to build from")
    parser.add_argument("--remote-only", action="store_true", help="only the HTTP-against-disk section")
    parser.add_argument("--mix-only", action="store_true", help="only the mix-of-one against open_shards section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        fn = {"seed": measure_seed_loader, "shards": measure_shards, "mix": measure_mix_of_one,
              "phantom": make_phantom, "build": build_sets}[args.child]
        print(json.dumps(fn(*json.loads(args.args))))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.remote_only:
        print(remote_section(build_inputs(args.workdir.resolve(), args.images)))
        return 0
    if args.mix_only:
        print(mix_section(build_inputs(args.workdir.resolve(), args.images)))
        return 0
    print(run(args.workdir.resolve(), build_inputs(args.workdir.resolve(), args.images)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
