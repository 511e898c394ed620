"""DICOM files become pixels by the README's rules, checked against a plain NumPy reference written here.

The DICOMs are written with pydicom in temp dirs (8/12/16-bit, signed and unsigned, junk bits above Bits
Stored, rescale, windows, VOI and Modality LUT sequences, MONOCHROME1, padding, compressed syntaxes), plus
pydicom's own compressed test files and a real DX chest radiograph shipped in the `deid-data` package.
The rejects go through a real `cxr shard build`; `cxr predict` on a .dcm gives the shard's tensor.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, ExplicitVRLittleEndian,  # noqa: E402
                         RLELossless, UID)

from cxrshards.dicom import decoder_plugin  # noqa: E402
from cxrshards.pixels import PixelError, fit_resize, load_gray, prepare  # noqa: E402
from manifests.table import Manifest, write_manifest  # noqa: E402

DX = "1.2.840.10008.5.1.4.1.1.1.1"   # Digital X-Ray Image Storage - For Presentation


# --- writing DICOMs -----------------------------------------------------------------------------------


def dicom_dataset(stored: np.ndarray, bits_stored: int, words: np.ndarray | None = None,
                  photometric: str = "MONOCHROME2", **tags) -> Dataset:
    """A one-frame gray DX dataset holding `stored` (or the raw `words`, junk bits included)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX, "1.2.826.0.1.3680043.8.498.1", "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = stored.itemsize * 8, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(np.issubdtype(stored.dtype, np.signedinteger))
    ds.PixelData = (stored if words is None else words).tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def write(path: Path, ds: Dataset) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def lut_item(first: int, bits: int, data) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", [len(data), first, bits])        # LUT Descriptor
    item.add_new(0x00283006, "US", [int(v) for v in data])          # LUT Data
    return item


def image(shape, lo: int, hi: int, dtype, seed: int = 0) -> np.ndarray:
    """A smooth ramp with noise spanning lo..hi (both reached)."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1])) / 2
    v = np.clip(ramp + rng.normal(0, 0.08, shape), 0, 1)
    v = np.round(lo + v * (hi - lo)).astype(np.int64)
    v.flat[0], v.flat[-1] = lo, hi
    return v.astype(dtype)


# --- the plain reference of the README rules ------------------------------------------------------


def _lut(item: Dataset) -> tuple[int, int, np.ndarray]:
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    data = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data, np.int64)
    return first, bits, data.astype(np.int64)[: n or 65536]


def reference(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """The README's DICOM rules, per pixel, in plain NumPy."""
    s = stored.astype(np.int64)
    if "PixelPaddingValue" in ds:
        a = int(ds.PixelPaddingValue)
        b = int(ds.get("PixelPaddingRangeLimit", a))
        pad = (s >= min(a, b)) & (s <= max(a, b))
    else:
        pad = np.zeros(s.shape, bool)
    if "ModalityLUTSequence" in ds:                                  # Modality LUT
        first, _bits, data = _lut(ds.ModalityLUTSequence[0])
        x = data[np.clip(s - first, 0, len(data) - 1)].astype(np.float64)
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        x = s * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    else:
        x = s.astype(np.float64)
    if "VOILUTSequence" in ds:                                       # first VOI LUT ...
        first, bits, data = _lut(ds.VOILUTSequence[0])
        u = data[np.clip(np.floor(x).astype(np.int64) - first, 0, len(data) - 1)] / (2**bits - 1)
    elif "WindowCenter" in ds:                                       # ... or first window
        c = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        w = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        c, w = float(c), float(w)
        function = ds.get("VOILUTFunction", "LINEAR")
        if function == "SIGMOID":
            u = 1 / (1 + np.exp(-4 * (x - c) / w))
        elif function == "LINEAR_EXACT":
            u = np.clip((x - c) / w + 0.5, 0, 1)
        elif w == 1:
            u = (x > c - 0.5).astype(np.float64)
        else:
            u = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    else:                                                            # ... else own min..max
        lo, hi = x[~pad].min(), x[~pad].max()
        u = (x - lo) / (hi - lo)
    v = np.floor(255 * u + 0.5).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        v = 255 - v
    v[pad] = 0
    return v


