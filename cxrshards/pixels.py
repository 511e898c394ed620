"""Pixels: one raw image file in, one 8-bit gray SIZE x SIZE array out, exactly as a shard holds it.

Used per image by the shard builder's worker processes (so: one read, one decode, one resize) and by
`cxr predict` on raw files, so both paths give the same pixels.

Rules (the contract in docs/DESIGN.md, section 2):
- Gray conversion: colour images become ITU-R 601 luma (cv2.cvtColor), alpha is ignored; 16-bit and
  other non-8-bit images are scaled linearly by their own min..max range to 0..255 (a constant image
  becomes 0). EXIF orientation is ignored (the stored pixel grid is used, as PIL does by default).
- JPEG sources at least twice the target decode at 1/2, 1/4 or 1/8 scale inside libjpeg
  (IMREAD_REDUCED_GRAYSCALE_*): the largest factor that keeps the reduced image at least
  REDUCED_MARGIN x `target` on the side the fit scales to `target`; `prepare` then maps the fit's
  window onto the reduced grid exactly. Result: >= 40 dB PSNR against full decode + area resize.
- Decoders, chosen by measurement (bench/shard_bench.py `decoder_table`): 8-bit gray PNGs (NIH)
  decode in two steps: libdeflate (imagecodecs) inflates the image data, about 3x faster than zlib, and
  libspng (pyspng) unfilters it, handed over as the same PNG with the data stored uncompressed. Pixels
  are the same as OpenCV's libpng (inflating is exact); any PNG this path does not take in full (interlaced,
  chunks that may change pixels, a CRC or inflate error) goes to plain libspng, which also reports the
  errors. Every other PNG, and every JPEG (libjpeg-turbo's reduced decode), decodes with OpenCV; the other
  libjpeg-turbo wrappers (simplejpeg) give the same pixels no faster, as entropy decoding dominates.
- Resizing is area interpolation (cv2.INTER_AREA); `pad` keeps the aspect ratio and pads centred
  with 0, `squash` stretches, `crop` takes the centred square.
- DICOM files (.dcm, .dicom, or `DICM` at byte 128) become gray by the rules of `cxrshards.dicom`
  (Modality LUT, first VOI LUT or window, else own min..max, MONOCHROME1 inverted); the JPEG reduced
  decode does not apply to them, `fit_resize` does.
- Broken files raise `PixelError` whose `reason` is one of REJECT_REASONS, or for DICOM files one that
  starts with "DICOM: " and says what the file holds (multi-frame, colour, ...); the shard builder
  writes that reason into rejects.parquet.
"""
from __future__ import annotations

import io
import os

import cv2
import numpy as np

try:
    import pyspng as _pyspng   # libspng: faster than OpenCV's libpng on gray PNGs, same pixels
except ImportError:  # pragma: no cover - a dependency; OpenCV decodes the same pixels without it
    _pyspng = None
try:   # libdeflate: inflates PNG image data ~3x faster than zlib; its CRC-32 and Adler-32 are faster too
    from imagecodecs import deflate_adler32 as _adler32, deflate_crc32 as _crc32, deflate_decode as _inflate
except ImportError:  # pragma: no cover - a dependency; libspng alone decodes the same pixels without it
    _inflate = None

from cxrshards.choices import CODEC_EXTENSIONS, CODECS, FITS
from cxrshards.pixelerror import DICOM_REASON, REJECT_REASONS, PixelError
from manifests.errors import CxrError


# A 1/r decode stands in for r x r block means; resampling those blocks again by a factor close to 1
# smears the partial blocks at each output pixel's edges. Keeping the reduced side >= 1.25 x target
# holds the worst case on the real JPEGs in tests/data/real/kermany at 41.4 dB PSNR against full
# decode + area resize (every size 64..512 in steps of 8, every fit; 39.4 dB at 1.0, 43.0 at 1.5).
# MIMIC-sized sources (2544 x 3056) still decode at 1/8 for targets up to 305 (pad) / 254 (squash, crop).
REDUCED_MARGIN = 1.25
PNG_COMPRESSION = 1  # fixed zlib level for shard PNGs, with the RLE strategy: on X-rays at 224 px
# both smaller (~15%) and faster than the default strategy; level 6 saves ~5% more at 3-4x the time

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_TAIL = 256  # trailing bytes searched for the end marker (tolerates a little padding after it)
_NO_ROTATE = cv2.IMREAD_IGNORE_ORIENTATION
_REDUCED = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
# JPEG start-of-frame markers: C0..CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


