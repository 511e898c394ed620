"""What a run's model sees for an image: the stored pixels of a raw file under a run's card, and the
normalised input tensor. Shared by `cxr predict` (`trainer.predict`) and the heatmaps (`trainer.cam`).

An image goes through exactly what a shard sample went through when the run's shard set was built (gray,
fit, size, codec round trip: `cxrshards.pixels.preprocess` with the card's parameters), then exactly the
normalisation the trainer applies before the model (`trainer.augment.augment_batch` without augmentation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.augment import AugmentSpec, augment_batch


def card_pixels(path: str | Path, card: dict) -> np.ndarray:
    """uint8 SxS: what `cxr shard build` stored for this file in the shard set described by `card`."""
    from cxrshards.pixels import preprocess

    return preprocess(path, int(card["size"]), card.get("fit", "pad"), card.get("codec", "png"),
                      int(card.get("jpeg_quality", 95)))


def model_input(pixels: np.ndarray | torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [S,S] / [1,S,S] / [B,1,S,S] -> float [B,1,S,S]: the normalisation `trainer.loop.predict` applies."""
    x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return augment_batch(x, AugmentSpec(flip=False, light=False, mean=mean, std=std), None)
