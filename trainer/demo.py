"""`make demo` / `cxr demo --out demo`: the whole tool on phantom data, in a few minutes on a laptop CPU.

1. phantom raw trees in the real NIH and cardiomegaly layouts (`cxr demo-data`);
2. shard sets of both at a small size (`cxr shard build`);
3. resnet18 trained on the NIH phantoms (`cxr train`);
4. fine-tuned on the cardiomegaly phantoms from the NIH checkpoint (`cxr train --init RUN/best.pt`);
5. both runs evaluated on their test splits (`cxr eval`).

Everything through library calls, one function: `run_demo(out, ...)`. The layout of OUT:
raw/{nih,cardiomegaly}, shards/{nih-SIZE,cardiomegaly-SIZE}, runs/{nih,cardiomegaly} (each with eval/).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from manifests.atomic import write_bytes_atomic
from manifests.errors import CxrError

MARKER = ".cxr-demo"      # written first into OUT: a folder holding it may be wiped by the next demo

Echo = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and training settings of the demo; the defaults finish in about 5 minutes on 2 CPU cores."""
    out: str = "demo"
    seed: int = 0
    # phantom data
    n_nih: int = 2000                 # phantom NIH images (official-style lists: ~20% test patients)
    n_cardiomegaly: int = 600         # phantom cardiomegaly images
    image_size: int = 128             # side of the generated raw images (real NIH: 1024)
    # shards
    size: int = 64                    # shard image side
    # training
    model: str = "resnet18"
    epochs: int = 6                   # NIH (validation macro AUROC ~0.95 by epoch 6)
    finetune_epochs: int = 3          # cardiomegaly, from the NIH checkpoint (learned within 1-2 epochs)
    lr: float = 2e-3                  # higher than the seeds' 1e-5: tiny images, few epochs
    batch_size: int = 32
    workers: int = 0                  # DataLoader workers (0: decode in the training process)
    device: str = "auto"
    n_boot: int = 200                 # bootstrap resamples for the macro AUROC interval


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise CxrError(f"{out} exists and is not a cxr demo folder: pick another --out (the demo deletes and "
                       f"rewrites its own folder)")
    if out.exists():
        for sub in ("raw", "shards", "runs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `cxr demo`; the next `cxr demo --out` here replaces raw/, shards/, runs/\n")


def _count(card: dict) -> str:
    s = card["splits"]
    return ", ".join(f"{k} {s[k]['count']}" for k in ("train", "valid", "test") if k in s)


