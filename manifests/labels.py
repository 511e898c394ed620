"""Shared label rules: the uncertain-label policy of every source with -1 labels (MIMIC, CheXpert, tables).

Input values are 1.0 (positive), 0.0 (negative), -1.0 (uncertain) and NaN (blank, not mentioned).
Blank becomes 0.0; -1 becomes 0.0 (`zeros`), 1.0 (`ones`) or NaN (`ignore`, not usable).
"""
from __future__ import annotations

import numpy as np

UNCERTAIN_VALUES = {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}


def apply_uncertain(values: np.ndarray, policy: str) -> np.ndarray:
    """float32 copy of `values` with blank -> 0 and uncertain (-1) -> the policy's value."""
    out = np.array(values, dtype=np.float64)
    uncertain = out == -1.0
    out[np.isnan(out)] = 0.0
    out[uncertain] = UNCERTAIN_VALUES[policy]
    return out.astype(np.float32)
