"""`make bench`: run every benchmark side by side in one process run and write BENCHMARKS.md.

Each section module exposes `run(workdir, ...) -> str` (a markdown section). Figures are measured
here and now, on this machine; nothing is copied from an earlier run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
SECTIONS = ("manifest_bench", "shard_bench", "dicom_bench", "read_bench", "train_bench", "resume_bench", "cam_bench",
            "eval_bench", "export_bench", "gpu")  # gpu: "not measured" without CUDA


def machine_line() -> str:
    import torch

    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--workdir", type=Path, default=Path(".bench"), help="generated inputs, reused between runs")
    parser.add_argument("--only", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    args.workdir.mkdir(parents=True, exist_ok=True)

    parts = [
        "# cxr benchmarks",
        "",
        f"Written by `make bench` on {dt.date.today().isoformat()}. Machine: {machine_line()}.",
        "Every figure below comes from this one run; ratios compare against the naive baseline each",
        "issue names, measured on the same files and cores in the same run.",
        "",
    ]
    for name in args.only:
        started = time.perf_counter()
        print(f"== {name} ...", flush=True)
        module = importlib.import_module(name)
        section = module.run(args.workdir.resolve())
        parts += [section.rstrip(), "", f"_({name} took {time.perf_counter() - started:.0f} s)_", ""]
        print(section, flush=True)
    args.out.write_text("\n".join(parts) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
