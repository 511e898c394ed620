"""`fit(config) -> run dir`: the whole of `cxr train`, from a shard set to checkpoints and metrics.

Reads: the shard sets' cards (labels, pixel stats) and, for the per-label cap, pos_weight or --views, their
manifests. The sets (`--shards A[,B...]`) are read as one by `cxrshards.mix` (its rules: labels met through
shared names, the --mix, pooled normalisation); one set is a mix of one and reads exactly as that set alone.
Writes (rank 0 only), all atomically: RUN/config.json, RUN/cards/NAME.json per set, metrics.csv (a
`val_auroc_macro_NAME` column per set beside the pooled `val_auroc_macro`), last.pt (every epoch), best.pt
(best pooled valid macro AUROC, or --select-on NAME's).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import cxrshards
from cxrshards import mix
from manifests import __version__
from manifests.atomic import atomic_path, write_bytes_atomic
from manifests.errors import CxrError
from manifests.labelmap import LabelMap, load_label_map
from manifests.lock import folder_lock
from manifests.sampling import cap_sample
from manifests.table import read_manifest
from trainer import distributed
from trainer.augment import AugmentSpec
from trainer.checkpoint import (CheckpointError, card_sha256, load_checkpoint, restore_rng, rng_state,
                                save_checkpoint, sets_sha256, trained_card_shas)
from trainer.config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from trainer.preempt import Preemption, Stop, exit_status, resume_line, stop_line
from trainer.watch import Progress, TensorBoard, plot_training_curves
from trainer.loop import DivergenceError, EpochStats, divergence_message, predict_logits, train_one_epoch
from trainer.losses import make_loss, pos_weight_from_table, probabilities
from trainer.metrics import auroc_per_label, macro_auroc, micro_auroc
from trainer.models import (apply_stage, build_model, imagenet_weights_path, load_imagenet, load_transfer,
                            set_train_mode)
from trainer.schedule import get_lr, schedule_state

METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auroc_macro", "val_auroc_micro", "lr",
                  "samples_per_s", "data_wait_frac", "train_samples", "val_samples", "epoch_s")
STATE_HASH_ENV = "CXR_STATE_HASH_DIR"   # debug/test hook: each rank writes the sha256 of its final weights there

Log = Callable[[str], None]


# --------------------------------------------------------------------------- resolving the setup

def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def resolve_task(task: str, loss: str, n_labels: int) -> tuple[str, str, int]:
    """(task, head, number of logits)."""
    if task == "auto":
        task = "binary" if n_labels == 1 else "multilabel"
    if task == "binary" and n_labels != 1:
        raise ConfigError(f"--task binary needs exactly one label, this run has {n_labels}: pass --labels NAME")
    if loss == "ce" and task != "binary":
        raise ConfigError("--loss ce is for a binary task (one label, 2 logits); use bce, bce-pos-weight or focal")
    if loss == "ce":
        return task, "softmax", 2
    return task, "sigmoid", n_labels


def _select_views(table, views: tuple[str, ...], name: str):
    """The rows whose view is in `views` (all rows when empty); CxrError if train or valid is left empty."""
    if not views:
        return table
    kept = table[table["view"].isin(views)]
    for split in ("train", "valid"):
        if not (kept["split"] == split).any():
            present = sorted(str(v) for v in table["view"].dropna().unique())
            raise ConfigError(f"--views {','.join(views)}: no {split} rows of {name} have these views "
                              f"(views present: {', '.join(present) or 'none'})")
    return kept


@dataclass
class RunData:
    """Where a run's samples come from: its shard sets read as one (`cxrshards.mix`; one set is a mix of one)."""
    sets: list[mix.MixSet]
    labels: mix.RunLabels            # the run's label names, and the same labels in shared names
    mean: float
    std: float

    @property
    def name(self) -> str:           # for the log
        return "+".join(s.name for s in self.sets)

    @property
    def card_shas(self) -> list[str]:
        return [card_sha256(s.shard_dir) for s in self.sets]

    def table(self, views: tuple[str, ...]):
        """The sets' manifest rows (`mix.combined_table`, keys NAME/KEY), --views applied per set: the per-label
        cap and pos_weight draw on them."""
        import pandas as pd

        combined = mix.combined_table(self.sets, self.labels)
        return pd.concat([_select_views(combined[combined["set"] == s.name], views, s.name) for s in self.sets],
                         ignore_index=True)

    def open(self, cfg: TrainConfig, split: str, **kwargs) -> mix.MixedStream:
        return mix.open_mix(self.sets, split, self.labels.shared,
                            mix=cfg.mix if split == "train" else "proportional", **kwargs)

    def write_cards(self, run_dir: Path) -> None:
        (run_dir / "cards").mkdir(exist_ok=True)
        for s in self.sets:
            with atomic_path(run_dir / "cards" / f"{s.name}.json") as tmp:
                shutil.copyfile(s.shard_dir / "dataset.json", tmp)

    def checkpoint_fields(self, label_map: LabelMap) -> dict[str, Any]:
        shas = self.card_shas
        return {"labels": self.labels.names, "shared_labels": self.labels.shared, "label_map": label_map.to_rows(),
                "card_sha256": sets_sha256(shas),
                "sets": [{"name": s.name, "path": str(s.shard_dir), "source": s.source, "card_sha256": sha,
                          "labels": s.labels} for s, sha in zip(self.sets, shas)]}


