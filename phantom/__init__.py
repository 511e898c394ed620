"""Phantom chest X-rays: demo and test data, not part of the shard engine.

Raw trees in the exact layouts of the real datasets (NIH, MIMIC-CXR-JPG, class folders), tables
included, with findings drawn into the pixels (see `phantom.generator`). `cxr demo-data` and
`cxr demo` write them; tests and benchmarks use them. The layer is "raw files": it imports only the
shared primitives of `manifests` and never the shard engine or the trainer.

This package imports nothing heavy until a generator name is used (`cxr --help` stays fast).
"""
from __future__ import annotations

SOURCES: tuple[str, ...] = ("nih", "mimic", "cardiomegaly")
DEFAULT_SIZES: dict[str, int] = {"nih": 1024, "mimic": 3000, "cardiomegaly": 1024}


def __getattr__(name: str):
    """`phantom.X` and `from phantom import X` reach `phantom.generator.X` on first use."""
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("phantom.generator"), name)
