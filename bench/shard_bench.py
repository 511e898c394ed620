"""Shard build throughput at 224 px vs the naive per-image loop, on the same files and cores.

Inputs (generated into WORKDIR/shard_bench once, reused afterwards), the sizes of issue 12:
- NIH-like: 637 phantom 1024 x 1024 8-bit PNGs + the 3 real NIH images from ../shared/data/real/nih-1024 (640);
- MIMIC-like: 160 phantom quality-95 JPEGs, long side 3056 (mostly 2544 x 3056, as MIMIC-CXR-JPG).
Every file of a tree is in the build's manifest (one `train` split), so both sides process the same files.

Measured, best of REPEATS runs each, with W = all cores for the build, the naive loop and the floor:
- naive: a new Python process running a multiprocessing Pool of W workers, per image PIL open,
  convert('L'), resize((224, 224)), save as PNG into a folder (the seed's preprocessing), timed as a whole
  process (start, imports, pool start included);
- build: `python -m cli shard build --manifest ... --format wds --codec png --workers W` timed as a whole
  process (imports, manifest read, plan, pool start, decode, resize, encode, tar, sha256, card); also with
  1 worker, for the worker speedup;
- decode-only floor: a warm Pool of W workers that only decodes each source (`cxrshards.pixels.load_gray`,
  the build's decoders, reduced-scale JPEG decode included), timed on the work alone: the least any
  build must spend. `build / floor` >= 85% is the goal.
Also: per-image CPU time in one process (build inline vs decode + resize + encode alone: the build's own
overhead), the decoder choice (PNG: OpenCV, libspng, imagecodecs, the build's libdeflate + libspng; JPEG:
OpenCV's reduced decode vs simplejpeg) and start-up times.

`run(workdir) -> str` returns the markdown section. Standalone: `python bench/shard_bench.py [--workdir DIR]`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrshards.build import BuildConfig, build_shards, mp_context  # noqa: E402
from cxrshards.tasks import TRACE_FIRST  # noqa: E402
from phantom import make_demo_data  # noqa: E402
from manifests.table import Manifest, write_manifest  # noqa: E402

SIZE = 224
REPEATS = 2
NIH_N, MIMIC_N = 637, 160      # + 3 real NIH PNGs = 640
MIMIC_SIDE = 3056
TARGETS = {"nih": 2.0, "mimic": 2.5}
FLOOR_TARGET = 0.85
REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "nih-1024"


# --- inputs ------------------------------------------------------------------------------------------


def prepare_inputs(workdir: Path) -> dict[str, tuple[Path, Path, list[Path]]]:
    """{source: (raw root, manifest covering every image, image files)}, generated once."""
    base = workdir / "shard_bench"
    out = {}
    for source, n, size in (("nih", NIH_N, 1024), ("mimic", MIMIC_N, MIMIC_SIDE)):
        raw = base / source
        made = json.loads((raw / "phantom.json").read_text()) if (raw / "phantom.json").is_file() else {}
        if (made.get("n"), made.get("image_size")) != (n, size):
            shutil.rmtree(raw, ignore_errors=True)
            print(f"   generating {n} phantom {source} images ({size} px) in {raw} ...", flush=True)
            make_demo_data(source, raw, n, size, seed=0)
        if source == "nih":
            real = raw / "real"
            real.mkdir(exist_ok=True)
            for src in sorted(SHARED_REAL.glob("*.png")):
                if not (real / src.name).exists():
                    (real / src.name).symlink_to(src)
        suffix = ".png" if source == "nih" else ".jpg"
        files = sorted(p for p in raw.rglob(f"*{suffix}"))
        manifest = raw / "bench-manifest.parquet"
        if not manifest.is_file():
            write_manifest(_all_images_manifest(raw, source, files), manifest)
        out[source] = (raw, manifest, files)
    return out


def _all_images_manifest(raw: Path, source: str, files: list[Path]) -> Manifest:
    """A manifest listing every image of the tree (the real cohorts would drop some, e.g. MIMIC laterals)."""
    rel = [f.relative_to(raw).as_posix() for f in files]
    keys = [r.rsplit(".", 1)[0].replace("/", "_").replace(".", "_") for r in rel]
    table = pd.DataFrame({"key": keys, "source": source, "path": rel, "patient_id": keys, "study_id": None,
                          "view": None, "split": "train", "Finding": np.float32(0.0)})
    meta = {"source": source, "options": {"source": source, "bench": "every image"}, "raw": str(raw.resolve())}
    return Manifest(table=table, labels=["Finding"], meta=meta)


# --- the three contenders ------------------------------------------------------------------------------


def naive_one(job: tuple[str, str]) -> None:
    """The seed's per-image preprocessing: PIL open, convert, resize, save PNG."""
    from PIL import Image

    src, dst = job
    Image.open(src).convert("L").resize((SIZE, SIZE)).save(dst)


