"""Batch augmentation on the device the model runs on.

uint8 [B, 1, S, S] -> float [B, 1, S, S]: scale to 0..1, optional random horizontal flip, optional
small random resized crop + rotation (one `grid_sample` per batch), then (x - mean) / std.

Random parameters are drawn on the CPU from a `torch.Generator` seeded with (seed, epoch, step, rank)
(`batch_generator`) and then moved to the device: the global RNG is never touched, the same step
gets the same augmentation after a resume, and CPU and CUDA runs draw the same parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentSpec:
    flip: bool = True                    # random horizontal flip, p = 0.5
    light: bool = True                   # random resized crop + rotation below
    scale: tuple[float, float] = (0.85, 1.0)   # crop area as a fraction of the image
    ratio: tuple[float, float] = (0.95, 1.05)  # crop aspect ratio
    degrees: float = 5.0                 # rotation in [-degrees, degrees]
    mean: float = 0.5                    # normalisation (0..1 scale)
    std: float = 0.5


def batch_generator(seed: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, epoch, step, rank)."""
    state = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def normalize(images: torch.Tensor, mean: float, std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or 0..1 float) images -> (x/255 - mean) / std as `dtype`."""
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    return (x - mean) / std


def augment_batch(images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Augment (when `generator` is given) and normalise a uint8 batch [B, C, H, W] on its own device."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if generator is not None and (spec.flip or spec.light):
        b = x.shape[0]
        flip = torch.rand(b, generator=generator) < 0.5
        if spec.light:
            area = torch.empty(b).uniform_(*spec.scale, generator=generator)
            log_r = torch.empty(b).uniform_(math.log(spec.ratio[0]), math.log(spec.ratio[1]), generator=generator)
            ratio = torch.exp(log_r)
            sx = torch.sqrt(area * ratio).clamp(max=1.0)     # crop width / image width
            sy = torch.sqrt(area / ratio).clamp(max=1.0)
            cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sx)   # crop centre in [-1, 1]
            cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sy)
            angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(spec.degrees)
            cos, sin = torch.cos(angle), torch.sin(angle)
            sign = torch.where(flip, -1.0, 1.0) if spec.flip else torch.ones(b)
            # output (u, v) in [-1, 1] samples the input at centre + R(angle) @ diag(sx*sign, sy) @ (u, v)
            theta = torch.stack([
                torch.stack([cos * sx * sign, -sin * sy, cx], dim=1),
                torch.stack([sin * sx * sign, cos * sy, cy], dim=1),
            ], dim=1).to(device=x.device, dtype=x.dtype)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif spec.flip:
            x = torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return (x - spec.mean) / spec.std
