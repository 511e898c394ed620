"""Deployment: `cxr export` parity for all six architectures, and `cxr predict --model` against `--run`.

For each of resnet18/34/50/101 and densenet121/169: a 1-epoch run at SIZE px on phantom NIH images (the
weights only need to be a trained model's, not a good one), exported to ONNX and TorchScript; on a batch of
the phantom test films (1024 px PNGs), PyTorch's probabilities (`cxr predict --run`'s path) against
onnxruntime on the CPU and TorchScript: the largest absolute difference (issue 22 asks for <= 1e-4).

Then `cxr predict IMAGE` as a user runs it, a fresh process each time, `--model DIR` (onnxruntime) and
`--run RUN` (PyTorch) interleaved, ROUNDS rounds: the median wall time from launch until the result is
printed, and the peak RSS of the process (`os.wait4`). Issue 22's goal for resnet18 at 224: `--model` within
1.5 s, under 400 MB, on 2 cores.

`run(workdir) -> str` for `make bench`; alone: `python bench/export_bench.py [--models resnet18 ...]`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169")
SIZE = 224
N_IMAGES = 40          # phantom NIH films (1024 px); a quarter or so land in test
PARITY_IMAGES = 8
ROUNDS = 3


def build_inputs(workdir: Path) -> tuple[Path, Path]:
    """(raw NIH phantom tree, shard set at SIZE px), built once and reused."""
    from cxrshards.build import BuildConfig, build_shards
    from manifests.options import ManifestOptions
    from phantom import make_demo_data

    base = workdir / "export_bench"
    raw, shard_dir = base / "raw", base / "shards" / f"nih-{SIZE}"
    if not (raw / "phantom.json").is_file():
        make_demo_data("nih", raw, N_IMAGES, 1024, 0)
    if not (shard_dir / "dataset.json").is_file():
        build_shards(BuildConfig(source="nih", raw=raw, size=SIZE, format="hdf5", out=base / "shards",
                                 name=f"nih-{SIZE}", workers=1, quiet=True), ManifestOptions(source="nih", seed=0))
    return raw, shard_dir


def test_films(raw: Path, shard_dir: Path) -> list[Path]:
    import pandas as pd

    table = pd.read_parquet(shard_dir / "manifest.parquet")
    table = table.assign(other=table["split"] != "test").sort_values(["other", "key"])   # test films first
    return [raw / p for p in table["path"]][:PARITY_IMAGES]


def train_and_export(shard_dir: Path, base: Path, model: str) -> tuple[Path, Path, float]:
    """(run, export dir, export seconds): trained and exported here and now."""
    from trainer.config import TrainConfig
    from trainer.export import export_run
    from trainer.fitting import fit

    run, export = base / "runs" / model, base / "exports" / model
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(export, ignore_errors=True)
    fit(TrainConfig(shards=str(shard_dir), out=str(run), model=model, epochs=1, batch_size=8, workers=0,
                    device="cpu", lr=1e-3, augment="none", quiet=True))
    started = time.perf_counter()
    export_run(run, export, fmt="both")
    return run, export, time.perf_counter() - started


def parity(run: Path, export: Path, films: list[Path]) -> dict:
    """Largest |probability difference| against PyTorch on the films, for onnxruntime and TorchScript."""
    import warnings

    import numpy as np
    import torch

    from trainer.losses import probabilities
    from trainer.predict import load_run, predict_tensor
    from trainer.runtime import load_export

    loaded = load_run(run, "best", "cpu")
    x = torch.cat([predict_tensor(p, loaded) for p in films])
    with torch.no_grad():
        expected = probabilities(loaded.inference.model(x), loaded.inference.head).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = torch.jit.load(str(export / "model.ts")).eval()
        by_ts = ts(x).numpy()
    by_onnx = load_export(export).probabilities(x.numpy())
    return {"onnx": float(np.abs(by_onnx - expected).max()), "torchscript": float(np.abs(by_ts - expected).max()),
            "images": len(films), "mb": (export / "model.onnx").stat().st_size / 2**20}


# `cxr ARGS...` that reports its own peak RSS last on stderr: the kernel's VmHWM of this process image (the
# rusage of a child also counts the pages of the forked parent before its exec, here the whole bench)
_PEAK = """import atexit, sys
def _peak():
    kb = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))
    sys.stderr.write('\\nPEAK_KB ' + kb + '\\n')
atexit.register(_peak)
from cli.app import main
sys.argv[0] = 'cxr'
main()
"""


def timed(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one fresh `cxr ...` process."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _PEAK, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"cxr {' '.join(args)} failed: {out.stderr[-500:]}")
    return seconds, int(out.stderr.rsplit("PEAK_KB ", 1)[1].split()[0]) / 1024


def latency(run: Path, export: Path, films: list[Path], rounds: int = ROUNDS) -> dict:
    """Median seconds and peak MiB of `cxr predict` on 1 film and on all films, --model and --run interleaved."""
    cases = {("model", 1): ["--model", str(export)], ("run", 1): ["--run", str(run), "--device", "cpu"]}
    cases.update({("model", len(films)): cases[("model", 1)], ("run", len(films)): cases[("run", 1)]})
    got: dict = {key: [] for key in cases}
    for _ in range(rounds):
        for (how, n), flags in cases.items():
            got[(how, n)].append(timed(["predict", *map(str, films[:n]), *flags, "--json"]))
    return {key: (statistics.median(s for s, _ in v), max(m for _, m in v)) for key, v in got.items()}


def measure(workdir: Path, models=MODELS) -> dict:
    raw, shard_dir = build_inputs(Path(workdir))
    films = test_films(raw, shard_dir)
    base = Path(workdir) / "export_bench"
    rows = {}
    for model in models:
        run, export, export_s = train_and_export(shard_dir, base, model)
        rows[model] = {"export_s": export_s, **parity(run, export, films), "latency": latency(run, export, films)}
    return {"rows": rows, "films": len(films), "cpus": os.cpu_count()}


def section(r: dict) -> str:
    n = r["films"]
    lines = [f"### Deployment: `cxr export` parity and `cxr predict --model` against `--run` ({SIZE} px, CPU)", "",
             f"Each model: 1 epoch on {N_IMAGES} phantom NIH films, then `cxr export --format both`. Parity: the "
             f"largest |probability difference| from PyTorch on {n} test films (1024 px PNGs; goal <= 1e-4). "
             f"Latency: a fresh `cxr predict FILMS --json` process, launch to exit, median of {ROUNDS} rounds with "
             f"--model and --run interleaved; memory: the process's peak RSS. {r['cpus']} cores. Issue 22's goal "
             "for resnet18: --model's first result within 1.5 s in under 400 MB.", "",
             f"| model | ONNX MB | export s | ONNX diff | TorchScript diff | 1 film --model | 1 film --run | "
             f"{n} films --model | {n} films --run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, row in r["rows"].items():
        lat = row["latency"]
        cell = lambda key: f"{lat[key][0]:.2f} s, {lat[key][1]:.0f} MB"  # noqa: E731
        lines.append(f"| {model} | {row['mb']:.0f} | {row['export_s']:.0f} | {row['onnx']:.1e} | "
                     f"{row['torchscript']:.1e} | {cell(('model', 1))} | {cell(('run', 1))} | "
                     f"{cell(('model', n))} | {cell(('run', n))} |")
    return "\n".join(lines) + "\n"


def run(workdir: Path) -> str:
    return section(measure(Path(workdir)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=Path(".bench"))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    args = parser.parse_args(argv)
    print(section(measure(args.workdir, args.models)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
