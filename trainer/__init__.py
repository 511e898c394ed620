"""The lean trainer: shard batches into a torchvision model, checkpoints and metrics.

`trainer.fit(config) -> run dir` (config: `trainer.config.TrainConfig`). Submodules: config, models,
losses, augment, schedule, loop (train_one_epoch, predict), checkpoint, distributed, metrics, fitting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.fitting import fit  # noqa: F401

__all__ = ["fit"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import trainer.metrics` stays light (no torch import for pure-array metrics).
    if name == "fit":
        from trainer.fitting import fit

        return fit
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
