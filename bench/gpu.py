"""GPU benchmark: resnet50 at 224 px (bf16, channels_last, batch 256) trained by `trainer.fit` on a phantom
shard set, with 0, 4 and 8 loader workers for wds-jpeg (CPU and GPU decode), wds-raw and hdf5.

Reports samples/s and the data-wait fraction (time waiting for the next batch / epoch time, from the
run's metrics.csv; epoch 2 of 2, so cuDNN autotuning and worker start-up stay out). Goal: a data-wait
fraction under 5%. Without CUDA it prints why and exits 0 (nothing is measured on a CPU).

Standalone: `python bench/gpu.py [--workdir .bench] [--images 6000] [--out gpu.md]`; `run(workdir)`
returns the markdown section.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SIZE = 224
BATCH = 256
IMAGES = 6000            # phantom NIH images (about 4,200 land in train: 16 batches of 256 per epoch)
WORKERS = (0, 4, 8)
# (label, codec of the set, reader format, --decode)
READERS = (("wds-jpeg", "jpeg", "wds", "cpu"), ("wds-jpeg, --decode gpu", "jpeg", "wds", "gpu"),
           ("wds-raw", "raw", "wds", "cpu"), ("hdf5", "raw", "hdf5", "cpu"))
GOAL = 0.05


def build_inputs(workdir: Path, images: int = IMAGES) -> dict[str, Path]:
    """Phantom NIH sets at 224 px: jpeg (wds) and raw (wds + hdf5), built once and reused."""
    from cxrshards.build import BuildConfig, build_shards
    from cxrshards.phantom import make_demo_data
    from manifests.options import ManifestOptions

    base = workdir / "gpu_bench"
    raw = base / "raw"
    sets = {}
    for codec, fmt in (("jpeg", "wds"), ("raw", "both")):
        shard_dir = base / "shards" / f"nih-{SIZE}-{codec}"
        if not (shard_dir / "dataset.json").is_file():
            if not (raw / "phantom.json").is_file():
                make_demo_data("nih", raw, images, 1024, 0)
            build_shards(BuildConfig(source="nih", raw=raw, size=SIZE, codec=codec, format=fmt, out=base / "shards",
                                     name=shard_dir.name, quiet=True), ManifestOptions(source="nih", seed=0))
        sets[codec] = shard_dir
    return sets


def measure(shard_dir: Path, fmt: str, decode: str, workers: int, out: Path, **changes) -> dict:
    """samples/s and data-wait fraction of the last epoch of a fresh run (`changes` override the config)."""
    from trainer.config import TrainConfig
    from trainer.fitting import fit

    if out.exists():
        shutil.rmtree(out)
    options = dict(shards=str(shard_dir), out=str(out), format=fmt, decode=decode, workers=workers,
                   model="resnet50", batch_size=BATCH, epochs=2, precision="bf16", channels_last=True,
                   device="cuda", lr=1e-4)
    fit(TrainConfig(**{**options, **changes}))
    with open(out / "metrics.csv", newline="") as fh:
        row = list(csv.DictReader(fh))[-1]
    return {"samples_per_s": float(row["samples_per_s"]), "wait_fraction": float(row["data_wait_frac"])}


def run(workdir: Path, images: int = IMAGES) -> str:
    import torch

    title = f"## GPU training throughput (resnet50, {SIZE} px, bf16, channels_last, batch {BATCH})"
    if not torch.cuda.is_available():
        return f"{title}\n\nNot measured: no CUDA device on this machine.\n"
    sets = build_inputs(Path(workdir), images)
    lines = [title, "", f"`trainer.fit`, 2 epochs, figures of epoch 2 from metrics.csv; GPU: "
             f"{torch.cuda.get_device_name(0)}. Goal: data wait < {GOAL:.0%}.", "",
             "| reader | workers | samples/s | data wait | goal |", "|---|---:|---:|---:|---|"]
    for label, codec, fmt, decode in READERS:
        for workers in WORKERS:
            r = measure(sets[codec], fmt, decode, workers, Path(workdir) / "gpu_bench" / "runs" / "run")
            lines.append(f"| {label} | {workers} | {r['samples_per_s']:,.0f} | {r['wait_fraction']:.1%} | "
                         f"{'meets' if r['wait_fraction'] < GOAL else 'misses'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--out", type=Path, help="also write the section to this file")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    section = run(args.workdir.resolve(), args.images)
    print(section)
    if args.out:
        args.out.write_text(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
