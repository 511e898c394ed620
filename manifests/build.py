"""`build_manifest`: raw tables in, one audited manifest out. Tables only, never pixels."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from manifests import __version__
from manifests.atomic import atomic_path
from manifests.errors import ManifestError
from manifests.folder import build_folder
from manifests.mimic import build_mimic
from manifests.nih import build_nih
from manifests.options import ManifestOptions
from manifests.table import Manifest, audit_leakage, check_table, conform, reject_counts
from manifests.vocab import MIMIC_LABELS, NIH_LABELS

__all__ = ["Manifest", "ManifestOptions", "build_manifest", "write_fetch_list"]


def build_manifest(raw: str | os.PathLike, options: ManifestOptions) -> Manifest:
    """Select images, labels and splits for `options.source` under the raw root `raw`.

    The table passes `check_table` and `audit_leakage` before it is returned. Everything left out is
    in `rejects` with its reason. When `options.fetch_list` is set, the selected images' relative paths
    are written there (one per line, sorted): the only file this function writes.
    """
    root = Path(raw)
    if not root.is_dir():
        raise ManifestError(f"{root}: raw root is not a folder")
    table, rejects, extra, labels = _select(root, options)
    table = conform(table, labels)
    if table.empty:
        counts = ", ".join(f"{reason}: {n}" for reason, n in reject_counts(rejects).items()) or "nothing found"
        raise ManifestError(f"{root}: no image selected ({counts})")
    check_table(table, labels, origin=str(root))
    audit_leakage(table)
    meta = {"source": options.source, "labels": labels, "options": options.to_dict(), "version": __version__,
            "raw": str(root.resolve()), **extra}
    manifest = Manifest(table=table, labels=labels, rejects=rejects, meta=meta)
    if options.fetch_list:
        write_fetch_list(manifest, options.fetch_list)
    return manifest


def _select(root: Path, options: ManifestOptions) -> tuple[pd.DataFrame, pd.DataFrame, dict, list[str]]:
    """(table, rejects, extra meta, ordered labels) from the source's own module; nothing conformed yet."""
    if options.source == "nih":
        return (*build_nih(root, options), list(NIH_LABELS))
    if options.source == "mimic":
        return (*build_mimic(root, options), list(MIMIC_LABELS))
    if options.source == "chexpert":
        from manifests.chexpert import build_chexpert
        return build_chexpert(root, options)
    if options.source == "table":
        from manifests.labeltable import build_label_table
        return build_label_table(root, options)
    return build_folder(root, options)


def write_fetch_list(manifest: Manifest, path: str | os.PathLike) -> Path:
    """Write the selected images' paths (relative to the raw root), one per line, sorted, atomically."""
    final = Path(path)
    if final.is_dir():
        raise ManifestError(f"{final}: is a folder, expected a file name for the fetch list")
    try:
        with atomic_path(final) as tmp:
            tmp.write_text("".join(p + "\n" for p in sorted(manifest.table["path"])))
    except OSError as exc:
        raise ManifestError(f"{final}: cannot write ({exc.strerror or exc})") from None
    return final
