"""`make demo` / `cxr demo --out demo`: the whole tool on phantom data, in a few minutes on a laptop CPU.

1. phantom raw trees in the real NIH, cardiomegaly and MIMIC-CXR-JPG layouts (`cxr demo-data`);
2. shard sets of all three at a small size (`cxr shard build`);
3. resnet18 trained on the NIH phantoms (`cxr train`);
4. fine-tuned on the cardiomegaly phantoms from the NIH checkpoint (`cxr train --init RUN/best.pt`);
5. both runs evaluated on their test splits (`cxr eval`);
6. external validation: the NIH run evaluated on the MIMIC phantoms (`cxr eval --run runs/nih --shards
   mimic-SIZE`), labels matched through the shared names (NIH Effusion = MIMIC Pleural Effusion).

Everything through library calls, one function: `run_demo(out, ...)`. The layout of OUT:
raw/{nih,cardiomegaly,mimic}, shards/{nih-SIZE,cardiomegaly-SIZE,mimic-SIZE}, runs/{nih,cardiomegaly}
(each with eval/; the NIH run's external evaluation in runs/nih/eval/mimic-SIZE/).

The MIMIC phantom set is only ever evaluated, never trained on, so its patients are split
`--split random --ratios 0.2,0.1,0.7`: most of them land in the test split that step 6 scores.
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
    n_mimic: int = 1200               # phantom MIMIC images (one AP film per subject survives the cohort rule)
    mimic_ratios: tuple[float, float, float] = (0.2, 0.1, 0.7)   # MIMIC patients: train:valid:test
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
    """Run the demo end to end (`config`, or DemoConfig(**overrides)); returns a summary dict with the
    evaluation reports under "reports" ("nih", "cardiomegaly", and "nih_on_mimic": the external one).
    Also written to OUT/demo.json."""
    import torch

    from cxrshards.build import BuildConfig, build_shards
    from phantom import make_demo_data
    from cxrshards.sheet import contact_sheet
    from manifests.options import ManifestOptions
    from trainer.config import TrainConfig
    from trainer.evaluation.pipeline import evaluate_run
    from trainer.fitting import fit

    cfg = config or DemoConfig(**overrides)
    if config is not None and overrides:
        from dataclasses import replace

        cfg = replace(config, **overrides)
    out = Path(cfg.out)
    _prepare_out(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    steps = 6

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
    raw = {"nih": out / "raw" / "nih", "cardiomegaly": out / "raw" / "cardiomegaly", "mimic": out / "raw" / "mimic"}
    make_demo_data("nih", raw["nih"], cfg.n_nih, cfg.image_size, cfg.seed)
    echo(f"      {raw['nih']}/: {cfg.n_nih} NIH-style {cfg.image_size} px PNGs + Data_Entry_2017_v2020.csv")
    make_demo_data("cardiomegaly", raw["cardiomegaly"], cfg.n_cardiomegaly, cfg.image_size, cfg.seed + 1)
    echo(f"      {raw['cardiomegaly']}/: {cfg.n_cardiomegaly} images in normal/ and abnormal/")
    make_demo_data("mimic", raw["mimic"], cfg.n_mimic, cfg.image_size, cfg.seed + 2)
    echo(f"      {raw['mimic']}/: {cfg.n_mimic} MIMIC-CXR-JPG-style JPGs + metadata/negbio/chexpert/split tables")
    done("data", t0)

    # 2. shard sets
    t0 = step(2, f"Building shard sets at {cfg.size} px (`cxr shard build`): manifest, WebDataset tars, HDF5, card")
    shard_root = out / "shards"
    cards = {}
    manifest_options = {
        "nih": ManifestOptions(source="nih", seed=cfg.seed),
        # two films of one phantom patient share the personNNNN_ prefix: keep them in one split
        "cardiomegaly": ManifestOptions(source="cardiomegaly", seed=cfg.seed, patient_pattern=r"person(\d+)_"),
        # only evaluated (step 6): most patients in test
        "mimic": ManifestOptions(source="mimic", seed=cfg.seed, split="random", ratios=tuple(cfg.mimic_ratios)),
    }
    for source in ("nih", "cardiomegaly", "mimic"):
        # workers=1 builds inline: worker processes forked from a process that has imported torch can hang
        result = build_shards(BuildConfig(source=source, raw=raw[source], size=cfg.size, format="both",
                                          out=shard_root, seed=cfg.seed, workers=1, quiet=True),
                              manifest_options[source])
        cards[source] = result.card
        echo(f"      {result.path}/: {_count(result.card)} images, labels: {', '.join(result.card['labels'])}")
    sheet = contact_sheet(shard_root / cards["nih"]["name"], out / "sheet-nih.png", split="train", n=36)
    echo(f"      {sheet}: contact sheet of 36 NIH train samples with their positive labels (`cxr shard show`)")
    done("shards", t0)

    # 3. NIH training
    runs = {"nih": out / "runs" / "nih", "cardiomegaly": out / "runs" / "cardiomegaly"}
    common = dict(model=cfg.model, lr=cfg.lr, batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
                  seed=cfg.seed, scheduler="cosine")
    t0 = step(3, f"Training {cfg.model} from scratch on the NIH phantoms, {cfg.epochs} epochs (`cxr train`)")
    fit(TrainConfig(shards=str((shard_root / cards['nih']['name']).resolve()), out=str(runs["nih"]),
                    epochs=cfg.epochs, **common), log=lambda m: echo(f"      {m}"))
    echo(f"      {runs['nih']}/: config.json, metrics.csv, curves.png, tb/ (TensorBoard), best.pt, last.pt, cards/")
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
        reports[name] = evaluate_run(runs[name], device=cfg.device, n_boot=cfg.n_boot, workers=cfg.workers,
                                     by=("sex", "age") if name == "nih" else ())
        echo(f"      {runs[name]}/eval/: report.html (open it in a browser), report.md, report.json, "
             f"predictions.parquet, roc.png, pr.png, gallery.png")
    done("eval", t0)

    # 6. external validation
    mimic_set = cards["mimic"]["name"]
    t0 = step(6, f"External validation: the NIH run on the MIMIC phantoms (`cxr eval --run {runs['nih']} "
                 f"--shards {mimic_set}`)")
    reports["nih_on_mimic"] = evaluate_run(runs["nih"], shards=str((shard_root / mimic_set).resolve()),
                                           device=cfg.device, n_boot=cfg.n_boot, workers=cfg.workers)
    labels = reports["nih_on_mimic"]["external"]["labels"]
    echo(f"      matched through the shared names: "
         + ", ".join(m["shared"] + (f" (MIMIC {m['set']})" if m["set"] != m["shared"] else "") for m in labels["matched"]))
    echo(f"      {runs['nih']}/eval/{mimic_set}/: report.html, report.md (internal vs external table), predictions.parquet")
    done("external", t0)

    total = round(time.perf_counter() - started, 1)
    summary = {
        "config": asdict(cfg),
        "seconds": total,
        "timings": timings,
        "paths": {"raw": {k: str(v) for k, v in raw.items()},
                  "shards": {k: str(shard_root / c["name"]) for k, c in cards.items()},
                  "external": str(runs["nih"] / "eval" / mimic_set),
                  "runs": {k: str(v) for k, v in runs.items()}},
        "macro_auroc": {k: r["metrics"]["macro_auroc"] for k, r in reports.items()},
        "reports": reports,
    }
    write_bytes_atomic(out / "demo.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary
