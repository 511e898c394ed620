"""Seeded patient-level splits: a pure function of (seed, patients, fractions), never of row order."""
from __future__ import annotations

import numpy as np
import pandas as pd

from manifests.table import SPLITS

_SPLIT_STREAM = 0x5711  # salts the split RNG so it never shares a stream with sampling or shuffling


def patient_splits(
    patient_ids: pd.Series,
    fractions: tuple[float, ...],
    seed: int,
    strata: pd.Series | None = None,
    names: tuple[str, ...] = SPLITS,
) -> pd.Series:
    """Map every distinct patient to a split name; returns a Series indexed by patient id.

    Patients are sorted as text, permuted with `default_rng([seed, 0x5711])`, and cut at
    round(cumulative fraction x patients), so `fractions` are fractions of patients. With `strata`
    (one value per row of `patient_ids`, e.g. the class) each stratum is cut on its own; a patient
    whose rows fall in several strata belongs to the greatest one.
    """
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    if strata is None:
        groups = {0: np.sort(patient_ids.astype("str").unique())}
    else:
        per_patient = pd.Series(strata.to_numpy(), index=patient_ids.astype("str").to_numpy()).groupby(level=0).max()
        groups = {value: np.sort(per_patient.index[per_patient == value].to_numpy())
                  for value in sorted(per_patient.unique())}
    pieces = []
    for patients in groups.values():
        pieces.append(pd.Series(_cut(len(patients), fractions, names, rng), index=patients, dtype="str"))
    if not pieces:
        return pd.Series([], dtype="str")
    return pd.concat(pieces)


def _cut(n: int, fractions: tuple[float, ...], names: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    """Split names for n patients in a seeded random order, cut by cumulative fraction."""
    total = float(sum(fractions))
    bounds = np.floor(np.cumsum(fractions) / total * n + 0.5).astype(np.int64)
    bounds[-1] = n
    position = np.empty(n, dtype=np.int64)
    position[rng.permutation(n)] = np.arange(n)   # position[i] = where patient i lands in the shuffle
    which = np.searchsorted(bounds, position, side="right")
    return np.asarray(names, dtype=object)[which]