# --- the rules, case by case ---------------------------------------------------------------------------

U12 = image((40, 52), 0, 4095, np.uint16, seed=1)
S16 = image((40, 52), -3000, 3000, np.int16, seed=2)
S12 = image((40, 52), -2048, 2047, np.int16, seed=3)
JUNK = (np.arange(40 * 52).reshape(40, 52) % 16).astype(np.uint16) << 12   # bits above Bits Stored


def _padded(stored: np.ndarray, value: int) -> np.ndarray:
    out = stored.copy()
    out[:4], out[:, -5:] = value, value
    return out


def _cases() -> dict[str, tuple[np.ndarray, Dataset]]:
    sqrt_lut = np.round(np.sqrt(np.linspace(0, 1, 3000)) * 3000).astype(int)   # 12-bit LUT, top 3000
    return {
        "8-bit unsigned, own min..max": (s := image((30, 41), 20, 200, np.uint8), dicom_dataset(s, 8)),
        "8-bit signed, window": (s := image((30, 41), -100, 120, np.int8), dicom_dataset(
            s, 8, WindowCenter=10, WindowWidth=150)),
        "12-bit in 16, junk high bits, rescale, first of two windows": (U12, dicom_dataset(
            U12, 12, words=U12 | JUNK, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=[3000, 1],
            WindowWidth=[4000, 2])),
        "16-bit signed, rescale, window": (S16, dicom_dataset(
            S16, 16, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-500, WindowWidth=3000)),
        "12-bit signed in 16, junk sign bits, own min..max": (S12, dicom_dataset(
            S12, 12, words=(S12.view(np.uint16) & 0x0FFF) | JUNK)),
        "non-integer rescale, own min..max": (U12, dicom_dataset(
            U12, 12, RescaleSlope=0.37, RescaleIntercept=12.5)),
        "negative rescale slope, own min..max": (U12, dicom_dataset(
            U12, 12, RescaleSlope=-1, RescaleIntercept=4095)),
        "VOI LUT sequence beats the window": (U12, dicom_dataset(
            U12, 12, VOILUTSequence=Sequence([lut_item(500, 12, sqrt_lut)]), WindowCenter=100, WindowWidth=10)),
        "Modality LUT sequence, then window": (s := image((30, 41), 0, 255, np.uint8), dicom_dataset(
            s, 8, ModalityLUTSequence=Sequence([lut_item(0, 16, 4095 - 16 * np.arange(256))]),
            WindowCenter=2000, WindowWidth=3000)),
        "Modality LUT sequence, own min..max": (s := image((30, 41), 40, 90, np.uint8), dicom_dataset(
            s, 8, ModalityLUTSequence=Sequence([lut_item(0, 16, (np.arange(256) - 64) ** 2)]))),
        "MONOCHROME1, window": (U12, dicom_dataset(
            U12, 12, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)),
        "MONOCHROME1, own min..max": (U12, dicom_dataset(U12, 12, photometric="MONOCHROME1")),
        "padding left out of min..max": (p := _padded(image((40, 52), 1000, 3000, np.uint16), 0), dicom_dataset(
            p, 12, PixelPaddingValue=0, RescaleSlope=1, RescaleIntercept=-1024)),
        "padding above the image comes out black": (p := _padded(image((40, 52), 100, 3000, np.uint16), 4095),
                                                      dicom_dataset(p, 12, PixelPaddingValue=4095, RescaleSlope=1,
                                                                    RescaleIntercept=-1024)),
        "padding, MONOCHROME1": (p := _padded(image((40, 52), 100, 3000, np.uint16), 4095), dicom_dataset(
            p, 12, photometric="MONOCHROME1", PixelPaddingValue=4095)),
        "padding range limit, signed, window": (p := _padded(S16, -2000) - (np.arange(52) % 3 == 0) * 200 * (S16 == -2000),
                                                dicom_dataset(p.astype(np.int16), 16, PixelPaddingValue=-2000,
                                                              PixelPaddingRangeLimit=-2200, WindowCenter=0,
                                                              WindowWidth=2000)),
        "LINEAR_EXACT window": (U12, dicom_dataset(
            U12, 12, WindowCenter=2000.5, WindowWidth=1000, VOILUTFunction="LINEAR_EXACT")),
        "SIGMOID window": (U12, dicom_dataset(U12, 12, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID")),
        "window width 1 is a threshold": (U12, dicom_dataset(U12, 12, WindowCenter=2048, WindowWidth=1)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_pixels_follow_the_rules(name, tmp_path):
    stored, ds = CASES[name]
    path = write(tmp_path / "x.dcm", ds)
    want = reference(pydicom.dcmread(path), stored.astype(np.int64))
    got = load_gray(path)
    assert got.dtype == np.uint8 and got.shape == stored.shape
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert 0 < len(np.unique(got))                  # a real image, not a constant


def test_reference_sees_what_the_cases_mean():
    """The cases exercise what they claim (so a rule broken in the code shows up as a difference)."""
    _, ds = CASES["padding left out of min..max"]
    ref = reference(ds, CASES["padding left out of min..max"][0].astype(np.int64))
    assert ref[:4].max() == 0 and ref[5:, :-5].max() == 255 and ref[5:, :-5].min() == 0
    mono1 = reference(CASES["MONOCHROME1, own min..max"][1], U12.astype(np.int64))
    assert mono1.flat[0] == 255 and mono1.flat[-1] == 0       # stored min (U12 corner) is white


def test_compressed_syntaxes_decode_to_the_same_pixels(tmp_path):
    ds = dicom_dataset(U12, 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=800, WindowWidth=3000)
    want = reference(ds, U12.astype(np.int64))
    for uid in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        packed = dicom_dataset(U12, 12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=800, WindowWidth=3000)
        packed.compress(uid)
        path = write(tmp_path / f"{uid}.dcm", packed)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid
        np.testing.assert_array_equal(load_gray(path), want, err_msg=uid.name)


def test_jpeg_baseline_decodes_with_the_pinned_decoder(tmp_path):
    from pylibjpeg import decode as pylibjpeg_decode

    gray = cv2.GaussianBlur(image((64, 80), 0, 255, np.uint8, seed=4), (0, 0), 2)
    ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    ds = dicom_dataset(gray, 8, photometric="MONOCHROME1", WindowCenter=120, WindowWidth=200)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    path = write(tmp_path / "baseline.dcm", ds)
    stored = pylibjpeg_decode(jpeg.tobytes())                   # libjpeg, straight from the JPEG bytes
    np.testing.assert_array_equal(load_gray(path), reference(ds, stored.astype(np.int64)))
    assert np.abs(stored.astype(int) - cv2.imdecode(jpeg, cv2.IMREAD_GRAYSCALE)).max() <= 1


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "693_J2KI.dcm",
                                  "MR_small_RLE.dcm", "rtdose_rle_1frame.dcm"])
def test_pydicom_test_files(name):
    """pydicom's own compressed files (in its wheel, offline): 12-bit JPEG extended, near-lossless JPEG-LS,
    signed 14-bit JPEG 2000 with a window, RLE, and 32-bit RLE (the per-pixel path, no table)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="" if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
                           else "pylibjpeg")
    np.testing.assert_array_equal(load_gray(path), reference(ds, ds.pixel_array.astype(np.int64)))


def test_compressed_syntaxes_have_a_pinned_decoder():
    """JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000 and RLE decode through the pylibjpeg plugins
    pyproject.toml installs, whatever else is installed."""
    from pydicom.pixels import get_decoder

    for uid in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"):
        assert decoder_plugin(get_decoder(UID(uid))) == "pylibjpeg", UID(uid).name
    assert decoder_plugin(get_decoder(ExplicitVRLittleEndian)) == ""


def test_found_by_magic_or_suffix(tmp_path):
    ds = dicom_dataset(U12, 12, WindowCenter=2048, WindowWidth=4096)
    want = reference(ds, U12.astype(np.int64))
    magic = write(tmp_path / "scan.img", ds)                        # DICM at byte 128, no DICOM suffix
    np.testing.assert_array_equal(load_gray(magic), want)
    bare = tmp_path / "BARE.DCM"                                     # no preamble, no DICM: by suffix
    bare.write_bytes(magic.read_bytes()[132:])
    np.testing.assert_array_equal(load_gray(bare), want)
    with pytest.raises(PixelError) as err:                           # by suffix, but not a DICOM at all
        (tmp_path / "text.dcm").write_bytes(b"hello, not a dicom" * 20)
        load_gray(tmp_path / "text.dcm")
    assert err.value.reason == "corrupt"


@pytest.mark.parametrize("tags, reason", [
    ({"WindowCenter": 100, "WindowWidth": 0}, "DICOM: bad window (width 0 < 1)"),
    ({"WindowCenter": 100, "WindowWidth": 0, "VOILUTFunction": "SIGMOID"}, "DICOM: bad window (width 0 <= 0)"),
    ({"WindowCenter": 100, "WindowWidth": 50, "VOILUTFunction": "GAMMA"}, "DICOM: unsupported VOI LUT Function GAMMA"),
])
def test_bad_window_is_a_reject(tags, reason, tmp_path):
    path = write(tmp_path / "w.dcm", dicom_dataset(U12, 12, **tags))
    with pytest.raises(PixelError) as err:
        load_gray(path)
    assert err.value.reason == reason and str(path) in str(err.value)


def test_resize_goes_through_fit_resize(tmp_path):
    big = image((300, 240), 0, 4095, np.uint16, seed=5)
    ds = dicom_dataset(big, 12, WindowCenter=2048, WindowWidth=4096)
    path = write(tmp_path / "big.dcm", ds)
    for fit in ("pad", "squash", "crop"):
        np.testing.assert_array_equal(prepare(path, 32, fit), fit_resize(reference(ds, big.astype(np.int64)), 32, fit))


def test_real_chest_radiograph_from_deid_data():
    """A real DX chest radiograph (a veterinary AP chest, 2614 x 3072, 12-bit, windowed) from PyPI's
    `deid-data` package (in the test extra)."""
    deid_data = pytest.importorskip("deid_data", reason="the real DX file comes with `pip install deid-data`")
    path = Path(deid_data.__file__).parent / "data" / "animals" / "cat.dcm"
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.BodyPartExamined, ds.PhotometricInterpretation) == ("DX", "CHEST", "MONOCHROME2")
    got = load_gray(path)
    np.testing.assert_array_equal(got, reference(ds, ds.pixel_array.astype(np.int64)))
    assert got.shape == (2614, 3072) and 40 < got.mean() < 200


# --- rejects through a real shard build, and `cxr predict` ---------------------------------------------

REJECTS = {
    "multiframe": "DICOM: multi-frame (3 frames)",
    "rgb": "DICOM: colour (RGB)",
    "nopixels": "DICOM: no pixel data",
    "mpeg": "DICOM: unsupported transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2 Main Profile / Main Level)",
    "truncated": "truncated",
}


def _reject_files(raw: Path) -> dict[str, Path]:
    frames = np.stack([U12] * 3)
    multi = dicom_dataset(U12, 12, NumberOfFrames=3)
    multi.PixelData = frames.tobytes()
    rgb = dicom_dataset(U12.astype(np.uint8), 8, photometric="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    rgb.PixelData = U12.astype(np.uint8)[:, :, None].repeat(3, 2).tobytes()
    nopix = dicom_dataset(U12, 12)
    del nopix.PixelData
    mpeg = dicom_dataset(U12, 12)
    mpeg.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    mpeg["PixelData"].VR = "OB"
    short = dicom_dataset(U12, 12)
    short.PixelData = U12.tobytes()[: U12.nbytes // 2]
    made = {"multiframe": multi, "rgb": rgb, "nopixels": nopix, "mpeg": mpeg, "truncated": short}
    return {key: write(raw / "bad" / f"{key}.dcm", ds) for key, ds in made.items()}


GOOD = ["16-bit signed, rescale, window", "MONOCHROME1, window", "padding left out of min..max",
        "VOI LUT sequence beats the window", "12-bit signed in 16, junk sign bits, own min..max",
        "8-bit unsigned, own min..max"]


@pytest.fixture(scope="module")
def dicom_build(tmp_path_factory):
    from cli.app import _register, app

    _register()
    tmp = tmp_path_factory.mktemp("dicom_build")
    raw = tmp / "raw"
    good = {f"good{i}": write(raw / "good" / f"good{i}.DCM", CASES[name][1]) for i, name in enumerate(GOOD)}
    bad = _reject_files(raw)
    splits = ["train", "train", "train", "valid", "valid", "test"]
    rows = [(k, p, s) for (k, p), s in zip(good.items(), splits)] + [(k, p, "train") for k, p in bad.items()]
    table = pd.DataFrame({"key": [r[0] for r in rows], "source": "dicom",
                          "path": [r[1].relative_to(raw).as_posix() for r in rows],
                          "patient_id": [r[0] for r in rows], "study_id": None, "view": None,
                          "split": [r[2] for r in rows],
                          "Finding": np.float32([i % 2 for i in range(len(rows))])})
    manifest = write_manifest(Manifest(table=table, labels=["Finding"], meta={"source": "dicom", "raw": str(raw)}),
                              tmp / "dicom.parquet")
    result = CliRunner().invoke(app, ["shard", "build", "--manifest", str(manifest), "--raw", str(raw),
                                      "--out", str(tmp / "shards"), "--size", "32", "--workers", "1",
                                      "--max-reject-fraction", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp, raw, good, tmp / "shards" / "dicom-32"


def test_shard_build_rejects_with_reasons(dicom_build):
    from cxrshards import open_shards

    _tmp, raw, good, shard_dir = dicom_build
    rejects = pd.read_parquet(shard_dir / "rejects.parquet")
    assert dict(zip(rejects["key"], rejects["reason"])) == REJECTS
    card = json.loads((shard_dir / "dataset.json").read_text())
    assert card["rejects"] == len(REJECTS)
    for split in ("train", "valid", "test"):
        for img, _labels, key in open_shards(shard_dir, split, format="wds"):
            stored, ds = CASES[GOOD[int(key[4:])]]
            want = fit_resize(reference(ds, stored.astype(np.int64)), 32, "pad")
            np.testing.assert_array_equal(img[0].numpy(), want, err_msg=key)


def test_predict_on_a_dcm_equals_the_shard_tensor(dicom_build):
    from cxrshards import open_shards
    from trainer.augment import AugmentSpec, augment_batch
    from trainer.config import TrainConfig
    from trainer.fitting import fit
    from trainer.predict import load_run, predict_tensor

    torch.set_num_threads(1)
    tmp, _raw, good, shard_dir = dicom_build
    run = fit(TrainConfig(shards=str(shard_dir), out=str(tmp / "run"), epochs=1, batch_size=2, workers=0,
                          device="cpu", augment="none", flip=False))
    loaded = load_run(run, "best", "cpu")
    inf = loaded.inference
    spec = AugmentSpec(flip=False, light=False, mean=inf.mean, std=inf.std)
    seen = 0
    for split in ("train", "valid", "test"):
        for img, _labels, key in open_shards(shard_dir, split, format="wds"):
            assert torch.equal(predict_tensor(good[key], loaded), augment_batch(img[None], spec, None)), key
            seen += 1
    assert seen == len(GOOD)
    from cli.app import app
    bad = CliRunner().invoke(app, ["predict", str(_raw / "bad" / "multiframe.dcm"), "--run", str(run), "--device", "cpu"])
    assert bad.exit_code == 1 and "DICOM: multi-frame (3 frames)" in bad.output and "Traceback" not in bad.output