def run_data(cfg: TrainConfig, label_map: LabelMap) -> RunData:
    """The run's shard sets, labels and normalisation."""
    sets = mix.resolve_sets(cfg.shards, cfg.root, label_map, cache=cfg.cache, cache_gb=cfg.cache_gb)
    if cfg.select_on is not None and cfg.select_on not in [s.name for s in sets]:
        raise ConfigError(f"--select-on {cfg.select_on!r}: not one of this run's shard sets "
                          f"({', '.join(s.name for s in sets)})")
    for s in sets:
        if not s.card.get("splits", {}).get("valid", {}).get("count", 1):
            raise CxrError(f"shard set {s.shard_dir} has no valid samples: validation needs the valid split")
    labels = mix.run_labels(sets, cfg.labels)
    mean, std = (float(cfg.normalize[0]), float(cfg.normalize[1])) if cfg.normalize is not None \
        else mix.pooled_normalisation(sets)
    return RunData(sets, labels, mean, std)


def _config_changes(old: dict, new: TrainConfig) -> list[str]:
    now = new.to_dict()
    return [k for k in now if k not in RESUMABLE_CHANGES and k in old and old[k] != now[k]]


def _check_resume(state: dict, cfg: TrainConfig, data: RunData) -> None:
    where = state["path"]
    trained, now = trained_card_shas(state), data.card_shas
    if trained != now:
        raise CheckpointError(f"{where} was trained on another shard set: card sha256 "
                              f"{', '.join(t[:12] + '...' for t in trained)}, the cards of {data.name} have "
                              f"{', '.join(n[:12] + '...' for n in now)}")
    if list(state.get("shared_labels") or state["labels"]) != data.labels.shared:
        raise CheckpointError(f"{where} was trained on labels {', '.join(state['labels'])}, this run has "
                              f"{', '.join(data.labels.names)}")
    changed = _config_changes(state["config"], cfg)
    if changed:
        k = changed[0]
        raise CheckpointError(f"{where}: --resume with a changed option {k} ({state['config'][k]!r} -> "
                              f"{cfg.to_dict()[k]!r})" + (f" and {len(changed) - 1} more" if len(changed) > 1 else "")
                              + "; resume with the run's own options or start a new --out")


def _check_position(state: dict, cfg: TrainConfig, info: distributed.DistInfo, log: Log) -> None:
    """A checkpoint from inside an epoch resumes only where its epoch's plan is the same; a finished run
    has nothing to resume (`Stop`, status 0)."""
    where, done = state["path"], int(state.get("batches_done", 0))
    if not done and int(state["epoch"]) >= cfg.epochs:
        line = (f"{cfg.out} already finished: {state['epoch']} of {cfg.epochs} epochs done, nothing to resume "
                f"(pass a larger --epochs to train on)")
        log(line)
        raise Stop(line, 0)
    if done and int(state.get("world_size", 1)) != info.world_size:
        raise CheckpointError(f"{where} stopped inside epoch {int(state['epoch']) + 1} with "
                              f"{state.get('world_size', 1)} rank(s): resume it with as many ranks (this run has "
                              f"{info.world_size}), or from an epoch's end")
    if done and max(1, int(state.get("workers", cfg.workers))) != max(1, cfg.workers):
        raise CheckpointError(f"{where} stopped inside epoch {int(state['epoch']) + 1} with --workers "
                              f"{state['workers']}: resume it with --workers {state['workers']} (the order of an "
                              f"epoch's batches depends on it)")


