"""Losses over logits and float labels with NaN = not labelled (masked out).

Every loss is the mean over the labelled (sample, label) entries of the batch.
- bce:            binary cross-entropy with logits (sigmoid per label)
- bce-pos-weight: the same with pos_weight = negatives / positives per label on the train split (seed 001)
- focal:          (1 - p_t)^gamma * BCE, optional alpha_t = alpha*y + (1-alpha)*(1-y) (seed 000, gamma 2)
- ce:             binary task with 2 logits, softmax cross-entropy (seed 000's cardiomegaly branch)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from manifests.errors import CxrError

if TYPE_CHECKING:   # only annotated here: `cxr predict --run` imports this module and needs no pandas
    import pandas as pd

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _masked_mean(per_entry: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_entry = torch.where(mask, per_entry, torch.zeros_like(per_entry))
    return per_entry.sum() / mask.sum().clamp(min=1)


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    mask = ~torch.isnan(labels)
    target = torch.nan_to_num(labels, nan=0.0)
    per = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight, reduction="none")
    return _masked_mean(per, mask)


def masked_focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0,
                 alpha: float | None = None) -> torch.Tensor:
    mask = ~torch.isnan(labels)
    target = torch.nan_to_num(labels, nan=0.0)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    p_t = torch.exp(-bce)                       # probability given to the true class
    per = (1.0 - p_t).pow(gamma) * bce
    if alpha is not None:
        per = (alpha * target + (1.0 - alpha) * (1.0 - target)) * per
    return _masked_mean(per, mask)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """2-logit cross-entropy for a binary task; labels [B, 1] float with NaN masked."""
    y = labels.reshape(-1)
    mask = ~torch.isnan(y)
    target = torch.nan_to_num(y, nan=0.0).long()
    per = F.cross_entropy(logits.float(), target, reduction="none")
    return _masked_mean(per, mask)


def pos_weight_from_table(table: pd.DataFrame, labels: Sequence[str], split: str = "train") -> np.ndarray:
    """negatives / positives per label on `split` (NaN rows not counted); a label without positives
    gets weight 1."""
    rows = table[table["split"] == split]
    weights = []
    for label in labels:
        col = rows[label].to_numpy(dtype=np.float64)
        pos, neg = float((col == 1).sum()), float((col == 0).sum())
        weights.append(neg / pos if pos > 0 else 1.0)
    return np.asarray(weights, dtype=np.float32)


def make_loss(name: str, *, pos_weight: torch.Tensor | None = None, gamma: float = 2.0,
              alpha: float | None = None) -> LossFn:
    if name == "bce":
        return masked_bce
    if name == "bce-pos-weight":
        if pos_weight is None:
            raise CxrError("--loss bce-pos-weight needs per-label positive weights")
        return lambda logits, labels: masked_bce(logits, labels, pos_weight=pos_weight.to(logits.device))
    if name == "focal":
        return lambda logits, labels: masked_focal(logits, labels, gamma=gamma, alpha=alpha)
    if name == "ce":
        return masked_ce
    raise CxrError(f"--loss {name!r}: expected bce, bce-pos-weight, focal or ce")


def probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Logits -> probability of each label being positive: sigmoid, or softmax[:, 1:] for 2-logit heads."""
    if head == "softmax":
        return torch.softmax(logits.float(), dim=1)[:, 1:]
    return torch.sigmoid(logits.float())
