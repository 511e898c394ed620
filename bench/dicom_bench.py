"""DICOM decode: cxr's DICOM load vs pydicom's own `pixel_array` plus the same windowing written plainly.

Inputs (generated into WORKDIR/dicom_bench once, reused afterwards): N phantom chest films of 2500 x 3000,
12-bit stored in 16, each as uncompressed Explicit VR Little Endian, JPEG 2000 lossless and JPEG-LS
lossless. Every third film is MONOCHROME1; half carry a Rescale Slope/Intercept and a Window Center/Width
(two values each, the first is used), the other half neither (own min..max).

Measured, CPU time per image in one process (`time.process_time`: unaffected by other load), best of
REPEATS interleaved passes:
- plain: read the file, `pydicom.dcmread` + `ds.pixel_array` (the same pylibjpeg decoder cxr pins), then
  the README's rules written plainly in NumPy per pixel (rescale, first window or min..max, round,
  MONOCHROME1 inversion) -> uint8;
- cxr: `cxrshards.pixels.load_gray(path)` (the shard build's and `cxr predict`'s DICOM path).
Both give the same bytes (checked). Target: cxr <= 1.2 x plain.

`run(workdir) -> str` returns the markdown section. Standalone: `python bench/dicom_bench.py [--workdir DIR]`.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phantom import render_chest  # noqa: E402
from cxrshards.pixels import load_gray  # noqa: E402
from manifests.atomic import atomic_path  # noqa: E402

N = 24
HEIGHT, WIDTH = 3000, 2500
REPEATS = 2
TARGET = 1.2
SYNTAXES = {"uncompressed": "1.2.840.10008.1.2.1", "JPEG 2000 lossless": "1.2.840.10008.1.2.4.90",
            "JPEG-LS lossless": "1.2.840.10008.1.2.4.80"}


# --- inputs ------------------------------------------------------------------------------------------


def film(i: int) -> np.ndarray:
    """A 12-bit phantom film: the 8-bit phantom drawing spread to 0..4095 with fine noise."""
    gray = render_chest(HEIGHT, WIDTH, seed=(7, i)).astype(np.float32)
    noise = np.random.default_rng([7, i]).normal(0, 6, gray.shape).astype(np.float32)
    return np.clip(gray * 16 + noise, 0, 4095).astype(np.uint16)


def dataset(stored: np.ndarray, i: int):
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", f"1.2.826.0.1.3680043.8.498.{i + 1}", "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1" if i % 3 == 0 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if i % 2 == 0:
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = [900 + 10 * i, 40], [3000 - 20 * i, 400]
    if ds.PhotometricInterpretation == "MONOCHROME1":
        stored = 4095 - stored
    ds.PixelData = stored.tobytes()
    return ds


def prepare_inputs(workdir: Path) -> dict[str, list[Path]]:
    """{syntax name: N files}, generated once."""
    base = workdir / "dicom_bench"
    stamp = base / "inputs.json"
    want = {"n": N, "height": HEIGHT, "width": WIDTH, "syntaxes": SYNTAXES}
    files = {name: [base / name.replace(" ", "-") / f"film{i:03d}.dcm" for i in range(N)] for name in SYNTAXES}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(p.is_file() for v in files.values() for p in v):
        return files
    print(f"   generating {N} films x {len(SYNTAXES)} syntaxes ({WIDTH} x {HEIGHT}, 12-bit) in {base} ...", flush=True)
    from pydicom.uid import UID

    for i in range(N):
        stored = film(i)
        for name, uid in SYNTAXES.items():
            ds = dataset(stored, i)
            if uid != "1.2.840.10008.1.2.1":
                ds.compress(UID(uid))
            path = files[name][i]
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                ds.save_as(tmp, enforce_file_format=True)
    stamp.write_text(json.dumps(want))
    return files


# --- the two contenders ------------------------------------------------------------------------------


def plain_load(path: Path) -> np.ndarray:
    """pydicom's pixel_array + the README's rules written plainly, per pixel (no lookup table)."""
    import pydicom

    with open(path, "rb") as fh:
        ds = pydicom.dcmread(io.BytesIO(fh.read()))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.pixel_array_options(decoding_plugin="pylibjpeg")
    x = ds.pixel_array.astype(np.float64)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        x = x * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "WindowCenter" in ds:
        c, w = float(ds.WindowCenter[0]), float(ds.WindowWidth[0])
        u = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    else:
        lo, hi = x.min(), x.max()
        u = (x - lo) / (hi - lo)
    v = np.floor(255 * u + 0.5).astype(np.uint8)
    return 255 - v if ds.PhotometricInterpretation == "MONOCHROME1" else v


def cpu_per_image(fn, files: list[Path]) -> float:
    started = time.process_time()
    for path in files:
        fn(path)
    return (time.process_time() - started) / len(files)


# --- the section -------------------------------------------------------------------------------------


def run(workdir: Path) -> str:
    files = prepare_inputs(Path(workdir))
    for name, paths in files.items():   # same bytes from both (and warm imports / decoders)
        for path in paths[:2]:
            if not np.array_equal(plain_load(path), load_gray(path)):
                raise AssertionError(f"cxr and the plain rules disagree on {path}")
    best: dict[tuple[str, str], float] = {}
    for _ in range(REPEATS):
        for name, paths in files.items():
            for side, fn in (("plain", plain_load), ("cxr", load_gray)):
                seconds = cpu_per_image(fn, paths)
                best[name, side] = min(seconds, best.get((name, side), float("inf")))
    lines = [
        "## DICOM decode",
        "",
        f"{N} phantom chest films of {WIDTH} x {HEIGHT}, 12-bit in 16, per transfer syntax; a third MONOCHROME1, "
        "half with rescale and window, half own min..max. CPU time per image in one process, best of "
        f"{REPEATS} interleaved passes. plain = read + `pydicom.dcmread` + `pixel_array` (same pylibjpeg "
        "decoder) + the README's rules written plainly in NumPy; cxr = `cxrshards.pixels.load_gray` (the "
        "shard build's DICOM path). Both give identical bytes (checked).",
        "",
        "| transfer syntax | plain ms/image | cxr ms/image | cxr / plain | target | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in files:
        plain, ours = best[name, "plain"], best[name, "cxr"]
        ratio = ours / plain
        verdict = "met" if ratio <= TARGET else "**missed**"
        lines.append(f"| {name} | {plain * 1e3:.1f} | {ours * 1e3:.1f} | {ratio:.2f}x | <= {TARGET:.1f}x | {verdict} |")
    lines += ["", "cxr evaluates the rules once per possible stored value (a 256- or 65,536-entry table) and maps "
                  "the image with one lookup, so beyond pydicom's decode it costs one pass over the pixels."]
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
