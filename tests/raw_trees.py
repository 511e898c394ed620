"""TEST FIXTURE: phantom raw trees in the exact layouts of real datasets, for tests of behaviour (not of real pixels).

`write_kermany` writes Kermany et al.'s pediatric pneumonia folder set as tests/data/real/kermany holds it:
the same 12 file names (`normal/NORMAL2-IM-NNNN-0001.jpeg`, `abnormal/personNNNN_bacteria_MMMM.jpeg`, two of
one patient), 8-bit gray baseline JPEGs (quality 95), landscape, each a quarter of its real counterpart's
size, drawn by `phantom.render_chest` (abnormal films show Pneumonia). Same arguments, same bytes.
"""
from __future__ import annotations

from pathlib import Path

import cv2

import phantom

# (class, file name, real height, real width) of tests/data/real/kermany
KERMANY = (
    ("abnormal", "person1946_bacteria_4874.jpeg", 592, 968),
    ("abnormal", "person1946_bacteria_4875.jpeg", 712, 1072),
    ("abnormal", "person1947_bacteria_4876.jpeg", 664, 1152),
    ("abnormal", "person1949_bacteria_4880.jpeg", 944, 1416),
    ("abnormal", "person1950_bacteria_4881.jpeg", 864, 1256),
    ("abnormal", "person1951_bacteria_4882.jpeg", 656, 1016),
    ("normal", "NORMAL2-IM-1427-0001.jpeg", 1416, 1776),
    ("normal", "NORMAL2-IM-1430-0001.jpeg", 1040, 1272),
    ("normal", "NORMAL2-IM-1431-0001.jpeg", 1416, 1736),
    ("normal", "NORMAL2-IM-1436-0001.jpeg", 928, 1288),
    ("normal", "NORMAL2-IM-1437-0001.jpeg", 1104, 1240),
    ("normal", "NORMAL2-IM-1438-0001.jpeg", 1104, 1328),
)


def gray_jpeg(img, quality: int = 95) -> bytes:
    ok, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def gray_png(img) -> bytes:
    ok, data = cv2.imencode(".png", img)
    assert ok
    return data.tobytes()


def write_kermany(out: Path, scale: int = 4, seed: int = 0) -> Path:
    """The 12-image Kermany layout under `out` (see the module docstring); returns `out`."""
    out = Path(out)
    for i, (cls, name, height, width) in enumerate(KERMANY):
        findings = {"Pneumonia": 1.0} if cls == "abnormal" else None
        img = phantom.render_chest(height // scale, width // scale, findings, "PA", (seed, 0xE4, i))
        path = out / cls / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gray_jpeg(img))
    return out


def phantom_film(name: str, height: int, width: int, seed: int = 0):
    """One phantom frontal film (uint8 height x width), its pixels a pure function of `name` and `seed`."""
    import zlib

    return phantom.render_chest(height, width, None, "PA", (seed, 0xF1, zlib.crc32(name.encode())))
