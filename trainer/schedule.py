"""The learning rate as a pure function of where training is (nanoGPT's `get_lr`): no scheduler state,
so a resumed run sets exactly the rate the straight run would have set.

`progress` is the number of epochs done as a float (epoch + batch / batches_in_epoch): epochs may differ
in length under the per-label cap, so step decay and cosine follow epochs, warmup follows optimizer steps.
"""
from __future__ import annotations

import math

from trainer.config import TrainConfig


def get_lr(step: int, progress: float, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based, global) at `progress` epochs."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.scheduler == "none":
        return cfg.lr
    if cfg.scheduler == "step":
        return cfg.lr * cfg.gamma ** (int(progress) // cfg.step_size)
    if cfg.scheduler == "cosine":
        t = min(max(progress / cfg.epochs, 0.0), 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown scheduler {cfg.scheduler!r}")


def schedule_state(cfg: TrainConfig, step: int, progress: float, last_lr: float) -> dict:
    """What a checkpoint records under `scheduler`: the recipe and where it stands. Informative only:
    a resumed run recomputes every rate with `get_lr`."""
    return {"name": cfg.scheduler, "lr": cfg.lr, "warmup": cfg.warmup, "step_size": cfg.step_size,
            "gamma": cfg.gamma, "min_lr": cfg.min_lr, "epochs": cfg.epochs, "step": step,
            "progress": progress, "last_lr": last_lr}
