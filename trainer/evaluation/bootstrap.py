"""The patient bootstrap, vectorised: every resample at once, as weights.

Rules:
- A patient is (set, patient_id) (patient_id alone when the table has no `set` column). A resample draws
  as many patients as there are, with replacement, uniformly; its images come with their patient. So a
  resample is a count per patient, drawn from `numpy.random.default_rng([seed, *tags])`, never the global
  RNG. `Resamples.weights` is [n_patients, 1 + n_boot] float32: column 0 all ones (the sample itself),
  then one column per resample.
- Every statistic is computed for the 1 + n_boot columns in one go: column 0 is the point estimate (it
  equals the unweighted formula: scikit-learn's roc_auc_score, brier_score_loss), columns 1.. the
  resamples. Counts stay below 2**24, so float32 sums of them are exact.
- Additive statistics (counts, sums of probabilities, of labels, of squared errors) go through a sparse
  patient matrix: `resampled_sums(resamples, rows, values)` = per patient sums, times the weights.
- AUROC with weights (`weighted_auroc`, `group_aurocs`): the negatives sorted once per label; for each
  positive, the negative weight below its score plus half the weight tied with it. Two binary searches
  place every positive among the negatives; the negatives between consecutive places are summed by one
  sparse product with the patients' weights (no per-image weight matrix), then cumulated. U = sum of
  positive weight times that. With integer weights it equals roc_auc_score on the rows repeated that
  many times (ties counted half).
- The interval is the percentile interval of the resamples where the statistic is defined (`estimate`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

CI_LEVEL = 0.95


@dataclass(frozen=True, eq=False)
class Resamples:
    """The images' patients and the weights of the sample (column 0) and of each resample (columns 1..)."""

    patient: np.ndarray      # int64 [n_images]: the image's patient, 0..n_patients-1
    weights: np.ndarray      # float32 [n_patients, 1 + n_boot]: column 0 all ones, then the resample counts
    seed: int
    level: float = CI_LEVEL

    @property
    def n_boot(self) -> int:
        return self.weights.shape[1] - 1

    @property
    def n_patients(self) -> int:
        return self.weights.shape[0]

    @cached_property
    def weights64(self) -> np.ndarray:
        """`weights` as float64 (for sums of non-integer values), made once."""
        return self.weights.astype(np.float64)

    def describe(self) -> dict:
        """The bootstrap's settings, for a report."""
        return {"unit": "patient", "n_boot": self.n_boot, "seed": self.seed, "level": self.level,
                "method": "percentile"}