def _make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _init_weights(model: nn.Module, cfg: TrainConfig, labels: list[str], task: str, head: str, log: Log) -> None:
    if cfg.init == "scratch":
        return
    if cfg.init == "imagenet":
        path = imagenet_weights_path(cfg.model, cfg.imagenet_weights)
        load_imagenet(model, cfg.model, path)
        log(f"init: ImageNet weights {path}")
        return
    src = load_checkpoint(cfg.init)
    if src["config"].get("model") != cfg.model:
        raise ConfigError(f"--init {cfg.init} holds a {src['config'].get('model')}, but --model is {cfg.model}")
    keep_head = list(src["labels"]) == labels and src["task"] == task and src.get("head", "sigmoid") == head
    load_transfer(model, cfg.model, src["model"], keep_head=keep_head, source=src["path"])
    log(f"init: {src['path']} ({'whole model' if keep_head else 'backbone; new head for ' + ', '.join(labels)})")


def state_sha256(model: nn.Module, buffers: bool = True) -> str:
    """sha256 over the names and bytes of every tensor of the model's state dict (`buffers=False`: of its
    parameters only)."""
    h = hashlib.sha256()
    tensors = model.state_dict() if buffers else dict(model.named_parameters())
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_state_hash(model: nn.Module, rank: int, stopped: bool = False) -> None:
    """The STATE_HASH_ENV hook: this rank's weights' sha256 in DIR/rankR.sha256 at the end; at a stop inside
    an epoch its parameters' in DIR/rankR.stop.sha256 (BatchNorm statistics differ between ranks until the
    epoch's end averages them)."""
    hash_dir = os.environ.get(STATE_HASH_ENV)
    if hash_dir:
        Path(hash_dir).mkdir(parents=True, exist_ok=True)
        name = f"rank{rank}.stop.sha256" if stopped else f"rank{rank}.sha256"
        (Path(hash_dir) / name).write_text(state_sha256(model, buffers=not stopped) + "\n")


def epoch_keys(cfg: TrainConfig, table, labels: list[str], epoch: int) -> list[str]:
    """The train keys of `epoch`: the per-label cap's fresh draw (a pure function of (seed, epoch)), else
    every train row of `table` (already restricted to --views)."""
    if cfg.max_per_label:
        return cap_sample(table, labels, cfg.max_per_label, cfg.seed, epoch)
    return table.loc[table["split"] == "train", "key"].tolist()


# --------------------------------------------------------------------------- validation and metrics.csv

@dataclass
class Validation:
    loss: float                  # mean loss over labelled entries of the whole valid split
    macro: float                 # AUROC averaged over labels where defined (NaN if none)
    micro: float
    per_label: np.ndarray        # AUROC per label, NaN where undefined
    samples: int
    per_set: dict[str, float] = dataclasses.field(default_factory=dict)   # several sets: macro AUROC of each
    y: np.ndarray | None = None             # labels [N, L] (NaN = not labelled), for the PR curves
    probs: np.ndarray | None = None         # probabilities [N, L]




def validate(model: nn.Module, loader, loss_fn, device: torch.device, *, head: str, mean: float, std: float,
             precision: str, channels_last: bool, sets: list[str]) -> Validation:
    """Loss and AUROC on the valid split (every rank's rows gathered, so all ranks get the same numbers).
    `sets`: the set names of the mixed stream (keys NAME/KEY); each gets its own macro AUROC too."""
    logits, y, keys = predict_logits(model, loader, device, mean=mean, std=std,
                                     precision=precision, channels_last=channels_last)
    if not len(y):
        return Validation(float("nan"), float("nan"), float("nan"), np.full(0, np.nan), 0)
    probs, y_np = probabilities(logits, head).numpy(), y.numpy()
    if not np.isfinite(probs).all():   # diverged: no metrics; the epoch loop stops the run with its context
        return Validation(float("nan"), float("nan"), float("nan"), np.full(len(y_np[0]), np.nan), len(y_np),
                          y=y_np, probs=probs)
    of = np.array([mix.split_key(k)[0] for k in keys])
    per_set = {name: macro_auroc(y_np[of == name], probs[of == name]) for name in sets}
    return Validation(loss=float(loss_fn(logits, y).item()), macro=macro_auroc(y_np, probs),
                      micro=micro_auroc(y_np, probs), per_label=auroc_per_label(y_np, probs), samples=len(y_np),
                      per_set=per_set, y=y_np, probs=probs)