def decode_one(path: str) -> int:
    """Decode only (the build's own decoder, reduced-scale for large JPEGs)."""
    import cv2

    from cxrshards.pixels import load_gray

    cv2.setNumThreads(1)
    return int(load_gray(path, target=SIZE, fit="pad").shape[0])


def _context():
    # The build's own start method for every side (this process has already run OpenCV threads).
    return mp_context()


def _import_decoders(_: int = 0) -> None:
    import cv2  # noqa: F401
    from PIL import Image  # noqa: F401

    import cxrshards.pixels  # noqa: F401


def _warm_pool(workers: int):
    """A pool whose workers have started and imported the decoders, so the naive loop and the floor are
    timed on work alone (the build's forkserver preloads its modules the same way; its pool start-up
    stays inside its own timing, which only makes the ratios conservative)."""
    pool = _context().Pool(workers, initializer=_import_decoders)
    pool.map(_import_decoders, range(workers))
    return pool


NAIVE_SCRIPT = """
import json, sys
from multiprocessing import Pool
from PIL import Image

def one(job):
    src, dst = job
    Image.open(src).convert("L").resize((%d, %d)).save(dst)

if __name__ == "__main__":
    jobs, workers = json.load(open(sys.argv[1])), int(sys.argv[2])
    with Pool(workers) as pool:
        pool.map(one, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
""" % (SIZE, SIZE)


def time_naive(files: list[Path], out: Path, workers: int) -> float:
    """The naive loop as a whole new process (start, imports and pool included)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    jobs = [(str(f), str(out / f"{i:06d}.png")) for i, f in enumerate(files)]
    (out / "jobs.json").write_text(json.dumps(jobs))
    (out / "naive.py").write_text(NAIVE_SCRIPT)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(out / "naive.py"), str(out / "jobs.json"), str(workers)], check=True)
    return time.perf_counter() - start


def time_floor(files: list[Path], workers: int) -> float:
    with _warm_pool(workers) as pool:
        start = time.perf_counter()
        pool.map(decode_one, [str(f) for f in files], chunksize=max(1, len(files) // (4 * workers)))
        return time.perf_counter() - start


def time_build(raw: Path, manifest: Path, source: str, out: Path, workers: int, fmt: str = "wds",
               first: dict | None = None) -> float:
    """`cxr shard build` as a whole new process, as a user runs it. With `first` (a dict), also
    `first["seconds"]`: from just before the process starts to the first image decoded, resized and
    encoded in any worker (`CXR_TRACE_FIRST`, see cxrshards.tasks)."""
    command = [sys.executable, "-m", "cli", "shard", "build", "--manifest", str(manifest), "--raw", str(raw),
               "--size", str(SIZE), "--format", fmt, "--codec", "png", "--fit", "pad", "--out", str(out),
               "--name", f"{source}-{workers}w-{fmt}", "--workers", str(workers), "--force", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    trace = out / f"first-{source}-{workers}w-{fmt}.trace"
    if first is not None:
        out.mkdir(parents=True, exist_ok=True)
        trace.unlink(missing_ok=True)
        env[TRACE_FIRST] = str(trace)
    wall = time.time()
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if first is not None:
        first["seconds"] = min(float(line.split()[1]) for line in trace.read_text().splitlines()) - wall
    return seconds


def time_help(repeats: int = 3) -> float:
    """Best wall time of `python -m cli --help` (a new process each time)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli", "--help"], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - start)
    return best