def patient_codes(predictions: pd.DataFrame) -> tuple[np.ndarray, int]:
    """(int64 code per row, number of patients): patients are (set, patient_id), numbered in sorted order."""
    ids = predictions["patient_id"].astype(str)
    if "set" in predictions.columns:
        ids = predictions["set"].astype(str) + "\x00" + ids
    uniques, codes = np.unique(ids.to_numpy(dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), len(uniques)


def draw_resamples(patient: np.ndarray, n_patients: int, n_boot: int, seed: int, *tags: int,
                   level: float = CI_LEVEL) -> Resamples:
    """`n_boot` patient resamples from `default_rng([seed, *tags])` as counts per patient, column 0 all ones."""
    n_boot = max(int(n_boot), 0)
    weights = np.ones((n_patients, 1 + n_boot), dtype=np.float32)
    if n_boot and n_patients:
        rng = np.random.default_rng([int(seed), *map(int, tags)])
        drawn = rng.integers(0, n_patients, size=(n_boot, n_patients))
        flat = drawn + (np.arange(n_boot) * n_patients)[:, None]
        counts = np.bincount(flat.ravel(), minlength=n_boot * n_patients).reshape(n_boot, n_patients)
        weights[:, 1:] = counts.T
    return Resamples(patient=np.asarray(patient, dtype=np.int64), weights=weights, seed=int(seed), level=level)


def resamples_for(predictions: pd.DataFrame, n_boot: int, seed: int, level: float = CI_LEVEL) -> Resamples:
    """The resamples of a predictions table (patients by `patient_codes`)."""
    codes, n = patient_codes(predictions)
    return draw_resamples(codes, n, n_boot, seed, level=level)


def resampled_sums(resamples: Resamples, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float64 [1 + n_boot, k]: the sum of `values` [len(rows), k] over `rows` in the sample and each resample."""
    from scipy.sparse import coo_matrix

    values = np.asarray(values, dtype=np.float64)
    values = values.reshape(len(rows), 1) if values.ndim == 1 else values   # no rows: still [0, k]
    k = values.shape[1]
    row, column = np.nonzero(values)
    member = coo_matrix((values[row, column], (column, resamples.patient[rows][row])),
                        shape=(k, resamples.n_patients)).tocsr()
    return np.asarray(member @ resamples.weights64).T


def interval(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float | None, float | None, int]:
    """(low, high, resamples used): percentile interval over the finite values; None when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None, None, 0
    alpha = (1.0 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)), int(values.size)


def estimate(values: np.ndarray, level: float = CI_LEVEL) -> dict:
    """{"value", "low", "high", "n_used"} from a statistic's [1 + n_boot] values (index 0: the point estimate)."""
    values = np.asarray(values, dtype=np.float64)
    low, high, used = interval(values[1:], level)
    value = float(values[0]) if np.isfinite(values[0]) else None
    return {"value": value, "low": low, "high": high, "n_used": used}


# --- AUROC with weights ------------------------------------------------------------------------------


def _below(neg_scores: np.ndarray, neg_index: np.ndarray, table: np.ndarray, scores: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [len(scores), R]: negative weight strictly below each score plus half the weight tied with it;
    float32 [R]: the negatives' total weight).

    `neg_scores` ascending; negative j weighs `table[neg_index[j]]` ([R]). Only the cumulative weight at the
    2 * len(scores) boundaries (negatives below, negatives up to each score) is needed: the negatives
    between two boundaries are summed by one sparse product with `table`, then cumulated."""
    from scipy.sparse import csr_matrix

    lo = np.searchsorted(neg_scores, scores, side="left")
    hi = np.searchsorted(neg_scores, scores, side="right")
    bounds = np.unique(np.concatenate([lo, hi]))
    segment = np.searchsorted(bounds, np.arange(len(neg_scores)), side="right")   # boundaries <= j
    member = csr_matrix((np.ones(len(neg_scores), dtype=np.float32), (segment, neg_index)),
                        shape=(len(bounds) + 1, table.shape[0]))
    cumulative = np.cumsum(member @ table, axis=0, dtype=np.float32)   # row k: weight below bounds[k]
    out = cumulative[np.searchsorted(bounds, lo)]
    out += cumulative[np.searchsorted(bounds, hi)]
    out *= np.float32(0.5)
    return out, cumulative[-1]


def _ratio(u: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((pos > 0) & (neg > 0), u / np.where((pos > 0) & (neg > 0), pos * neg, 1.0), np.nan)


def weighted_auroc(scores: np.ndarray, y: np.ndarray, w: np.ndarray, index: np.ndarray | None = None) -> np.ndarray:
    """[R] AUROC of `scores` against `y` (0/1), each row weighted by `w` [n, R] (or, with `index`, by
    `w[index[i]]`: a patient table); NaN where a class has no weight. Ties count half, as in roc_auc_score."""
    n = len(scores)
    return group_aurocs(scores, y, w, np.zeros(n, dtype=np.int64), 1, index)[4]


def group_aurocs(scores: np.ndarray, y: np.ndarray, w: np.ndarray, group: np.ndarray, n_groups: int,
                 index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(AUROC within each group [R, G], AUROC of the rest of the rows [R, G], positives [G], negatives [G],
    AUROC of all the rows [R]).

    `group` holds 0..G-1 per row (rows outside every group are not passed). Row i weighs `w[i]` ([n, R]),
    or `w[index[i]]` when `index` is given (w = the patients' weights, index = each row's patient). With
    U[h, k] the weighted count of (positive in h, negative in k) pairs in order, the group's AUROC is
    U[g, g] over its own weights, and the rest's is the sum of U[h, k] over h, k != g over the rest's.
    """
    scores, y, group = np.asarray(scores), np.asarray(y), np.asarray(group)
    table = np.asarray(w, dtype=np.float32).reshape(len(w), -1)
    index = np.arange(len(scores)) if index is None else np.asarray(index, dtype=np.int64)
    n_weights = table.shape[1]
    pos = np.flatnonzero(y == 1)
    pos = pos[np.argsort(group[pos], kind="stable")]
    pos_w = table[index[pos]]
    pos_group = group[pos]
    bounds = np.searchsorted(pos_group, np.arange(n_groups + 1))             # positives of h: bounds[h]:bounds[h+1]

    def per_group(values: np.ndarray) -> np.ndarray:                         # [n_pos, R] -> [R, G] sums by group
        return np.stack([values[bounds[h]:bounds[h + 1]].sum(axis=0, dtype=np.float64)
                         for h in range(n_groups)], axis=1)

    pos_weight = per_group(pos_w)
    neg_weight = np.zeros((n_weights, n_groups))
    pairs = np.zeros((n_weights, n_groups, n_groups))                         # [R, h (positive), k (negative)]
    neg_all = np.flatnonzero(y == 0)
    neg_all = neg_all[np.argsort(scores[neg_all], kind="stable")]
    for k in range(n_groups):
        neg = neg_all[group[neg_all] == k]
        if not neg.size:
            continue
        contribution, neg_weight[:, k] = _below(scores[neg], index[neg], table, scores[pos])
        contribution *= pos_w
        pairs[:, :, k] = per_group(contribution)
    positives = np.bincount(pos_group, minlength=n_groups)
    negatives = np.bincount(group[neg_all], minlength=n_groups)
    within = _ratio(np.einsum("rgg->rg", pairs), pos_weight, neg_weight)
    total = pairs.sum(axis=(1, 2))[:, None]
    touching = pairs.sum(axis=2) + pairs.sum(axis=1) - np.einsum("rgg->rg", pairs)
    all_pos, all_neg = pos_weight.sum(axis=1, keepdims=True), neg_weight.sum(axis=1, keepdims=True)
    rest = _ratio(total - touching, all_pos - pos_weight, all_neg - neg_weight)
    return within, rest, positives, negatives, _ratio(total[:, 0], all_pos[:, 0], all_neg[:, 0])
