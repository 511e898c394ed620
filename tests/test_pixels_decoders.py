"""The PNG decoders chosen for speed (libdeflate inflate + libspng unfilter, or libspng alone, 8-bit gray)
give exactly OpenCV's pixels."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from cxrshards import pixels as px
from phantom import make_demo_data


def opencv_gray(path) -> np.ndarray:
    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)


class CountingSpng:
    def __init__(self, module) -> None:
        self.module, self.calls = module, 0

    def load(self, data, *args):
        self.calls += 1
        return self.module.load(data, *args)


def test_spng_decodes_real_and_phantom_nih_pngs_exactly_as_opencv(tmp_path, real_data, monkeypatch):
    spng = CountingSpng(pytest.importorskip("pyspng"))
    monkeypatch.setattr(px, "_pyspng", spng)
    make_demo_data("nih", tmp_path / "nih", 2, 256, seed=0)
    files = sorted((real_data / "real" / "nih-1024").glob("*.png")) + sorted((tmp_path / "nih").rglob("*.png"))
    assert len(files) >= 4
    for path in files:
        data = path.read_bytes()
        assert px._spng_gray(data), f"{path.name}: an 8-bit gray PNG should take the libspng path"
        want = opencv_gray(path)
        got = px.load_gray(path)
        assert got.dtype == np.uint8 and np.array_equal(got, want), path.name
        assert np.array_equal(px.prepare(path, 64, "pad"), px.fit_resize(want, 64, "pad"))
    assert spng.calls == 2 * len(files)   # the fast decoder did the work


def test_other_pngs_stay_with_opencv_and_broken_gray_pngs_are_rejected(tmp_path, real_data):
    rgb = np.dstack([np.arange(64, dtype=np.uint8).reshape(8, 8)] * 3)
    assert cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    assert cv2.imwrite(str(tmp_path / "g16.png"), np.arange(64, dtype=np.uint16).reshape(8, 8) * 999)
    for name in ("rgb.png", "g16.png"):
        assert not px._spng_gray((tmp_path / name).read_bytes())
    data = bytearray((real_data / "real" / "nih-1024" / "00000001_000.png").read_bytes())
    data[len(data) // 2] ^= 0xFF   # a flipped bit inside the image data: CRC and inflate fail
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(px.PixelError) as info:
        px.load_gray(tmp_path / "bad.png")
    assert info.value.reason == "corrupt"


class CountingInflate:
    def __init__(self, inflate) -> None:
        self.inflate, self.calls = inflate, 0

    def __call__(self, data, **kwargs):
        self.calls += 1
        return self.inflate(data, **kwargs)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_libdeflate_path_decodes_real_nih_pngs_exactly_as_opencv(tmp_path, real_data, monkeypatch):
    """NIH's PNGs (1024 px: IDATs only; 512 px: gAMA, bKGD, tIME, tEXt too) take the libdeflate path, and
    give OpenCV's pixels, also through `prepare`."""
    if px._inflate is None:
        pytest.skip("imagecodecs is not installed")
    inflate = CountingInflate(px._inflate)
    monkeypatch.setattr(px, "_inflate", inflate)
    files = sorted((real_data / "real").glob("nih-*/*.png"))
    assert len(files) >= 4
    for path in files:
        assert px._restored_png(path.read_bytes()) is not None, f"{path.name} should take the libdeflate path"
        want = opencv_gray(path)
        assert np.array_equal(px.load_gray(path), want), path.name
        assert np.array_equal(px.prepare(path, 224, "pad"), px.fit_resize(want, 224, "pad")), path.name
    assert inflate.calls == 3 * len(files)


def test_pngs_the_libdeflate_path_cannot_take_whole_fall_back_to_libspng(tmp_path, real_data):
    """A chunk that may change pixels (tRNS), interlacing, a damaged IDAT: plain libspng decodes or rejects
    them exactly as before."""
    if px._inflate is None:
        pytest.skip("imagecodecs is not installed")
    data = (real_data / "real" / "nih-1024" / "00000001_000.png").read_bytes()
    want = opencv_gray(real_data / "real" / "nih-1024" / "00000001_000.png")
    with_trns = data[:33] + png_chunk(b"tRNS", b"\0\0") + data[33:]
    assert px._restored_png(with_trns) is None
    (tmp_path / "trns.png").write_bytes(with_trns)
    assert np.array_equal(px.load_gray(tmp_path / "trns.png"), want)
    adam7 = data[:8] + png_chunk(b"IHDR", data[16:28] + b"\1") + data[33:]   # the interlace flag set
    assert px._restored_png(adam7) is None
    broken = bytearray(data)
    broken[len(broken) // 2] ^= 0x01   # one flipped bit in the image data: inflate fails
    assert px._restored_png(bytes(broken)) is None
    (tmp_path / "bad.png").write_bytes(bytes(broken))
    with pytest.raises(px.PixelError) as info:
        px.load_gray(tmp_path / "bad.png")
    assert info.value.reason == "corrupt"
    bad_crc = bytearray(data)
    bad_crc[33 + 8 + int.from_bytes(data[33:37], "big")] ^= 0x01   # the first IDAT's CRC: data intact
    assert px._restored_png(bytes(bad_crc)) is None      # libspng decides, as without the libdeflate path