# --- reading and decoding ----------------------------------------------------------------------


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, or PixelError 'missing' / 'unreadable' / 'zero bytes'."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise PixelError("missing", path) from None
    except OSError as exc:  # permission denied, a directory, an I/O error
        raise PixelError("unreadable", path, exc.strerror or type(exc).__name__) from None
    if not data:
        raise PixelError("zero bytes", path)
    return data


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header without decoding; None if not found."""
    if not data.startswith(_JPEG_SOI):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers carry no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no frame header before it
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return (width, height) if width > 0 and height > 0 else None
        i += 2 + length
    return None


def reduction_factor(width: int, height: int, target: int | None, fit: str | None = None) -> int:
    """Largest r in (8, 4, 2, 1) such that a 1/r decode still covers REDUCED_MARGIN x `target`
    on the side the fit scales to `target`.

    `pad` scales the long side to `target`; `squash` and `crop` scale the short side; an unknown fit
    (None) takes the short side, safe for all three. So r > 1 only for sources more than twice the
    target, and the final area resize always shrinks.
    """
    if not target:
        return 1
    side = max(width, height) if fit == "pad" else min(width, height)
    for r in (8, 4, 2):
        if side >= r * target * REDUCED_MARGIN:
            return r
    return 1


Shape = tuple[int, int]


def _decode_bytes(data: bytes, path, target: int | None, fit: str | None) -> tuple[np.ndarray, int, Shape | None]:
    """-> (decoded array, reduction factor r, full (height, width) when r > 1)."""
    from cxrshards import dicom   # imported on first use: pydicom loads only where DICOMs are read

    if dicom.is_dicom(path, data):
        return dicom.decode_dicom(data, path), 1, None
    buf = np.frombuffer(data, dtype=np.uint8)
    tail = data[-_TAIL:]
    r, full = 1, None
    if data.startswith(_JPEG_SOI):
        if _JPEG_EOI not in tail:
            raise PixelError("truncated", path, "no JPEG end-of-image marker")
        size = jpeg_size(data)
        if size is not None:
            r, full = reduction_factor(size[0], size[1], target, fit), (size[1], size[0])
        flags = (_REDUCED[r] if r > 1 else cv2.IMREAD_GRAYSCALE) | _NO_ROTATE
    else:
        if data.startswith(_PNG_SIGNATURE) and b"IEND" not in tail:
            raise PixelError("truncated", path, "no PNG IEND chunk")
        if _spng_gray(data):
            return _spng_decode(data, path), 1, None
        flags = cv2.IMREAD_UNCHANGED | _NO_ROTATE
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as exc:
        raise PixelError("corrupt", path, str(exc).strip().splitlines()[-1][:120]) from None
    if img is None or img.size == 0:
        raise PixelError("corrupt", path, "not a decodable image")
    if r > 1 and img.shape[:2] != (-(-full[0] // r), -(-full[1] // r)):
        raise PixelError("corrupt", path, f"reduced decode gave {img.shape[:2]}, header says {full}")
    return img, r, (full if r > 1 else None)


def _spng_gray(data: bytes) -> bool:
    """A plain 8-bit gray PNG (IHDR bit depth 8, colour type 0), decoded by libspng when pyspng is installed?
    (pyspng 0.1.4 returns 16-bit gray as two channels: those stay with OpenCV.)"""
    return (_pyspng is not None and len(data) > 25 and data.startswith(_PNG_SIGNATURE)
            and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 0)


# Chunks that change no decoded gray value, neither OpenCV's nor libspng's as pyspng calls it (gamma and
# background are not applied; NIH's 512 px PNGs carry both): a PNG holding only these besides IHDR, IDAT and
# IEND may be re-stored without them.
_INERT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"tIME", b"pHYs", b"gAMA", b"bKGD"})
_STORED_BLOCK = 65535       # the largest stored deflate block
_IEND_CHUNK = b"\0\0\0\0IEND\xaeB`\x82"


def _restored_png(data: bytes) -> bytes | None:
    """The same non-interlaced 8-bit gray PNG with its image data inflated by libdeflate and stored
    uncompressed (zlib stored blocks), so libspng only unfilters; None when the file is anything else
    or fails a check (IHDR/IDAT CRC, inflate, Adler-32, length): plain libspng then decodes or rejects it."""
    if _inflate is None or data[8:16] != b"\0\0\0\rIHDR" or data[26:29] != b"\0\0\0":
        return None   # (compression, filter, interlace) = (0, 0, 0); bit depth and colour type: _spng_gray
    view = memoryview(data)
    if _crc32(view[12:29]) != int.from_bytes(data[29:33], "big"):
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    parts, i, end = [], 33, len(data)
    while True:
        if i + 12 > end:
            return None
        n = int.from_bytes(data[i : i + 4], "big")
        kind = data[i + 4 : i + 8]
        if kind == b"IEND":
            break
        if i + 12 + n > end:
            return None
        if kind == b"IDAT":
            if _crc32(view[i + 4 : i + 8 + n]) != int.from_bytes(data[i + 8 + n : i + 12 + n], "big"):
                return None
            parts.append(view[i + 8 : i + 8 + n])
        elif kind not in _INERT_CHUNKS:
            return None
        i += 12 + n
    rows = height * (width + 1)    # one filter byte per row
    try:
        raw = _inflate(parts[0] if len(parts) == 1 else b"".join(parts), out=rows)
    except Exception:  # noqa: BLE001 - bad deflate data, Adler-32 mismatch or more data than rows
        return None
    if len(raw) != rows:
        return None
    src = memoryview(raw)
    body = [b"\x78\x01"]                        # zlib header: deflate, 32K window, no dictionary
    for start in range(0, rows, _STORED_BLOCK):
        size = min(_STORED_BLOCK, rows - start)
        body += (bytes((start + size == rows, size & 255, size >> 8, ~size & 255, (~size >> 8) & 255)),
                 src[start : start + size])
    body.append(_adler32(src).to_bytes(4, "big"))
    crc = _crc32(b"IDAT")
    for piece in body:
        crc = _crc32(piece, crc)
    length = sum(len(piece) for piece in body)
    return b"".join([view[:33], length.to_bytes(4, "big"), b"IDAT", *body, crc.to_bytes(4, "big"), _IEND_CHUNK])


def _spng_decode(data: bytes, path) -> np.ndarray:
    restored = _restored_png(data)
    try:
        img = _pyspng.load(data if restored is None else restored)
    except Exception as exc:  # noqa: BLE001 - libspng reports every decode failure as a plain error
        raise PixelError("corrupt", path, str(exc).strip().splitlines()[-1][:120] if str(exc) else "libspng") from None
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim != 2 or img.size == 0:
        raise PixelError("corrupt", path, f"libspng gave shape {img.shape}")
    return img


def to_gray8(img: np.ndarray) -> np.ndarray:
    """Any decoded array (HxW, HxWx1..4 in OpenCV's BGR(A) order, any depth) -> uint8 HxW."""
    if img.ndim == 3:
        channels = img.shape[2]
        if channels == 1:
            img = img[:, :, 0]
        elif channels == 2:  # gray + alpha
            img = img[:, :, 0]
        elif channels == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = cv2.cvtColor(img[:, :, :4], cv2.COLOR_BGRA2GRAY)  # alpha ignored
    if img.ndim != 2:
        raise PixelError("corrupt", None, f"unexpected image shape {img.shape}")
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    return _scale_to_uint8(img)


def _scale_to_uint8(img: np.ndarray) -> np.ndarray:
    """Linear min..max -> 0..255, rounded half up; exact integer arithmetic for integer images."""
    lo, hi = img.min(), img.max()
    if np.issubdtype(img.dtype, np.integer):
        lo, hi = int(lo), int(hi)
        if hi == lo:
            return np.zeros(img.shape, np.uint8)
        span = hi - lo
        v = img.astype(np.int64) - lo
        return ((v * 510 + span) // (2 * span)).astype(np.uint8)
    f = img.astype(np.float64)
    lo, hi = float(np.nanmin(f)), float(np.nanmax(f))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi == lo:
        return np.zeros(img.shape, np.uint8)
    out = np.floor((np.nan_to_num(f, nan=lo) - lo) * (255.0 / (hi - lo)) + 0.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def _load(path, target: int | None, fit: str | None) -> tuple[np.ndarray, int, tuple[int, int]]:
    data = read_bytes(path)
    img, r, full = _decode_bytes(data, path, target, fit)
    try:
        gray = to_gray8(img)
    except PixelError as exc:
        raise PixelError(exc.reason, path, exc.detail) from None
    return gray, r, (full if full is not None else gray.shape)


def load_gray(path: str | os.PathLike, target: int | None = None, fit: str | None = None) -> np.ndarray:
    """Read an image file as uint8 HxW gray.

    Without `target`: full resolution. With `target` (the output size), a JPEG at least twice as
    large decodes at 1/2, 1/4 or 1/8 scale; `fit` says which side must stay >= target (None: the
    short side, safe for every fit). To turn a file into SIZE x SIZE pixels use `prepare` (or
    `preprocess`): it maps the fit's window onto the reduced grid exactly, which `fit_resize` on the
    reduced array cannot (libjpeg rounds reduced sides up, and crop/pad offsets are not multiples of r).
    A DICOM file decodes by `cxrshards.dicom`'s rules, always at full resolution.
    Raises PixelError('missing'|'zero bytes'|'truncated'|'corrupt'|'unreadable'|'DICOM: ...').
    """
    return _load(path, target, fit)[0]


# --- geometry ----------------------------------------------------------------------------------


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise CxrError(f"unknown fit {fit!r}: choose one of {', '.join(FITS)}")


def pad_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """For `pad`: (new_h, new_w, top, left) of the resized image inside the size x size canvas."""
    if height >= width:
        new_h, new_w = size, max(1, int(round(width * size / height)))
    else:
        new_h, new_w = max(1, int(round(height * size / width))), size
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def fit_resize(img: np.ndarray, size: int, fit: str = "pad") -> np.ndarray:
    """uint8 HxW -> uint8 size x size with area interpolation (see module docstring)."""
    _check_fit(fit)
    if size < 1:
        raise CxrError(f"image size must be positive, got {size}")
    h, w = img.shape[:2]
    if fit == "crop":
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        img, h, w = img[y0 : y0 + s, x0 : x0 + s], s, s
    if fit == "pad" and h != w:
        new_h, new_w, top, left = pad_geometry(h, w, size)
        out = np.zeros((size, size), np.uint8)
        out[top : top + new_h, left : left + new_w] = area_resize(img, new_h, new_w)
        return out
    if (h, w) == (size, size):
        return np.ascontiguousarray(img, dtype=np.uint8).copy()
    return area_resize(img, size, size)


def area_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Area interpolation to out_h x out_w. When the image shrinks by k >= 2 and k divides both sides
    (NIH's 1024 px -> 224: k = 4), first average k x k blocks (OpenCV's fast integer path), then area
    resize the rest: about 3x faster than one fractional area resize, >= 45 dB from it."""
    h, w = img.shape[:2]
    k = min(h // out_h, w // out_w)
    if k >= 2 and h % k == 0 and w % k == 0:
        img = cv2.resize(img, (w // k, h // k), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)


Box = tuple[int, int, int, int]


def fit_window(height: int, width: int, size: int, fit: str) -> tuple[Box, Box]:
    """Source window (y0, x0, h, w) in full-resolution pixels and destination box (top, left, h, w)
    in the size x size output, for `fit`."""
    _check_fit(fit)
    if fit == "crop":
        s = min(height, width)
        return ((height - s) // 2, (width - s) // 2, s, s), (0, 0, size, size)
    if fit == "pad" and height != width:
        new_h, new_w, top, left = pad_geometry(height, width, size)
        return (0, 0, height, width), (top, left, new_h, new_w)
    return (0, 0, height, width), (0, 0, size, size)


def _area_taps(n_in: int, start: float, length: float, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter taps: output j averages input interval [start + j*step, start + (j+1)*step),
    step = length / n_out, each input pixel i covering [i, i+1). -> (indices, weights) [n_out, K]."""
    step = length / n_out
    lo = start + step * np.arange(n_out, dtype=np.float64)
    hi = lo + step
    k = int(np.ceil(step)) + 1
    i = np.floor(lo).astype(np.int64)[:, None] + np.arange(k)[None, :]
    w = np.clip(np.minimum(hi[:, None], i + 1) - np.maximum(lo[:, None], i), 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(i, 0, n_in - 1), w.astype(np.float32)


def area_resize_window(img: np.ndarray, window: tuple[float, float, float, float], out_h: int,
                       out_w: int) -> np.ndarray:
    """Area-resample the fractional window (y0, x0, h, w) of uint8 `img` to out_h x out_w (uint8).

    Separable and exact box coverage, like cv2.INTER_AREA when shrinking, but the window may start
    and end between pixels. Fixed-order float32 sums: the same bytes on every machine."""
    y0, x0, wh, ww = window
    iy, wy = _area_taps(img.shape[0], y0, wh, out_h)
    ix, wx = _area_taps(img.shape[1], x0, ww, out_w)
    src = img.astype(np.float32)
    rows = np.zeros((out_h, img.shape[1]), np.float32)
    for k in range(iy.shape[1]):
        rows += wy[:, k, None] * src[iy[:, k], :]
    out = np.zeros((out_h, out_w), np.float32)
    for k in range(ix.shape[1]):
        out += rows[:, ix[:, k]] * wx[None, :, k]
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def prepare(path: str | os.PathLike, size: int, fit: str = "pad") -> np.ndarray:
    """A raw image file -> uint8 size x size gray, before any codec (what the shard builder encodes).

    JPEGs at least twice the target decode reduced; the fit's window is then mapped onto the reduced
    grid exactly (reduced pixel i covers full pixels [i*r, (i+1)*r)) and area-resampled, so the result
    matches full decode + `fit_resize` (>= 40 dB PSNR). Everything else is `fit_resize(load_gray(path))`.
    """
    _check_fit(fit)
    if size < 1:
        raise CxrError(f"image size must be positive, got {size}")
    img, r, (height, width) = _load(path, size, fit)
    if r == 1:
        return fit_resize(img, size, fit)
    (y0, x0, wh, ww), (top, left, oh, ow) = fit_window(height, width, size, fit)
    resized = area_resize_window(img, (y0 / r, x0 / r, wh / r, ww / r), oh, ow)
    if (oh, ow) == (size, size):
        return resized
    out = np.zeros((size, size), np.uint8)
    out[top : top + oh, left : left + ow] = resized
    return out


# --- codecs ------------------------------------------------------------------------------------


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise CxrError(f"unknown codec {codec!r}: choose one of {', '.join(CODECS)}")


def encode(img: np.ndarray, codec: str, quality: int = 95) -> bytes:
    """uint8 HxW -> file bytes: 'png' (lossless, fixed level), 'jpeg' (gray, baseline), 'raw' (.npy)."""
    _check_codec(codec)
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"encode expects a uint8 HxW array, got {img.dtype} {img.shape}")
    if codec == "raw":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
        return buf.getvalue()
    if codec == "png":
        ok, out = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION,
                                          cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    else:
        if not 1 <= quality <= 100:
            raise CxrError(f"JPEG quality must be 1..100, got {quality}")
        ok, out = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {img.shape} image as {codec}")
    return out.tobytes()


def decode(data: bytes, codec: str) -> np.ndarray:
    """Bytes written by `encode` -> uint8 HxW."""
    _check_codec(codec)
    if codec == "raw":
        try:
            img = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise PixelError("corrupt", None, f"bad .npy data: {exc}") from None
        return to_gray8(img)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED | _NO_ROTATE)
    if img is None:
        raise PixelError("corrupt", None, f"not decodable as {codec}")
    return to_gray8(img)


def preprocess(path: str | os.PathLike, size: int, fit: str = "pad", codec: str = "png",
               quality: int = 95) -> np.ndarray:
    """Exactly the pixels a shard sample holds: `prepare` + the codec round-trip (`cxr predict`)."""
    _check_fit(fit)
    _check_codec(codec)
    img = prepare(path, size, fit)
    if codec == "jpeg":  # png and raw are lossless: the round-trip returns the same array
        img = decode(encode(img, codec, quality), codec)
    return img


def extension(codec: str) -> str:
    """The member suffix a shard sample uses for `codec` (png, jpg, npy)."""
    _check_codec(codec)
    return CODEC_EXTENSIONS[codec]


__all__ = [
    "CODECS", "CODEC_EXTENSIONS", "DICOM_REASON", "FITS", "PNG_COMPRESSION", "REDUCED_MARGIN", "REJECT_REASONS", "PixelError",
    "area_resize_window", "decode", "encode", "extension", "fit_resize", "fit_window", "jpeg_size",
    "load_gray", "pad_geometry", "prepare", "preprocess", "read_bytes", "reduction_factor", "to_gray8",
]
