"""One training epoch and one prediction pass, with explicit arguments (torchvision references style)."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from manifests.errors import CxrError
from trainer import distributed
from trainer.augment import AugmentSpec, augment_batch, batch_generator
from trainer.losses import LossFn, probabilities

FLUSH_EVERY = 32   # steps between reading losses back from the device (one sync each)


class DivergenceError(CxrError):
    """The loss (or a validation output) stopped being finite: the run stops, its checkpoints stay."""


def divergence_message(what: str, epoch: int, step: int, lr: float, value: float) -> str:
    return (f"{what} is {value} at epoch {epoch + 1}, step {step + 1}, learning rate {lr:.3g}: the run diverged "
            "and stopped, keeping last.pt and best.pt of the last good epoch (if any). Lower --lr, or try "
            "--precision fp32")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EpochStats:
    loss: float              # mean training loss over the epoch's batches (all ranks)
    samples: int             # training samples seen (all ranks)
    steps: int               # optimizer steps taken
    seconds: float           # wall time of the epoch
    wait_seconds: float      # time spent waiting for the next batch (this rank)
    lr: float                # learning rate of the last step
    loss_sum: float = 0.0    # sum of sample losses (all ranks): loss = loss_sum / samples
    batches: int = 0         # batches of the epoch done (those before a resume included)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")

    @property
    def wait_fraction(self) -> float:
        return self.wait_seconds / self.seconds if self.seconds > 0 else float("nan")


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def _select(labels: torch.Tensor, label_index: Sequence[int] | None) -> torch.Tensor:
    return labels if label_index is None else labels[:, list(label_index)]


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    device: torch.device,
    *,
    epoch: int,
    start_step: int,
    lr_at: Callable[[int, float], float],
    augment: AugmentSpec,
    seed: int = 0,
    rank: int = 0,
    label_index: Sequence[int] | None = None,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    set_train_mode: Callable[[nn.Module], None] | None = None,
    on_batch: Callable | None = None,
    on_inputs: Callable[[torch.Tensor, int], None] | None = None,
    start_batch: int = 0,
    carry: EpochStats | None = None,
    after_step: Callable[[int, int, Callable[[], EpochStats]], bool] | None = None,
) -> EpochStats:
    """Train `model` for one pass over `loader` (batches of (uint8 images, float labels, keys)).

    Resuming inside an epoch: `loader` yields the epoch's batches after its first `start_batch` (the
    stream's `set_start`), `start_step` is the global step reached, and `carry` the totals of the batches
    done before (added to the returned stats). `after_step(batches_done, steps_done, snapshot)` is called
    after every step (`snapshot()` gives the epoch's stats so far, a collective call under torchrun);
    True stops the epoch there (the returned `batches` is then short of the epoch's).

    The learning rate of step s is `lr_at(s, progress)` (progress = epoch + batch / batches); the
    augmentation of step s draws from `batch_generator(seed, epoch, s, rank)`. A final batch of a
    single sample is skipped when training alone (BatchNorm cannot train on it at small image sizes).

    Losses are read back from the device every FLUSH_EVERY steps and at the end (never a sync per step);
    a non-finite one raises DivergenceError naming its epoch, step and learning rate. `on_batch` gets a
    `trainer.watch.BatchReport` after every batch (with the losses read back since the last one);
    `on_inputs(x, step)` gets the first augmented batch exactly as the model sees it.
    """
    (set_train_mode or (lambda m: m.train()))(model)
    n_batches = max(len(loader), 1)  # type: ignore[arg-type]
    step = start_step
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    samples = 0
    wait = 0.0
    lr = float("nan")
    start = time.perf_counter()
    it = iter(loader)
    i = consumed = int(start_batch)
    pending: list[tuple[int, torch.Tensor, float]] = []
    before = carry or EpochStats(0.0, 0, 0, 0.0, 0.0, float("nan"))

    def flush() -> list[tuple[int, float, float]]:
        if not pending:
            return []
        values = torch.stack([loss for _, loss, _ in pending]).float().tolist()
        done = [(s, v, lr_s) for (s, _, lr_s), v in zip(pending, values)]
        pending.clear()
        for s, v, lr_s in done:
            if not math.isfinite(v):
                raise DivergenceError(divergence_message("the training loss", epoch, s, lr_s, v))
        return done

    def totals() -> EpochStats:
        """The epoch so far (all ranks; `carry` included), after reading back the pending losses."""
        flushed = flush()
        if on_batch is not None and flushed:
            on_batch(_report(i, n_batches, samples, time.perf_counter() - start, wait, flushed))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        total_loss, total_samples = distributed.all_reduce_sum([float(loss_sum.item()), float(samples)], device)
        total_loss, total_samples = total_loss + before.loss_sum, int(total_samples) + before.samples
        return EpochStats(loss=total_loss / max(total_samples, 1), samples=total_samples, steps=step - start_step,
                          seconds=seconds + before.seconds, wait_seconds=wait + before.wait_seconds, lr=lr,
                          loss_sum=total_loss, batches=consumed)

    while True:
        t0 = time.perf_counter()
        try:
            images, labels, _keys = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        consumed += 1
        if images.shape[0] == 1 and not distributed.is_enabled():
            continue  # BatchNorm cannot train on a single sample (1x1 maps at small sizes); like drop_last
        x = images.to(device, non_blocking=True)
        y = _select(labels, label_index).to(device, non_blocking=True)
        x = augment_batch(x, augment, batch_generator(seed, epoch, step, rank))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if on_inputs is not None and i == 0:
            on_inputs(x, step)
        lr = lr_at(step, epoch + i / n_batches)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, precision):
            logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().double() * x.shape[0]
        samples += x.shape[0]
        pending.append((step, loss.detach(), lr))
        step += 1
        i += 1
        flushed = flush() if len(pending) >= FLUSH_EVERY else []
        if on_batch is not None:
            on_batch(_report(i, n_batches, samples, time.perf_counter() - start, wait, flushed))
        if after_step is not None and after_step(consumed, step - start_step, totals):
            break
    return totals()


def _report(batch: int, batches: int, samples: int, seconds: float, wait: float, losses):
    from trainer.watch import BatchReport

    return BatchReport(batch=batch, batches=batches, samples=samples, seconds=seconds, wait_seconds=wait,
                       losses=losses)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    mean: float,
    std: float,
    label_index: Sequence[int] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    gather: bool = True,
    on_batch: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(logits [N, K] float32 CPU, labels [N, L] float32 CPU, keys) over `loader`; under torchrun the
    rows of every rank are gathered (rank order), so each rank gets the whole split. `on_batch` gets a
    `trainer.watch.BatchReport` (no losses) after every batch."""
    model.eval()
    spec = AugmentSpec(flip=False, light=False, mean=mean, std=std)
    outs, ys, keys = [], [], []
    n_batches = len(loader) if on_batch is not None else 0  # type: ignore[arg-type]
    start = time.perf_counter()
    for images, labels, batch_keys in loader:
        x = augment_batch(images.to(device, non_blocking=True), spec, None)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        outs.append(logits.float())
        ys.append(_select(labels, label_index).to(device))
        keys.extend(batch_keys)
        if on_batch is not None:
            on_batch(_report(len(outs), n_batches, len(keys), time.perf_counter() - start, 0.0, []))
    logits = torch.cat(outs) if outs else torch.zeros((0, 0), device=device)
    labels = torch.cat(ys) if ys else torch.zeros((0, 0), device=device)
    if gather:
        logits = distributed.gather_rows(logits)
        labels = distributed.gather_rows(labels)
        keys = distributed.gather_objects(keys)
    return logits.cpu(), labels.cpu(), keys


def predict(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    mean: float = 0.5,
    std: float = 0.5,
    head: str = "sigmoid",
    label_index: Sequence[int] | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    gather: bool = True,
    on_batch: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probabilities [N, L], labels [N, L] with NaN = not labelled, keys) as numpy float32.

    `head` is "sigmoid" (one logit per label) or "softmax" (2 logits, probability = softmax[:, 1]);
    `mean`/`std` the run's input normalisation (see `trainer.checkpoint.load_for_inference`).
    """
    logits, labels, keys = predict_logits(model, loader, device, mean=mean, std=std, label_index=label_index,
                                          precision=precision, channels_last=channels_last, gather=gather,
                                          on_batch=on_batch)
    probs = probabilities(logits, head) if logits.numel() else logits
    return probs.numpy().astype(np.float32), labels.numpy().astype(np.float32), keys