def run_demo(config: DemoConfig | None = None, *, echo: Echo = print, **overrides) -> dict:
    """Run the demo end to end (`config`, or DemoConfig(**overrides)); returns a summary dict with both
    evaluation reports under "reports" ("nih", "cardiomegaly"). Also written to OUT/demo.json."""
    import torch

    from cxrshards.build import BuildConfig, build_shards
    from cxrshards.phantom import make_demo_data
    from manifests.options import ManifestOptions
    from trainer.config import TrainConfig
    from trainer.evaluate import evaluate_run
    from trainer.fitting import fit

    cfg = config or DemoConfig(**overrides)
    if config is not None and overrides:
        from dataclasses import replace

        cfg = replace(config, **overrides)
    out = Path(cfg.out)
    _prepare_out(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    steps = 5

    def step(i: int, text: str) -> float:
        echo(f"\n[{i}/{steps}] {text}")
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        echo(f"      done in {timings[name]:.0f} s")

    echo(f"cxr demo: the whole pipeline on phantom (synthetic) chest X-rays, into {out}/  "
         f"(torch threads: {torch.get_num_threads()})")

    # 1. phantom raw trees
    t0 = step(1, "Generating phantom raw data in the real layouts (`cxr demo-data`)")
    raw = {"nih": out / "raw" / "nih", "cardiomegaly": out / "raw" / "cardiomegaly"}
    make_demo_data("nih", raw["nih"], cfg.n_nih, cfg.image_size, cfg.seed)
    echo(f"      {raw['nih']}/: {cfg.n_nih} NIH-style {cfg.image_size} px PNGs + Data_Entry_2017_v2020.csv")
    make_demo_data("cardiomegaly", raw["cardiomegaly"], cfg.n_cardiomegaly, cfg.image_size, cfg.seed + 1)
    echo(f"      {raw['cardiomegaly']}/: {cfg.n_cardiomegaly} images in normal/ and abnormal/")
    done("data", t0)

    # 2. shard sets
    t0 = step(2, f"Building shard sets at {cfg.size} px (`cxr shard build`): manifest, WebDataset tars, HDF5, card")
    shard_root = out / "shards"
    cards = {}
    manifest_options = {
        "nih": ManifestOptions(source="nih", seed=cfg.seed),
        # two films of one phantom patient share the personNNNN_ prefix: keep them in one split
        "cardiomegaly": ManifestOptions(source="cardiomegaly", seed=cfg.seed, patient_pattern=r"person(\d+)_"),
    }
    for source in ("nih", "cardiomegaly"):
        # workers=1 builds inline: worker processes forked from a process that has imported torch can hang
        result = build_shards(BuildConfig(source=source, raw=raw[source], size=cfg.size, format="both",
                                          out=shard_root, seed=cfg.seed, workers=1, quiet=True),
                              manifest_options[source])
        cards[source] = result.card
        echo(f"      {result.path}/: {_count(result.card)} images, labels: {', '.join(result.card['labels'])}")
    done("shards", t0)

    # 3. NIH training
    runs = {"nih": out / "runs" / "nih", "cardiomegaly": out / "runs" / "cardiomegaly"}
    common = dict(model=cfg.model, lr=cfg.lr, batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                  seed=cfg.seed, scheduler="cosine")
    t0 = step(3, f"Training {cfg.model} from scratch on the NIH phantoms, {cfg.epochs} epochs (`cxr train`)")
    fit(TrainConfig(shards=str((shard_root / cards['nih']['name']).resolve()), out=str(runs["nih"]),
                    epochs=cfg.epochs, **common), log=lambda m: echo(f"      {m}"))
    echo(f"      {runs['nih']}/: config.json, metrics.csv, best.pt, last.pt, card.json")
    done("train_nih", t0)

    # 4. fine-tuning on cardiomegaly
    t0 = step(4, f"Fine-tuning on the cardiomegaly phantoms from the NIH checkpoint, {cfg.finetune_epochs} epochs "
                 f"(`cxr train --init {runs['nih']}/best.pt`)")
    fit(TrainConfig(shards=str((shard_root / cards['cardiomegaly']['name']).resolve()), out=str(runs["cardiomegaly"]),
                    init=str(runs["nih"] / "best.pt"), epochs=cfg.finetune_epochs, **common),
        log=lambda m: echo(f"      {m}"))
    echo(f"      {runs['cardiomegaly']}/: the fine-tuned run")
    done("train_cardiomegaly", t0)

    # 5. evaluation
    t0 = step(5, "Evaluating both runs on their test splits (`cxr eval`)")
    reports = {}
    for name in ("nih", "cardiomegaly"):
        reports[name] = evaluate_run(runs[name], device=cfg.device, n_boot=cfg.n_boot, workers=cfg.workers)
        echo(f"      {runs[name]}/eval/: report.md, report.json, predictions.parquet, roc.png, pr.png")
    done("eval", t0)

    total = round(time.perf_counter() - started, 1)
    summary = {
        "config": asdict(cfg),
        "seconds": total,
        "timings": timings,
        "paths": {"raw": {k: str(v) for k, v in raw.items()},
                  "shards": {k: str(shard_root / c["name"]) for k, c in cards.items()},
                  "runs": {k: str(v) for k, v in runs.items()}},
        "macro_auroc": {k: r["metrics"]["macro_auroc"] for k, r in reports.items()},
        "reports": reports,
    }
    write_bytes_atomic(out / "demo.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