def _best(fn, repeats: int):
    """(best seconds of `repeats` calls of fn(), its last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def decoder_table(png_files: list[Path], jpeg_files: list[Path], repeats: int = 7) -> dict[str, dict]:
    """Per-image decode time (one core, best of `repeats` per file, averaged) of each candidate decoder.

    PNG (8-bit gray): OpenCV (libpng), plain libspng (pyspng), imagecodecs' libpng and libspng, and the
    build's path (`pixels._spng_decode`: libdeflate inflate + libspng unfilter); "exact" = the same pixels as
    OpenCV on every file. JPEG: OpenCV's reduced decode (the build's) vs simplejpeg's scaled decode (the
    same libjpeg-turbo), and the full decode; "dB" = worst PSNR after the 224 px pad resize against full
    decode + area resize. {group: {"files": n, "kind": "png"|"jpeg", decoder: (seconds, exact or dB)}}."""
    import cv2
    import pyspng

    from cxrshards import pixels as px

    cv2.setNumThreads(1)
    flags = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
    png = {"OpenCV (libpng)": lambda d: cv2.imdecode(np.frombuffer(d, np.uint8), flags),
           "pyspng (libspng)": pyspng.load}
    try:
        import imagecodecs

        png |= {"imagecodecs libpng": imagecodecs.png_decode, "imagecodecs libspng": imagecodecs.spng_decode}
    except ImportError:
        pass
    png["build: libdeflate + libspng"] = lambda d: px._spng_decode(d, None)
    real = [f for f in png_files if f.parent.name == "real"]
    real += sorted(SHARED_REAL.parent.glob("nih-512/*.png"))
    groups = {"real NIH PNG (../shared/data)": ("png", real),
              "phantom NIH PNG": ("png", [f for f in png_files if f.parent.name != "real"][:32]),
              "phantom MIMIC JPEG": ("jpeg", jpeg_files[:24])}
    out = {}
    for name, (kind, group) in groups.items():
        row: dict = {"files": len(group), "kind": kind}
        for path in group:
            data = path.read_bytes()
            if kind == "png":
                want = png["OpenCV (libpng)"](data)
                for decoder, fn in png.items():
                    seconds, got = _best(lambda: fn(data), repeats)
                    old = row.get(decoder, (0.0, True))
                    row[decoder] = (old[0] + seconds / len(group), old[1] and bool(np.array_equal(np.squeeze(got), want)))
            else:
                row.update(_jpeg_row(path, data, repeats, len(group), row))
        out[name] = row
    return out


def _jpeg_row(path: Path, data: bytes, repeats: int, n: int, row: dict) -> dict:
    import cv2

    from cxrshards.pixels import fit_resize, jpeg_size, prepare, reduction_factor

    width, height = jpeg_size(data)
    r = reduction_factor(width, height, SIZE, "pad")
    want = fit_resize(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE), SIZE, "pad")
    reduced = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
    flags = cv2.IMREAD_IGNORE_ORIENTATION
    decoders = {f"OpenCV reduced 1/{r} (build)": lambda: cv2.imdecode(np.frombuffer(data, np.uint8), reduced.get(r, 0) | flags),
                "OpenCV full": lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | flags)}
    try:
        import simplejpeg

        decoders[f"simplejpeg 1/{r}"] = lambda: simplejpeg.decode_jpeg(
            data, colorspace="GRAY", min_height=-(-height // r), min_width=-(-width // r))[:, :, 0]
    except ImportError:
        pass
    build_db = _psnr(prepare(path, SIZE, "pad"), want)
    ref = decoders[f"OpenCV reduced 1/{r} (build)"]()
    out = {}
    for decoder, fn in decoders.items():
        seconds, got = _best(fn, repeats)
        quality = float("inf") if decoder == "OpenCV full" else (build_db if np.array_equal(got, ref) else -1.0)
        old = row.get(decoder, (0.0, float("inf")))
        out[decoder] = (old[0] + seconds / n, min(old[1], quality))
    return out


def cpu_per_image(files: list[Path], raw: Path, manifest: Path, source: str, scratch: Path) -> dict[str, float]:
    """CPU seconds per image of each side in this one process (process_time: other load on the machine
    does not inflate it). The build runs inline (workers=1), end to end."""
    from cxrshards.pixels import encode, prepare

    out = {}
    target = scratch / "naive-inline"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    start = time.process_time()
    for i, f in enumerate(files):
        naive_one((str(f), str(target / f"{i:06d}.png")))
    out["naive"] = (time.process_time() - start) / len(files)
    start = time.process_time()
    for f in files:
        decode_one(str(f))
    out["floor"] = (time.process_time() - start) / len(files)
    start = time.process_time()
    for f in files:
        encode(prepare(f, SIZE, "pad"), "png")
    out["work"] = (time.process_time() - start) / len(files)
    config = BuildConfig(source=source, raw=raw, manifest=manifest, size=SIZE, format="wds", codec="png", fit="pad",
                         out=scratch, name=f"{source}-inline", workers=1, force=True, quiet=True)
    start = time.process_time()
    build_shards(config)
    out["build"] = (time.process_time() - start) / len(files)
    return out


# --- the section ---------------------------------------------------------------------------------------


def run(workdir: Path) -> str:
    workdir = Path(workdir)
    inputs = prepare_inputs(workdir)
    scratch = workdir / "shard_bench" / "out"
    cores = os.cpu_count() or 1
    time_floor(inputs["nih"][2][:4], cores)   # start the forkserver once, outside every timing

    wall: dict[tuple[str, str], float] = {}
    cpu: dict[str, dict[str, float]] = {}
    for _ in range(REPEATS):   # interleaved, best of REPEATS: load from elsewhere hits every side alike
        for source, (raw, manifest, files) in inputs.items():
            runs = {
                "naive": lambda: time_naive(files, scratch / "naive", cores),
                "build": lambda: time_build(raw, manifest, source, scratch, cores, first=first),
                "floor": lambda: time_floor(files, cores),
                "both": lambda: time_build(raw, manifest, source, scratch, cores, "both"),
                "1w": lambda: time_build(raw, manifest, source, scratch, 1),
            }
            if cores > 2:
                runs["2w"] = lambda: time_build(raw, manifest, source, scratch, 2)
            first: dict = {}
            for what, fn in runs.items():
                seconds = fn()
                wall[source, what] = min(seconds, wall.get((source, what), float("inf")))
            wall[source, "first"] = min(first["seconds"], wall.get((source, "first"), float("inf")))
            if cores == 2:   # the same build as "build": one figure for both
                wall[source, "2w"] = wall[source, "build"] = min(wall[source, "build"], wall.get((source, "2w"), float("inf")))
            per = cpu_per_image(files, raw, manifest, source, scratch)
            cpu[source] = {k: min(v, cpu.get(source, {}).get(k, float("inf"))) for k, v in per.items()}
    shutil.rmtree(scratch, ignore_errors=True)

    decoders = decoder_table(inputs["nih"][2], inputs["mimic"][2])
    help_seconds = time_help()

    names = {"nih": f"NIH-like: {NIH_N} phantom 1024 px PNG + 3 real NIH PNG",
             "mimic": f"MIMIC-like: {MIMIC_N} phantom q95 JPEG, long side {MIMIC_SIDE}"}
    lines = [
        "## Shard build throughput (224 px)",
        "",
        f"Same files, {cores} worker process(es) on every side, best of {REPEATS} interleaved runs. Naive = a new "
        "Python process running a Pool of PIL open, convert('L'), resize((224, 224)), save PNG per image; build = "
        "`python -m cli shard build` (WebDataset tars, PNG codec, pad fit); both timed as whole processes, start-up "
        "included. Floor = only decoding the sources with the build's decoders in a warm pool (the work alone).",
        "",
        "| input | images | naive img/s | build img/s | speedup | target | decode-only floor img/s | build / floor | "
        "first image after | build wds+hdf5 img/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for source, (_, _, files) in inputs.items():
        n = len(files)
        naive, built, floor, both = (wall[source, k] for k in ("naive", "build", "floor", "both"))
        speedup = naive / built
        verdict = "met" if speedup >= TARGETS[source] else "**missed**"
        share = floor / built
        floor_verdict = "met" if share >= FLOOR_TARGET else "**missed**"
        lines.append(f"| {names[source]} | {n} | {n / naive:.1f} | {n / built:.1f} | {speedup:.2f}x | "
                     f">= {TARGETS[source]:.1f}x ({verdict}) | {n / floor:.1f} | {share:.0%} (>= {FLOOR_TARGET:.0%}: "
                     f"{floor_verdict}) | {wall[source, 'first']:.2f} s | {n / both:.1f} |")
    lines += ["", "CPU time per image in one process (`time.process_time`, unaffected by other load on the machine; "
                  "the build runs inline with 1 worker, end to end; work = decode + resize + encode alone):", "",
              "| input | naive ms | build ms | work ms | build overhead over work | decode-only floor ms | "
              "best possible speedup (naive / floor) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for source, c in cpu.items():
        lines.append(f"| {source} | {c['naive'] * 1e3:.1f} | {c['build'] * 1e3:.1f} | {c['work'] * 1e3:.1f} | "
                     f"{c['build'] / c['work'] - 1:+.0%} (<= +10%: {'met' if c['build'] <= 1.1 * c['work'] else '**missed**'}) | "
                     f"{c['floor'] * 1e3:.1f} | {c['naive'] / c['floor']:.2f}x |")
    lines += ["", "Worker scaling of the build (wall clock, whole process, same inputs):", "",
              "| input | 1 worker img/s | 2 workers img/s | speedup |", "|---|---:|---:|---:|"]
    for source, (_, _, files) in inputs.items():
        n = len(files)
        one, two = wall[source, "1w"], wall.get((source, "2w"))
        lines.append(f"| {source} | {n / one:.1f} | " + (f"{n / two:.1f} | {one / two:.2f}x |" if two else "- | - |"))
    lines += ["", "Decoder choice (one core, best of 7 per file, mean per image): the build takes the fastest that "
                  "gives OpenCV's exact PNG pixels, and for JPEG >= 40 dB after the 224 px resize against full decode "
                  "+ area resize (a scaled decode giving other pixels than the build's shows -1).", "",
              "| files | decoder | ms | vs OpenCV | pixels |", "|---|---|---:|---:|---|"]
    for name, d in decoders.items():
        base = next(v[0] for k, v in d.items() if k.startswith("OpenCV") and isinstance(v, tuple))
        for decoder, (seconds, quality) in ((k, v) for k, v in d.items() if isinstance(v, tuple)):
            if d["kind"] == "png":
                verdict = "identical" if quality else "**differ**"
            else:
                verdict = "full decode" if quality == float("inf") else f"{quality:.1f} dB after resize"
            lines.append(f"| {name} ({d['files']}) | {decoder} | {seconds * 1e3:.2f} | {seconds / base:.2f} | {verdict} |")
    lines += ["", f"Start-up: `cxr --help` takes {help_seconds:.2f} s (new process, best of 3; goal 0.3 s). "
                  "First image after: from just before `cxr shard build` starts to the first image decoded, "
                  "resized and encoded in a worker (goal 0.3 s).", "",
              "`build / floor` is the build's throughput as a share of what decoding alone allows (100% would "
              "mean start-up, resizing, encoding and writing cost nothing)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(run(args.workdir.resolve()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
