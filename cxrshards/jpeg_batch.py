"""JPEG batches decoded where the model runs (`cxr train --decode gpu`).

The rules:
- With `open_shards(..., decode="gpu")` a JPEG tar set yields `(EncodedJpegBatch, labels, keys)`: the
  loader workers only read the tars; the encoded bytes travel to the training process as they are.
- `EncodedJpegBatch.to(device)` decodes the whole batch in one call of `torchvision.io.decode_jpeg(list,
  device=...)` (nvJPEG's batched decoder on CUDA; libjpeg on CPU, which the tests use) as gray, and
  returns uint8 [B, 1, S, S] on `device`, the same layout the CPU path yields. Any other shape is a
  one-line error naming the sample.
- It has `.shape` and `.to()` like the image tensor it stands for, so the trainer's loop is unchanged.
"""
from __future__ import annotations

import torch

from manifests.errors import CxrError


class EncodedJpegBatch:
    """B encoded JPEGs (1-D uint8 tensors) of S x S gray images, decoded by `.to(device)`."""

    def __init__(self, data: list[torch.Tensor], size: int, keys: list[str], where: str):
        self.data, self.size, self.keys, self.where = data, int(size), keys, where

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.data), 1, self.size, self.size)

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        device = torch.device(device)
        try:
            images = decode_jpeg(self.data, mode=ImageReadMode.GRAY, device=device)
        except RuntimeError as exc:
            raise CxrError(f"{self.where}: cannot decode a JPEG of this batch on {device} ({exc}); "
                           f"train with --decode cpu to find it") from None
        for image, key in zip(images, self.keys):
            if tuple(image.shape) != (1, self.size, self.size):
                raise CxrError(f"{self.where}: sample {key} decodes to {tuple(image.shape)}, expected "
                               f"(1, {self.size}, {self.size})")
        return torch.stack(images) if images else torch.empty(self.shape, dtype=torch.uint8, device=device)
