"""DICOM headers for a manifest: which files are DICOM, and the tags that place them (no pixels).

Rules (README "DICOM files in folder sets"; docs/DESIGN.md section 1):
1. A file is DICOM when its suffix is .dcm or .dicom (any case), or when it has `DICM` at byte 128.
   `has_magic` reads those 132 bytes; callers only ask it about files without a known image suffix.
2. Headers only: `pydicom.dcmread(stop_before_pixels=True, specific_tags=TAGS)`, with `force=True` when
   the DICM preamble is absent (a bare .dcm dataset), as the pixel reader `cxrshards.dicom` reads it.
3. A header is readable when pydicom parses it and the parse stops at a Pixel Data element (group 7FE0).
   pydicom accepts a truncated file or bytes after `DICM` that are no elements without a word, so a
   header that runs into the end of the file or into garbage is `DicomHeaderError`, as is a DICOM that
   holds no image (a report). The error's reason is what the manifest's rejects list.
4. PatientID, StudyInstanceUID and ViewPosition come back as text without DICOM's space/NUL padding;
   absent or empty -> None. PatientSex -> "F"/"M"/None and PatientAge ("045Y", "006M", "010W", "003D")
   -> years as written, NaN when absent or not an age (`manifests.demographics.sex_of` / `age_of`: a bad
   value is missing, never a reject).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from manifests.demographics import age_of, sex_of
from manifests.errors import ManifestError

SUFFIXES = (".dcm", ".dicom")
MAGIC_OFFSET, MAGIC = 128, b"DICM"
TAGS = ("PatientID", "StudyInstanceUID", "ViewPosition", "PatientSex", "PatientAge")
_PIXEL_GROUP = (b"\xe0\x7f", b"\x7f\xe0")   # (7FE0,xxxx) little and big endian: Pixel Data and its float kin


@dataclass(frozen=True)
class DicomHeader:
    patient_id: str | None       # PatientID
    study_id: str | None         # StudyInstanceUID
    view: str | None             # ViewPosition (AP, PA, LL, LATERAL, ...)
    sex: str | None = None       # PatientSex: "F", "M" or None (O, blank, absent, anything else)
    age: float = float("nan")    # PatientAge in years as written (may exceed 120); NaN when absent or bad


class DicomHeaderError(ManifestError):
    """A DICOM file whose header cannot be read; `reason` is the rejects' text."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def has_dicom_suffix(name: str) -> bool:
    return name.lower().endswith(SUFFIXES)


def has_magic(path: str | os.PathLike) -> bool:
    """True when the file holds `DICM` at byte 128 (reads 132 bytes; OSError propagates)."""
    with open(path, "rb") as fp:
        return fp.read(MAGIC_OFFSET + len(MAGIC))[MAGIC_OFFSET:] == MAGIC


def read_header(path: str | os.PathLike) -> DicomHeader:
    """PatientID, StudyInstanceUID, ViewPosition, PatientSex and PatientAge of one DICOM file;
    DicomHeaderError when unreadable."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        with open(path, "rb") as fp:
            preamble = fp.read(MAGIC_OFFSET + len(MAGIC))[MAGIC_OFFSET:] == MAGIC
            fp.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")    # pydicom warns on damage it then skips; rule 3 catches it
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not preamble, specific_tags=list(TAGS))
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            if syntax != DeflatedExplicitVRLittleEndian:   # deflated: pydicom parses an inflated copy
                fp.seek(min(fp.tell(), os.fstat(fp.fileno()).st_size))
                if fp.read(2) not in _PIXEL_GROUP:
                    raise DicomHeaderError(path, "unreadable DICOM header (no Pixel Data after it: truncated, "
                                                 "corrupt, or not an image)")
            return DicomHeader(_text(ds, "PatientID"), _text(ds, "StudyInstanceUID"), _text(ds, "ViewPosition"),
                               sex_of(_text(ds, "PatientSex")), age_of(_text(ds, "PatientAge")))
    except DicomHeaderError:
        raise
    except OSError as exc:
        raise DicomHeaderError(path, f"unreadable file ({exc.strerror or exc})") from None
    except Exception as exc:   # pydicom raises many types on damaged input (InvalidDicomError, struct.error, ...)
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise DicomHeaderError(path, f"unreadable DICOM header ({type(exc).__name__}: {first})") from None


def _text(ds, tag: str) -> str | None:
    value = ds.get(tag)
    if value is None:
        return None
    text = str(value).strip(" \x00")
    return text or None
