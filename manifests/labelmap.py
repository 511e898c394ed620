"""Shared label names: where shard sets of different sources meet, one name per identical concept.

The rules:
- Manifests and cards keep each source's own label names; the map applies only where sets are combined
  (training on several) or compared (external evaluation).
- The built-in table `manifests/label_map.csv` (columns `source,label,shared`) lists the renames, for
  identical concepts only: `Pleural Effusion` (MIMIC, CheXpert, tables, folders) is NIH's `Effusion`.
- A label without a row keeps its own name, so labels with the same name meet as they are and labels
  without a counterpart (Pleural_Thickening, Infiltration, Lung Opacity, Support Devices, ...) stay apart.
- `--label-map FILE` (same columns) overrides: its rows replace the built-in row for the same
  (source, label) and add new ones; the rest of the built-in table still applies.
- Two labels of one source may not map to the same shared name (the set would have two columns for it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from manifests.errors import ManifestError

BUILTIN_MAP = Path(__file__).with_name("label_map.csv")
MAP_COLUMNS = ("source", "label", "shared")


@dataclass(frozen=True)
class LabelMap:
    """(source, label) -> shared name; anything not listed maps to itself."""

    renames: dict[tuple[str, str], str] = field(default_factory=dict)

    def shared(self, source: str, label: str) -> str:
        return self.renames.get((source, label), label)

    def shared_labels(self, source: str, labels: list[str]) -> list[str]:
        """The shared name of each of `labels`, in order; ManifestError if two collide."""
        out = [self.shared(source, label) for label in labels]
        seen: dict[str, str] = {}
        for label, name in zip(labels, out):
            if name in seen:
                raise ManifestError(f"label map: {source} labels {seen[name]!r} and {label!r} both map to {name!r}")
            seen[name] = label
        return out

    def to_rows(self) -> list[dict]:
        """The map as `source,label,shared` records (recorded in a run's config)."""
        return [{"source": s, "label": label, "shared": shared} for (s, label), shared in sorted(self.renames.items())]


def load_label_map(override: str | os.PathLike | None = None) -> LabelMap:
    """The built-in map, with `override`'s rows (a CSV `source,label,shared`) taking precedence."""
    renames = _read_map(BUILTIN_MAP)
    if override is not None:
        renames.update(_read_map(Path(override)))
    return LabelMap(renames=renames)


def _read_map(path: Path) -> dict[tuple[str, str], str]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ManifestError(f"{path}: label map not found") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read the label map as CSV ({str(exc).splitlines()[0]})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in MAP_COLUMNS if c not in frame.columns]
    if missing:
        raise ManifestError(f"{path}: label map needs the columns source,label,shared (missing {', '.join(missing)})")
    renames: dict[tuple[str, str], str] = {}
    for i, row in enumerate(frame[list(MAP_COLUMNS)].itertuples(index=False), start=2):
        source, label, shared = (str(v).strip() for v in row)
        if not source or not label or not shared:
            raise ManifestError(f"{path}: line {i}: source, label and shared must all be given")
        if (source, label) in renames and renames[(source, label)] != shared:
            raise ManifestError(f"{path}: line {i}: {source} label {label!r} is mapped twice")
        renames[(source, label)] = shared
    return renames