def _metrics_row(epoch: int, stats: EpochStats, val: Validation, labels: list[str]) -> dict[str, Any]:
    row = {"epoch": epoch, "train_loss": _fmt(stats.loss), "val_loss": _fmt(val.loss),
           "val_auroc_macro": _fmt(val.macro), "val_auroc_micro": _fmt(val.micro), "lr": _fmt(stats.lr),
           "samples_per_s": _fmt(stats.samples_per_s), "data_wait_frac": _fmt(stats.wait_fraction),
           "train_samples": stats.samples, "val_samples": val.samples, "epoch_s": _fmt(stats.seconds)}
    row.update({f"auroc_{name}": _fmt(float(a)) for name, a in zip(labels, val.per_label)})
    row.update({f"val_auroc_macro_{name}": _fmt(a) for name, a in val.per_set.items()})
    return row


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if int(row["epoch"]) <= upto_epoch]


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(METRIC_COLUMNS)
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, buf.getvalue().encode())


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"


# --------------------------------------------------------------------------- the run

def fit(cfg: TrainConfig, log: Log | None = None) -> Path:
    """Train as `cfg` says; returns the run folder. Under torchrun every rank calls this."""
    cfg.validate()
    info = distributed.env_info()
    device = pick_device(cfg.device, info.local_rank)
    distributed.init(device)
    try:
        with (folder_lock(cfg.out, "training run", hint="wait for it to finish, or pick another --out")
              if info.is_main else contextlib.nullcontext()):   # one run per folder (rank 0 holds it)
            return _fit(cfg, device, info, log if info.is_main and log is not None else (lambda _msg: None))
    finally:
        distributed.shutdown()


