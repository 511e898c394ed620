"""`cxr train`: options -> TrainConfig (defaults <- --config file <- flags) -> trainer.fit -> summary.

Every option defaults to None here, meaning "not given": the config file or TrainConfig's default
applies. Under torchrun every rank runs this command; only rank 0 prints and writes.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional

import typer

from cli.app import app, console, fail
from trainer.config import TrainConfig, resolve_config

D = TrainConfig()


def _d(name: str) -> str:
    return f" (default: {getattr(D, name)})"


@app.command("train")
def train(
    shards: Optional[List[str]] = typer.Option(None, "--shards", help="Shard set NAME (under --root), path to its folder, or URL (http(s)://, s3://, gs://); several (A,B or repeated) train one run over all of them."),
    root: Optional[str] = typer.Option(None, "--root", help="Shard root (default: $CXR_SHARDS or ./shards)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder, e.g. runs/nih-r18."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML/YAML/JSON file of options; flags override it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    resume_from: Optional[str] = typer.Option(None, "--resume-from", help="Continue from this checkpoint file."),
    # data
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated subset of the card's labels (default: all)."),
    views: Optional[str] = typer.Option(None, "--views", help="Comma-separated views to keep in train and valid, e.g. AP (default: all)."),
    max_per_label: Optional[int] = typer.Option(None, "--max-per-label", help="Per-label cap of train positives, fresh draw each epoch; 0 = off." + _d("max_per_label")),
    format: Optional[str] = typer.Option(None, "--format", help="Reader format: auto|wds|hdf5." + _d("format")),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes." + _d("workers")),
    shuffle_buffer: Optional[int] = typer.Option(None, "--shuffle-buffer", help="Reader shuffle buffer (samples)." + _d("shuffle_buffer")),
    mix: Optional[str] = typer.Option(None, "--mix", help="Several shard sets: samples per set each epoch: proportional (all of each) | equal (the smallest set's count from each) | W1,W2,... (shares)." + _d("mix")),
    select_on: Optional[str] = typer.Option(None, "--select-on", help="Several shard sets: pick best.pt on this set's valid macro AUROC (default: the pooled valid)."),
    label_map: Optional[str] = typer.Option(None, "--label-map", help="CSV source,label,shared over the built-in label map (manifests/label_map.csv)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="URL --shards: keep downloaded tars in this folder, checked against the card (default: $CXR_CACHE, else stream every epoch)."),
    cache_gb: Optional[float] = typer.Option(None, "--cache-gb", help="Size limit of --cache in GiB; least recently used tars leave." + _d("cache_gb")),
    decode: Optional[str] = typer.Option(None, "--decode", help="cpu: loader workers decode; gpu: JPEG tars decoded on the GPU in batches (nvJPEG)." + _d("decode")),
    # model
    model: Optional[str] = typer.Option(None, "--model", help="resnet18|resnet34|resnet50|resnet101|densenet121|densenet169." + _d("model")),
    init: Optional[str] = typer.Option(None, "--init", help="scratch | imagenet | PATH of a cxr checkpoint (backbone transfer)." + _d("init")),
    imagenet_weights: Optional[str] = typer.Option(None, "--imagenet-weights", help="torchvision ImageNet .pth (default: $TORCH_HOME/hub/checkpoints/<file>)."),
    task: Optional[str] = typer.Option(None, "--task", help="auto|multilabel|binary (auto: one label -> binary)." + _d("task")),
    stage: Optional[int] = typer.Option(None, "--stage", help="Staged fine-tuning 1..4 (1: layer2-4+head ... 4: head only); 0 = all." + _d("stage")),
    # loss
    loss: Optional[str] = typer.Option(None, "--loss", help="bce|bce-pos-weight|focal|ce." + _d("loss")),
    focal_gamma: Optional[float] = typer.Option(None, "--focal-gamma", help="Focal loss gamma." + _d("focal_gamma")),
    focal_alpha: Optional[float] = typer.Option(None, "--focal-alpha", help="Focal loss alpha (default: none)."),
    # optimisation
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam|adamw|sgd." + _d("optimizer")),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate." + _d("lr")),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay." + _d("weight_decay")),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum." + _d("momentum")),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="none|step|cosine." + _d("scheduler")),
    step_size: Optional[int] = typer.Option(None, "--step-size", help="step: epochs between decays." + _d("step_size")),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="step: decay factor." + _d("gamma")),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Linear warmup, optimizer steps." + _d("warmup")),
    min_lr: Optional[float] = typer.Option(None, "--min-lr", help="cosine: final learning rate." + _d("min_lr")),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs." + _d("epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size per process." + _d("batch_size")),
    early_stop: Optional[int] = typer.Option(None, "--early-stop", help="Stop after N epochs without better val macro AUROC; 0 = off." + _d("early_stop")),
    # augmentation
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Random horizontal flip." + _d("flip")),
    augment: Optional[str] = typer.Option(None, "--augment", help="light (small resized crop + rotation) | none." + _d("augment")),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="MEAN,STD on the 0..1 scale, e.g. 0.5,0.5 (default: the card's train stats)."),
    # runtime
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32|bf16|fp16." + _d("precision")),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format." + _d("channels_last")),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model." + _d("compile")),
    device: Optional[str] = typer.Option(None, "--device", help="auto|cpu|cuda." + _d("device")),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of init, data order, augmentation." + _d("seed")),
    quiet: Optional[bool] = typer.Option(None, "--quiet/--progress", help="No progress within epochs (the epoch lines stay)." + _d("quiet")),
    log_every: Optional[float] = typer.Option(None, "--log-every", help="Seconds between progress lines when output is not a terminal (nohup, SLURM)." + _d("log_every")),
    save_every: Optional[float] = typer.Option(None, "--save-every", help="Minutes between last.pt saves inside an epoch (a kill -9 loses at most that); 0 = at epoch ends only." + _d("save_every")),
) -> None:
    """Train a ResNet/DenseNet on a shard set; writes config.json, metrics.csv, last.pt, best.pt.

    SIGTERM, SIGINT or SIGUSR1 stop it after the current step with last.pt saved: exit status 128 + the
    signal's number (143, 130, 138); `cxr train --out RUN --resume` continues at the next batch."""
    from trainer import distributed
    from trainer.fitting import fit
    from trainer.preempt import Stop

    overrides = {k: v for k, v in locals().items()
                 if k not in ("config", "resume", "resume_from", "fit", "distributed", "Stop") and v is not None}
    if shards is not None:
        overrides["shards"] = [part for value in shards for part in value.split(",")]
    if resume_from is not None:
        overrides["resume"] = resume_from
    elif resume:
        overrides["resume"] = "last"
        if out is not None and config is None:   # the run's own options, under the flags given
            if (Path(out) / "config.json").is_file():
                config = Path(out) / "config.json"
            elif shards is None:
                fail(f"nothing to resume in {out}: no checkpoint at {Path(out) / 'last.pt'}; "
                     f"start the run without --resume")
    cfg = resolve_config(config, overrides)
    main = distributed.env_info().is_main
    try:
        run_dir = fit(cfg, log=(lambda msg: console.print(msg, highlight=False, soft_wrap=True)) if main else None)
    except Stop as stop:   # its line is printed already
        raise typer.Exit(stop.status) from None
    if main:
        _summary(run_dir)


def _summary(run_dir: Path) -> None:
    metrics = run_dir / "metrics.csv"
    if not metrics.is_file():
        return
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return

    select_on = json.loads((run_dir / "config.json").read_text()).get("select_on")
    column = f"val_auroc_macro_{select_on}" if select_on else "val_auroc_macro"

    def score(row: dict) -> float:
        value = float(row[column])
        return value if value == value else float("-inf")

    best = max(rows, key=score)
    console.print(f"[bold green]done[/]: {run_dir} ({len(rows)} epochs); best val macro AUROC"
                  f"{' on ' + select_on if select_on else ''} {best[column]} at epoch {best['epoch']} -> "
                  f"{run_dir / 'best.pt'}", highlight=False, soft_wrap=True)
