"""Trainer benchmark: is the data or the model the bottleneck?

1. The input pipeline alone: `open_shards(..., batch_size=B)` through a DataLoader, samples/s.
2. The same batches feeding a tiny CNN on the CPU (data-bound: the loader's cost shows).
3. A real training epoch (`trainer.fit`, resnet18, CPU): samples/s and the fraction of step time spent
   waiting for the next batch, from the run's metrics.csv. Goal: < 5% when the model is the bottleneck.

Standalone: `python bench/train_bench.py [--workdir .bench] [--shards DIR]`.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZE = 128            # shard image side
N_IMAGES = 700        # phantom NIH images (about 500 land in train)
BATCH = 32


def build_inputs(workdir: Path) -> Path:
    """A phantom NIH shard set at SIZE px (wds png + hdf5), built once and reused."""
    from cxrshards.build import BuildConfig, build_shards
    from phantom import make_demo_data
    from manifests.options import ManifestOptions

    base = workdir / "train_bench"
    shard_dir = base / "shards" / f"nih-{SIZE}"
    if (shard_dir / "dataset.json").is_file():
        return shard_dir
    make_demo_data("nih", base / "raw", N_IMAGES, 256, 0)
    result = build_shards(BuildConfig(source="nih", raw=base / "raw", size=SIZE, format="both", out=base / "shards",
                                      name=f"nih-{SIZE}", workers=1, quiet=True), ManifestOptions(source="nih", seed=0))
    return result.path


def _loader(shard_dir: Path, fmt: str, workers: int):
    import torch

    import cxrshards

    stream = cxrshards.open_shards(shard_dir, "train", format=fmt, batch_size=BATCH)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)


def pipeline_alone(shard_dir: Path, fmt: str, workers: int) -> float:
    loader = _loader(shard_dir, fmt, workers)
    n = 0
    start = time.perf_counter()
    for images, _labels, _keys in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - start)


def with_tiny_model(shard_dir: Path, fmt: str, workers: int) -> tuple[float, float]:
    """(samples/s, data-wait fraction) of train_one_epoch with a 2-conv model."""
    import torch
    from torch import nn

    from trainer.augment import AugmentSpec
    from trainer.loop import train_one_epoch
    from trainer.losses import masked_bce

    torch.manual_seed(0)
    labels = len(__import__("cxrshards").read_card(shard_dir)["labels"])
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, labels))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, _loader(shard_dir, fmt, workers), opt, masked_bce, torch.device("cpu"),
                            epoch=0, start_step=0, lr_at=lambda s, p: 1e-3, augment=AugmentSpec())
    return stats.samples_per_s, stats.wait_fraction


def real_epoch(shard_dir: Path, workdir: Path, fmt: str, workers: int) -> dict[str, str]:
    from trainer.config import TrainConfig
    from trainer.fitting import fit

    out = workdir / "train_bench" / f"run-{fmt}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    fit(TrainConfig(shards=str(shard_dir), out=str(out), model="resnet18", epochs=1, batch_size=BATCH, lr=1e-3,
                    workers=workers, format=fmt, device="cpu"))
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))[0]


def run(workdir: Path, shard_dir: Path | None = None) -> str:
    import torch

    workdir = Path(workdir)
    shard_dir = Path(shard_dir) if shard_dir is not None else build_inputs(workdir)
    card = __import__("cxrshards").read_card(shard_dir)
    n_train = card["splits"]["train"]["count"]
    cores = os.cpu_count() or 1
    workers = min(2, cores)
    lines = [
        "## Trainer: input pipeline vs model",
        "",
        f"Shard set `{shard_dir.name}`: {n_train} train images, {card['size']} px, codec {card['codec']}; "
        f"batch {BATCH}; CPU, torch threads {torch.get_num_threads()}, {cores} cores.",
        "",
        "| what | format | loader workers | samples/s | data-wait fraction |",
        "|---|---|---|---|---|",
    ]
    for fmt in ("wds", "hdf5"):
        for w in (0, workers):
            lines.append(f"| input pipeline alone | {fmt} | {w} | {pipeline_alone(shard_dir, fmt, w):.0f} | - |")
    for fmt in ("wds", "hdf5"):
        sps, wait = with_tiny_model(shard_dir, fmt, workers)
        lines.append(f"| + tiny 2-conv model (train step) | {fmt} | {workers} | {sps:.0f} | {100 * wait:.1f}% |")
    for fmt, w in (("wds", 0), ("wds", workers), ("hdf5", workers)):
        row = real_epoch(shard_dir, workdir, fmt, w)
        lines.append(f"| resnet18 epoch (`cxr train`, {card['size']} px) | {fmt} | {w} | "
                     f"{float(row['samples_per_s']):.0f} | {100 * float(row['data_wait_frac']):.1f}% |")
    lines += [
        "",
        "Data-wait fraction = time blocked on the next batch / epoch wall time (from `metrics.csv`). With",
        "0 workers the decode runs inside the training step and counts as waiting; with workers it overlaps",
        "the model's compute, which on a CPU shares the same cores. Goal: < 5% when the model is the bottleneck.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--shards", type=Path, default=None, help="an existing shard set folder to use")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(run(args.workdir.resolve(), args.shards))