def _fit(cfg: TrainConfig, device: torch.device, info: distributed.DistInfo, log: Log) -> Path:
    run_dir = Path(cfg.out)
    label_map = load_label_map(cfg.label_map)
    data = run_data(cfg, label_map)
    mean, std = data.mean, data.std
    task, head, n_outputs = resolve_task(cfg.task, cfg.loss, len(data.labels.names))

    # -- resume or fresh start
    state = None
    if cfg.resume:
        ckpt = run_dir / "last.pt" if cfg.resume == "last" else Path(cfg.resume)
        if not ckpt.is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: no checkpoint at {ckpt}; start the run "
                                  f"without --resume" if cfg.resume == "last" else f"--resume: no checkpoint at {ckpt}")
        state = load_checkpoint(ckpt)
        _check_resume(state, cfg, data)
        _check_position(state, cfg, info, log)
        data.labels = mix.RunLabels(list(state["labels"]), data.labels.shared)   # the run keeps its own names
    elif (run_dir / "last.pt").exists():
        raise ConfigError(f"{run_dir} already holds a run (last.pt): pass --resume to continue it or pick another --out")

    labels = data.labels.names

    # -- model, stage, optimizer
    model = build_model(cfg.model, n_outputs, seed=cfg.seed)
    if state is None:
        _init_weights(model, cfg, labels, task, head, log)
    trained = apply_stage(model, cfg.model, cfg.stage)
    if cfg.stage:
        log(f"stage {cfg.stage}: training {len(trained)} of {len(list(model.parameters()))} parameter tensors")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start_epoch, step, best, best_epoch = 0, 0, float("-inf"), 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best = float(state["best_metric"]) if state.get("best_metric") is not None else float("-inf")
        best_epoch = int(state.get("best_epoch", 0))
        restore_rng(state.get("rng", {}))

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    # -- data
    table = None
    if cfg.max_per_label or cfg.loss == "bce-pos-weight" or cfg.views:
        table = data.table(cfg.views)
    pos_weight = None
    if cfg.loss == "bce-pos-weight":
        pos_weight = torch.from_numpy(pos_weight_from_table(table, labels))
        log("pos_weight: " + ", ".join(f"{n}={w:.3g}" for n, w in zip(labels, pos_weight.tolist())))
    loss_fn = make_loss(cfg.loss, pos_weight=pos_weight, gamma=cfg.focal_gamma, alpha=cfg.focal_alpha)
    common = dict(format=cfg.format, seed=cfg.seed, batch_size=cfg.batch_size,
                  rank=info.rank, world_size=info.world_size)
    if cfg.decode == "gpu" and device.type != "cuda":
        raise ConfigError(f"--decode gpu decodes JPEGs on the GPU, but the device is {device}: use --decode cpu")
    train_stream = data.open(cfg, "train", epoch=start_epoch, shuffle=True, shuffle_buffer=cfg.shuffle_buffer,
                             decode=cfg.decode, **common)
    valid_stream = data.open(cfg, "valid", shuffle=False, **common)
    if cfg.views:
        valid_stream.set_keys(table.loc[table["split"] == "valid", "key"].tolist())
    loader_args = dict(batch_size=None, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    train_loader = torch.utils.data.DataLoader(train_stream, generator=torch.Generator().manual_seed(cfg.seed),
                                               **loader_args)
    valid_loader = torch.utils.data.DataLoader(valid_stream, generator=torch.Generator().manual_seed(cfg.seed),
                                               **loader_args)

    # -- run folder
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = dataclasses.replace(cfg, resume=None).to_dict()
        write_bytes_atomic(run_dir / "config.json", (json.dumps(saved, indent=2) + "\n").encode())
        data.write_cards(run_dir)
    rows: list[dict[str, Any]] = _read_metrics(run_dir / "metrics.csv", start_epoch) if state is not None else []

    spec = AugmentSpec(flip=cfg.flip, light=cfg.augment == "light", mean=mean, std=std)
    lr_at = lambda s, progress: get_lr(s, progress, cfg)  # noqa: E731 - pure function of the position
    train_mode = lambda m: set_train_mode(m, cfg.model, cfg.stage)  # noqa: E731
    log(f"train: {cfg.model} {task} on {len(labels)} label(s), {data.name}, device {device}"
        + (f" x{info.world_size} ranks" if info.enabled else "") + f", epochs {start_epoch + 1}..{cfg.epochs}")

    progress = Progress(epochs=cfg.epochs, quiet=cfg.quiet or not info.is_main, log_every=cfg.log_every)
    # a resumed run's TensorBoard drops what the run logged after its checkpoint (steps are 1-based)
    board = TensorBoard(run_dir, enabled=info.is_main, purge_step=step + 1 if state is not None else None)
    board.inputs_done = state is not None    # the input grid is written once per run, at its first batch

    def on_batch(report) -> None:
        progress.update(report)
        board.steps(report.losses)

    def checkpoint(epochs_done: int, steps_done: int, batches_done: int, batches: int,
                   stats: EpochStats) -> dict[str, Any]:
        """last.pt's contents: after `epochs_done` epochs and `batches_done` of the next one's `batches`
        (`steps_done` optimizer steps in all)."""
        position = {}
        if batches_done:
            position = {"batches_done": batches_done, "batches": batches, "workers": cfg.workers,
                        "epoch_stats": {"loss_sum": stats.loss_sum, "samples": stats.samples,
                                        "seconds": stats.seconds, "wait_seconds": stats.wait_seconds}}
        return {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule_state(cfg, steps_done, epochs_done + batches_done / max(batches, 1), stats.lr),
            "scaler": scaler.state_dict(), "epoch": epochs_done, "step": steps_done, **position, "rng": rng_state(),
            "config": dataclasses.replace(cfg, resume=None).to_dict(),
            "task": task, "head": head,
            "best_metric": None if best == float("-inf") else best, "best_epoch": best_epoch,
            "normalize": [mean, std], "world_size": info.world_size, "version": __version__,
            **data.checkpoint_fields(label_map),
        }

    skip = int(state.get("batches_done", 0)) if state is not None else 0
    carry = None
    if skip:
        done = state["epoch_stats"]
        carry = EpochStats(loss=float("nan"), samples=int(done["samples"]), steps=0, seconds=float(done["seconds"]),
                           wait_seconds=float(done["wait_seconds"]), lr=float("nan"),
                           loss_sum=float(done["loss_sum"]), batches=skip)

    preempt = Preemption(cfg.save_every, is_main=info.is_main)

    def stopping(epoch: int, batches_done: int, batches: int, signum: int) -> Stop:
        """last.pt is written: say so, and let no rank leave before rank 0 has (torchrun ends the others)."""
        line = stop_line(epoch, batches_done, batches, signum, str(run_dir))
        log(line)
        _write_state_hash(model, info.rank, stopped=True)
        distributed.barrier()
        return Stop(line, exit_status(signum))
    try:
        preempt.start()
        for epoch in range(start_epoch, cfg.epochs):
            train_stream.set_epoch(epoch)
            if table is not None:
                train_stream.set_keys(epoch_keys(cfg, table, labels, epoch))
            train_stream.set_start(skip)
            batches = len(train_loader)
            if state is not None and epoch == start_epoch:
                if skip and int(state.get("batches", batches)) != batches:
                    raise CheckpointError(f"{state['path']} stopped at batch {skip} of {state['batches']} in epoch "
                                          f"{epoch + 1}, but this run has {batches} batches there: resume with the "
                                          f"run's own shard sets and options")
                log(resume_line(str(run_dir), epoch, skip, batches))
            _, signum = preempt.poll()
            if signum:   # a signal during start-up or the last validation
                if info.is_main:
                    save_checkpoint(run_dir / "last.pt", checkpoint(epoch, step, skip, batches, carry or EpochStats(
                        float("nan"), 0, 0, 0.0, 0.0, float("nan"))))
                raise stopping(epoch, skip, batches, signum)

            def after_step(batches_done: int, steps: int, snapshot, epoch=epoch, batches=batches) -> bool:
                save, signum = preempt.poll(step + steps)
                if not save or batches_done >= batches:   # the last step: the epoch ends as usual
                    return False
                stats_so_far = snapshot()   # every rank: it sums the epoch's losses over the ranks
                if info.is_main:
                    save_checkpoint(run_dir / "last.pt", checkpoint(epoch, step + steps, batches_done, batches,
                                                                    stats_so_far))
                preempt.saved()
                return bool(signum)

            progress.start_epoch(epoch, batches)
            stats: EpochStats = train_one_epoch(
                net, train_loader, optimizer, loss_fn, device, epoch=epoch, start_step=step, lr_at=lr_at,
                augment=spec, seed=cfg.seed, rank=info.rank, precision=cfg.precision,
                scaler=scaler, channels_last=cfg.channels_last, set_train_mode=train_mode, on_batch=on_batch,
                on_inputs=None if board.inputs_done else board.inputs, start_batch=skip, carry=carry,
                after_step=after_step)
            progress.end_epoch(progress.last)
            step += stats.steps
            skip, carry = 0, None
            if stats.batches < batches:
                raise stopping(epoch, stats.batches, batches, preempt.signum)
            distributed.average_buffers(model)
            val = validate(model, valid_loader, loss_fn, device, head=head, mean=mean, std=std,
                           precision=cfg.precision, channels_last=cfg.channels_last, sets=[s.name for s in data.sets])
            if val.probs is not None and not np.isfinite(val.probs).all():
                raise DivergenceError(divergence_message("a validation output", epoch, step - 1, stats.lr,
                                                         float(val.probs[~np.isfinite(val.probs)][0])))
            macro = val.per_set[cfg.select_on] if cfg.select_on else val.macro
            improved = not math.isnan(macro) and macro > best
            if improved:
                best, best_epoch = macro, epoch + 1
            rows.append(_metrics_row(epoch + 1, stats, val, labels))
            if info.is_main:
                ckpt = checkpoint(epoch + 1, step, 0, batches, stats)
                save_checkpoint(run_dir / "last.pt", ckpt)
                if improved or not (run_dir / "best.pt").exists():
                    save_checkpoint(run_dir / "best.pt", ckpt)
                _write_metrics(run_dir / "metrics.csv", rows)
                plot_training_curves(rows, run_dir / "curves.png", [f"val_auroc_macro_{n}" for n in val.per_set])
            preempt.saved()
            board.epoch(epoch + 1, train_loss=stats.loss, val_loss=val.loss, macro=val.macro, micro=val.micro,
                        per_label=dict(zip(labels, map(float, val.per_label))), samples_per_s=stats.samples_per_s,
                        wait_fraction=stats.wait_fraction, pr=(val.y, val.probs, labels) if val.y is not None else None)
            log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {stats.loss:.4f}, val loss {val.loss:.4f}, "
                f"val AUROC macro {val.macro:.4f} micro {val.micro:.4f}"
                + "".join(f", {name} {a:.4f}" for name, a in val.per_set.items())
                + f", {stats.samples_per_s:.1f} samples/s, "
                f"data wait {100 * stats.wait_fraction:.1f}%" + (" *" if improved else ""))
            if cfg.early_stop and epoch + 1 - best_epoch >= cfg.early_stop:
                log(f"early stop: no better val macro AUROC{' of ' + cfg.select_on if cfg.select_on else ''} for {cfg.early_stop} epoch(s) (best {best:.4f} at epoch {best_epoch})")
                break
        distributed.barrier()
        _write_state_hash(model, info.rank)
    finally:
        preempt.close()
        progress.end_epoch(None)
        board.close()
    return run_dir
