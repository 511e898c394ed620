"""DICOM pixels: one DICOM file's bytes in, one uint8 HxW gray image out, by fixed rules.

`cxrshards.pixels` calls `decode_dicom` for every file `is_dicom` accepts, so the shard build and
`cxr predict` read DICOMs the same way; the result then goes through the same `fit_resize`.

Rules (README "DICOM files"; docs/DESIGN.md section 2):
1. A file is DICOM when its suffix is .dcm or .dicom (any case) or it has `DICM` at byte 128.
2. Stored values: `pydicom.dcmread`, then Pixel Data through pydicom's decoders. Compressed syntaxes
   (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE) are decoded by the pylibjpeg plugins
   that cxr installs, chosen by name even when others are installed, so a lossy JPEG gives the same
   bytes on every machine. pydicom masks bits above Bits Stored (unsigned) or sign-extends them (signed).
   Rejects, as `PixelError.reason`: "DICOM: no pixel data", "DICOM: multi-frame (N frames)",
   "DICOM: colour (PHOTOMETRIC)", "DICOM: unsupported transfer syntax UID (name)", "DICOM: bad window
   (...)", "DICOM: unsupported VOI LUT (...)"; an unparsable header or a failing decoder is "corrupt",
   Pixel Data shorter than the header says is "truncated".
3. Padding: a pixel whose stored value equals Pixel Padding Value, or lies between it and Pixel Padding
   Range Limit (both included), is padding. Compared on stored values, before the Modality LUT.
4. Modality LUT, giving x: `pydicom.pixels.apply_modality_lut` (the first Modality LUT Sequence item;
   else Rescale Slope and Intercept when both are present; else x = the stored value).
5. VOI, giving u in 0..1 from x, the first of:
   a. VOI LUT Sequence, first item, by `pydicom.pixels.apply_voi` (x floored to an integer index;
      below the first mapped value -> first entry, past the end -> last entry): u = y / (2^n - 1),
      n = the LUT Descriptor's bits per entry (its stated output range, PS3.3 C.11.2.1.1).
   b. Window Center c and Width w, the first value of each, by VOI LUT Function (PS3.3 C.11.2.1.2/3):
      LINEAR (the default): u = clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1); w = 1 is a threshold,
      u = 0 where x <= c - 0.5, else 1; w < 1 is rejected.
      LINEAR_EXACT: u = clip((x - c) / w + 0.5, 0, 1). SIGMOID: u = 1 / (1 + exp(-4 (x - c) / w)).
      These are pydicom's `apply_windowing` functions with output range 0..1 instead of the stored bit
      range: scaling its output to 0..255 afterwards would round twice.
   c. Neither: u = (x - lo) / (hi - lo), lo..hi = min..max of x over the non-padding pixels (u = 0 when
      hi == lo, or when every pixel is padding).
6. Gray value v = floor(255 u + 0.5); MONOCHROME1: v = 255 - v (bone is bright in every shard);
   padding pixels: v = 0 (black, like the border of a padded fit). Presentation LUT Shape is ignored.

Each rule is a function of the stored value alone, so for images of at most 16 bits the rules run once
per possible stored value (<= 65,536 entries) and the image is mapped by one table lookup; wider images
run them per pixel. Same numbers either way.
"""
from __future__ import annotations

import io
import os
import warnings

import numpy as np

from cxrshards.pixelerror import PixelError

SUFFIXES = (".dcm", ".dicom")
MAGIC_OFFSET, MAGIC = 128, b"DICM"
PLUGIN = "pylibjpeg"        # decoder plugin for compressed pixel data (pyproject installs its plugins)
WINDOW_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
_TABLE_DTYPES = (np.uint8, np.int8, np.uint16, np.int16)   # stored values mapped by one table lookup


