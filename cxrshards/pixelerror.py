"""`PixelError`: an image file that cannot become pixels, and the reasons it may give.

Its own module below `cxrshards.pixels` and `cxrshards.dicom`, which both raise it (neither imports the other
for it)."""
from __future__ import annotations

import os

from manifests.errors import CxrError

REJECT_REASONS = ("missing", "zero bytes", "truncated", "corrupt", "unreadable")
DICOM_REASON = "DICOM: "   # prefix of the reasons only DICOM files get (cxrshards.dicom)


class PixelError(CxrError):
    """An image file that cannot become pixels. `reason` is one of REJECT_REASONS or starts with
    DICOM_REASON."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None, detail: str = "") -> None:
        if reason not in REJECT_REASONS and not (reason.startswith(DICOM_REASON) and len(reason) > len(DICOM_REASON)):
            raise ValueError(f"unknown pixel reject reason {reason!r}")
        self.reason = reason
        self.path = None if path is None else str(path)
        self.detail = detail
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # crosses process boundaries (the shard builder's workers) intact
        return (type(self), (self.reason, self.path, self.detail))
