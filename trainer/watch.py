"""Watching a run: progress within an epoch, TensorBoard events, and `curves.png`.

The rules:
- Progress: on a terminal, a rich bar (batch i/N, samples/s, data-wait %, running loss, ETA of the epoch
  and of the run); when output is not a terminal (nohup, SLURM logs), one plain line every `log_every`
  seconds and at the end of each epoch; `quiet` prints nothing. The run's ETA assumes the remaining
  epochs take as long as this one will.
- TensorBoard: one `torch.utils.tensorboard.SummaryWriter` per run, writing `RUN/tb/`, opened on rank 0
  only and closed when the run ends. Tags: per optimizer step `train/loss_step` and `train/lr` (step =
  global step, 1-based); per epoch (step = epoch, 1-based) `train/loss`, `val/loss`, `val/auroc_macro`,
  `val/auroc_micro`, `val/auroc/LABEL`, `speed/samples_per_s`, `speed/data_wait`; once per run
  `train/inputs`, a grid of the first augmented training batch exactly as the model sees it, shown by the
  fixed map [-3, 3] -> [0, 1] (a correctly normalised image is mid-gray with contrast; a wrong
  normalisation shows as near black or white); and `val/pr/LABEL` PR curves of each validation.
- `curves.png` (matplotlib), rewritten atomically after every epoch: train/val loss and val AUROC
  (macro, and micro) per epoch, the best epoch marked.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

import numpy as np
import torch


INPUT_RANGE = 3.0   # model inputs shown in TensorBoard as [-3, 3] -> [0, 1]


@dataclass
class BatchReport:
    """What `train_one_epoch` tells its watcher after each batch (no device sync needed)."""
    batch: int                                   # batches done in this epoch (1-based)
    batches: int                                 # batches in the epoch
    samples: int                                 # samples done in this epoch (this rank)
    seconds: float                               # wall time since the epoch started
    wait_seconds: float                          # of which waiting for data
    losses: Sequence[tuple[int, float, float]]   # (global step, loss, lr) of steps flushed since the last report


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Progress of a run's epochs: a rich bar on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, *, epochs: int, quiet: bool = False, log_every: float = 30.0, stream: TextIO | None = None,
                 terminal: bool | None = None, clock: Callable[[], float] = time.monotonic, what: str = "epoch") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)()) if terminal is None else terminal
        self.quiet, self.log_every, self.clock, self.epochs, self.what = quiet, float(log_every), clock, epochs, what
        self.bar = None
        self.loss_sum, self.loss_n = 0.0, 0
        self.last: BatchReport | None = None   # the latest report of this epoch

    def start_epoch(self, epoch: int, batches: int) -> None:
        """`epoch` is 0-based; the lines say epoch + 1."""
        self.epoch, self.batches = epoch, batches
        self.loss_sum, self.loss_n = 0.0, 0
        self.last = None
        self.last_line = self.clock()
        if self.quiet or not self.terminal:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn

        self.bar = Bar(TextColumn(f"[bold]{self.what} {epoch + 1}/{self.epochs}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[status]}"), console=Console(file=self.stream), transient=False)
        self.bar.start()
        self.task = self.bar.add_task(self.what, total=batches, status="")

    def update(self, report: BatchReport) -> None:
        self.last = report
        for _step, loss, _lr in report.losses:
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=report.batch, status=self.status(report))
        elif self.clock() - self.last_line >= self.log_every:
            self.last_line = self.clock()
            self._print(report)

    def end_epoch(self, report: BatchReport | None) -> None:
        if self.bar is not None:
            if report is not None:
                self.bar.update(self.task, completed=report.batch, status=self.status(report))
            self.bar.stop()
            self.bar = None
        elif not self.quiet and report is not None:
            self._print(report)

    def status(self, r: BatchReport) -> str:
        rate = r.samples / r.seconds if r.seconds > 0 else float("nan")
        wait = 100.0 * r.wait_seconds / r.seconds if r.seconds > 0 else float("nan")
        per_batch = r.seconds / r.batch if r.batch else float("nan")
        epoch_left = per_batch * (r.batches - r.batch)
        run_left = epoch_left + per_batch * r.batches * (self.epochs - self.epoch - 1)
        loss = f"{self.loss_sum / self.loss_n:.4f}" if self.loss_n else "-"
        return (f"{rate:,.1f} samples/s, data wait {wait:.1f}%, loss {loss}, "
                f"ETA epoch {format_duration(epoch_left)}, run {format_duration(run_left)}")

    def _print(self, r: BatchReport) -> None:
        share = 100.0 * r.batch / r.batches if r.batches else 100.0
        print(f"{self.what} {self.epoch + 1}/{self.epochs} batch {r.batch}/{r.batches} ({share:.0f}%): "
              + self.status(r), file=self.stream, flush=True)


class TensorBoard:
    """The run's SummaryWriter (`RUN/tb/`); every method is a no-op when not `enabled` (ranks > 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None) -> None:
        """`purge_step`: a resumed run's first step; TensorBoard drops the events the run wrote at or after it
        before it was stopped (so no step appears twice)."""
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)
        self.inputs_done = False

    def steps(self, losses: Sequence[tuple[int, float, float]]) -> None:
        if self.writer is None:
            return
        for step, loss, lr in losses:
            self.writer.add_scalar("train/loss_step", loss, step + 1)
            self.writer.add_scalar("train/lr", lr, step + 1)

    def inputs(self, x: torch.Tensor, step: int) -> None:
        """A grid of model inputs (normalised [B,1,H,W]), once per run."""
        if self.writer is None or self.inputs_done:
            return
        from torchvision.utils import make_grid

        shown = ((x[:64].detach().float().cpu() + INPUT_RANGE) / (2 * INPUT_RANGE)).clamp(0, 1)
        self.writer.add_image("train/inputs", make_grid(shown, nrow=8, padding=2), step)
        self.inputs_done = True

    def epoch(self, epoch: int, *, train_loss: float, val_loss: float, macro: float, micro: float,
              per_label: dict[str, float], samples_per_s: float, wait_fraction: float,
              pr: tuple[np.ndarray, np.ndarray, Sequence[str]] | None = None) -> None:
        if self.writer is None:
            return
        w = self.writer
        for tag, value in (("train/loss", train_loss), ("val/loss", val_loss), ("val/auroc_macro", macro),
                           ("val/auroc_micro", micro), ("speed/samples_per_s", samples_per_s),
                           ("speed/data_wait", wait_fraction)):
            w.add_scalar(tag, value, epoch)
        for name, value in per_label.items():
            w.add_scalar(f"val/auroc/{name}", value, epoch)
        if pr is not None:
            y, p, labels = pr
            for j, name in enumerate(labels):
                usable = ~np.isnan(y[:, j])
                if usable.any():
                    w.add_pr_curve(f"val/pr/{name}", y[usable, j].astype(np.int64), p[usable, j], epoch)
        w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_training_curves(rows: Sequence[dict], path: str | Path, extra_auroc: Sequence[str] = ()) -> Path:
    """`curves.png` from metrics.csv rows: losses and val AUROC per epoch, the best epoch marked.

    The best epoch is the one with the highest `val_auroc_macro` (the one best.pt holds); `extra_auroc`
    names more AUROC columns to draw (e.g. one per shard set)."""
    from trainer.plots import pyplot, save_figure

    plt = pyplot()

    def col(name: str) -> np.ndarray:
        return np.array([float(r.get(name, "nan") or "nan") for r in rows], dtype=np.float64)

    epochs = col("epoch")
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, col("train_loss"), "o-", label="train loss")
    ax_loss.plot(epochs, col("val_loss"), "o-", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    macro = col("val_auroc_macro")
    ax_auc.plot(epochs, macro, "o-", label="val AUROC macro")
    ax_auc.plot(epochs, col("val_auroc_micro"), "o--", label="val AUROC micro")
    for name in extra_auroc:
        ax_auc.plot(epochs, col(name), ".-", label=name)
    if np.isfinite(macro).any():
        best = int(np.nanargmax(macro))
        for ax in (ax_loss, ax_auc):
            ax.axvline(epochs[best], color="gray", linestyle=":", label=None)
        ax_auc.plot([epochs[best]], [macro[best]], "r*", markersize=14, label=f"best epoch {int(epochs[best])}")
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("AUROC")
    ax_auc.legend(fontsize=8)
    return save_figure(fig, path)