def is_dicom(path: str | os.PathLike, data: bytes) -> bool:
    """True for a .dcm/.dicom file (any case) or one with DICM at byte 128."""
    return str(path).lower().endswith(SUFFIXES) or data[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC


def decode_dicom(data: bytes, path: str | os.PathLike | None = None) -> np.ndarray:
    """A DICOM file's bytes -> uint8 HxW by the module's rules; PixelError with the reason otherwise."""
    ds = read_dataset(data, path)
    stored = stored_values(ds, path)
    return map_to_gray(stored, ds, path)


# --- reading -----------------------------------------------------------------------------------


def read_dataset(data: bytes, path=None):
    """Parse the header and keep the pixel data bytes; reject what cannot become one gray image."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_magic = data[MAGIC_OFFSET : MAGIC_OFFSET + 4] == MAGIC
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_magic)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, NotImplementedError) as exc:
        raise PixelError("corrupt", path, f"not a readable DICOM file: {_first_line(exc)}") from None
    if not has_magic and "PixelData" not in ds and "Rows" not in ds:
        raise PixelError("corrupt", path, "not a DICOM file (no DICM marker, no image header)")
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise _reject("DICOM: no pixel data", path, f"{other[0]} is not read" if other else "")
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise _reject(f"DICOM: multi-frame ({frames} frames)", path)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = _int(ds.get("SamplesPerPixel"), 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        name = photometric or "no Photometric Interpretation"
        raise _reject(f"DICOM: colour ({name})", path, f"{samples} samples per pixel" if samples != 1 else "")
    return ds


def stored_values(ds, path=None) -> np.ndarray:
    """The stored pixel values (HxW) through pydicom's decoder, with the plugin chosen by `decoder_plugin`."""
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:   # a bare dataset without file meta: pydicom reads it as implicit VR little endian
        from pydicom.uid import ImplicitVRLittleEndian as syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _reject(f"DICOM: unsupported transfer syntax {syntax} ({syntax.name})", path) from None
    plugin = decoder_plugin(decoder)
    if plugin is None:
        raise _reject(f"DICOM: unsupported transfer syntax {syntax} ({syntax.name})", path,
                      "no decoder installed; pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.pixel_array_options(decoding_plugin=plugin)
            arr = ds.pixel_array
    except Exception as exc:   # the decoders raise many types (ValueError, RuntimeError, their own)
        text = _first_line(exc)
        if "less than expected" in text or "insufficient" in text.lower() or "too short" in text.lower():
            raise PixelError("truncated", path, text) from None
        raise PixelError("corrupt", path, f"pixel data does not decode: {text}") from None
    if arr.ndim != 2:
        raise PixelError("corrupt", path, f"decoded pixel data has shape {arr.shape}, expected rows x columns")
    return arr


def decoder_plugin(decoder) -> str | None:
    """'' for pydicom's own native decoding, PLUGIN when it can decode, else the first available one."""
    if decoder.is_native:
        return ""
    available = list(decoder.available_plugins)
    if PLUGIN in available:
        return PLUGIN
    return available[0] if available else None


# --- the rules ---------------------------------------------------------------------------------


def map_to_gray(stored: np.ndarray, ds, path=None) -> np.ndarray:
    """Stored values (HxW) -> uint8 HxW by rules 3-6."""
    padding = padding_range(ds)
    if stored.dtype in _TABLE_DTYPES:
        unsigned = np.dtype(f"uint{stored.dtype.itemsize * 8}")
        domain = np.arange(2 ** (8 * stored.dtype.itemsize), dtype=np.int64).astype(unsigned).view(stored.dtype)
        lohi = _stored_lohi(stored, padding, ds)
        table = gray_values(domain, ds, padding, lohi, path)
        return table[stored.view(unsigned)]
    return gray_values(stored, ds, padding, _stored_lohi(stored, padding, ds), path)


def gray_values(values: np.ndarray, ds, padding: tuple[float, float] | None,
                lohi: np.ndarray | None, path=None) -> np.ndarray:
    """Rules 3-6 element-wise on stored `values` (the whole image, or every possible stored value);
    `lohi` = the image's stored values that rule 5c takes min..max over (`_stored_lohi`)."""
    from pydicom.pixels import apply_modality_lut

    x = apply_modality_lut(values, ds)
    u = voi_unit(x, ds, path)
    if u is None:   # rule 5c: the image's own min..max of x
        present = apply_modality_lut(lohi, ds) if lohi is not None and lohi.size else None
        lo = float(np.min(present)) if present is not None else 0.0
        hi = float(np.max(present)) if present is not None else 0.0
        xf = np.asarray(x, dtype=np.float64)
        u = np.zeros(xf.shape) if hi == lo else np.clip((xf - lo) / (hi - lo), 0.0, 1.0)
    v = np.floor(255.0 * u + 0.5).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        v = 255 - v
    if padding is not None:
        v[(values >= padding[0]) & (values <= padding[1])] = 0
    return v


def voi_unit(x: np.ndarray, ds, path=None) -> np.ndarray | None:
    """Rule 5a/5b: u in 0..1 from the VOI LUT or window; None when the file has neither."""
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        return _voi_lut_unit(x, ds, path)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in WINDOW_FUNCTIONS:
        raise _reject(f"DICOM: unsupported VOI LUT Function {function}", path)
    xf = np.asarray(x, dtype=np.float64)
    if function == "LINEAR":
        if width < 1:
            raise _reject(f"DICOM: bad window (width {width:g} < 1)", path)
        if width == 1:
            return np.where(xf <= center - 0.5, 0.0, 1.0)
        return np.clip((xf - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    if width <= 0:
        raise _reject(f"DICOM: bad window (width {width:g} <= 0)", path)
    if function == "LINEAR_EXACT":
        return np.clip((xf - center) / width + 0.5, 0.0, 1.0)
    return 1.0 / (1.0 + np.exp(-4.0 * (xf - center) / width))


def _voi_lut_unit(x: np.ndarray, ds, path) -> np.ndarray:
    from pydicom.pixels import apply_voi

    descriptor = list(ds.VOILUTSequence[0].LUTDescriptor)
    bits = int(descriptor[2]) if len(descriptor) == 3 else 0
    if bits != 8 and not 10 <= bits <= 16:
        raise _reject(f"DICOM: unsupported VOI LUT ({bits} bits per entry)", path)
    index = x if np.issubdtype(np.asarray(x).dtype, np.integer) else np.floor(x).astype(np.int64)
    try:
        y = apply_voi(np.asarray(index, dtype=np.int64), ds, 0)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise _reject("DICOM: unsupported VOI LUT (LUT Data does not match its descriptor)", path,
                      _first_line(exc)) from None
    return y.astype(np.float64) / (2**bits - 1)


def padding_range(ds) -> tuple[float, float] | None:
    """(low, high) stored values that are padding (rule 3), or None."""
    value = _first(ds.get("PixelPaddingValue"))
    if value is None:
        return None
    limit = _first(ds.get("PixelPaddingRangeLimit"))
    limit = value if limit is None else limit
    return (min(value, limit), max(value, limit))


def _stored_lohi(stored: np.ndarray, padding: tuple[float, float] | None, ds) -> np.ndarray | None:
    """The stored values rule 5c takes min..max of x over: the image's min and max stored value outside
    the padding (x is monotonic in them), or every distinct one when a Modality LUT Sequence may reorder
    them. None when every pixel is padding."""
    kept = stored if padding is None else stored[(stored < padding[0]) | (stored > padding[1])]
    if kept.size == 0:
        return None
    if ds.get("ModalityLUTSequence"):
        return np.unique(kept)
    return np.array([kept.min(), kept.max()], dtype=stored.dtype)


# --- small helpers -----------------------------------------------------------------------------


def _reject(reason: str, path, detail: str = "") -> PixelError:
    return PixelError(reason, path, detail)


def _first(value) -> float | None:
    """The first value of a (possibly multi-valued, possibly empty) numeric element, as float."""
    if value is None or value == "":
        return None
    if not isinstance(value, (int, float, str)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


__all__ = ["MAGIC", "PLUGIN", "SUFFIXES", "decode_dicom", "decoder_plugin", "gray_values", "is_dicom",
           "map_to_gray", "padding_range", "read_dataset", "stored_values", "voi_unit"]
