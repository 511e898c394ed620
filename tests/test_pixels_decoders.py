"""The PNG decoder chosen for speed (libspng via pyspng, 8-bit gray) gives exactly OpenCV's pixels."""
from __future__ import annotations

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


def test_spng_decodes_real_and_phantom_nih_pngs_exactly_as_opencv(tmp_path, shared_data, monkeypatch):
    spng = CountingSpng(pytest.importorskip("pyspng"))
    monkeypatch.setattr(px, "_pyspng", spng)
    make_demo_data("nih", tmp_path / "nih", 2, 256, seed=0)
    files = sorted((shared_data / "real" / "nih-1024").glob("*.png")) + sorted((tmp_path / "nih").rglob("*.png"))
    assert len(files) >= 4
    for path in files:
        data = path.read_bytes()
        assert px._spng_gray(data), f"{path.name}: an 8-bit gray PNG should take the libspng path"
        want = opencv_gray(path)
        got = px.load_gray(path)
        assert got.dtype == np.uint8 and np.array_equal(got, want), path.name
        assert np.array_equal(px.prepare(path, 64, "pad"), px.fit_resize(want, 64, "pad"))
    assert spng.calls == 2 * len(files)   # the fast decoder did the work


def test_other_pngs_stay_with_opencv_and_broken_gray_pngs_are_rejected(tmp_path, shared_data):
    rgb = np.dstack([np.arange(64, dtype=np.uint8).reshape(8, 8)] * 3)
    assert cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    assert cv2.imwrite(str(tmp_path / "g16.png"), np.arange(64, dtype=np.uint16).reshape(8, 8) * 999)
    for name in ("rgb.png", "g16.png"):
        assert not px._spng_gray((tmp_path / name).read_bytes())
    data = bytearray((shared_data / "real" / "nih-1024" / "00000001_000.png").read_bytes())
    data[len(data) // 2] ^= 0xFF   # a flipped bit inside the image data: CRC and inflate fail
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(px.PixelError) as info:
        px.load_gray(tmp_path / "bad.png")
    assert info.value.reason == "corrupt"
