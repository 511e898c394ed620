"""Scoring with an exported model (`cxr predict IMAGE... --model DIR`): onnxruntime, and no torch at all.

The contract (DIR as `cxr export` writes it, `trainer.export`; docs/DESIGN.md, "Exported models"):
- DIR/model.json describes the export: labels, preprocessing, input, output, thresholds, and each model
  file with its sha256. A model file whose bytes do not match model.json is refused (one line).
- An image becomes the model input exactly as under `cxr predict --run` (`trainer.predict`):
  `cxrshards.pixels.preprocess` with model.json's size, fit, codec and JPEG quality (DICOM included),
  then float32 `(pixels / 255 - mean) / std`, shape [N, 1, S, S].
- The graph outputs the probabilities (sigmoid, or softmax[:, 1:] for a 2-logit head, inside the graph);
  the thresholds stay in model.json, so each site can tune its own.
- The result has the keys and values of `trainer.predict.predict_images`'s (probabilities within 1e-4).
- This module imports neither torch nor torchvision; onnxruntime only when a model is loaded, and its
  absence is a one-line error naming the `cxr[export]` extra.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np

from manifests.errors import CxrError

MODEL_JSON = "model.json"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
EXTRA = "pip install 'cxr[export]'"
PREDICTION_KEYS = ("size", "fit", "codec", "jpeg_quality", "mean", "std", "shard_set")  # as `cxr predict --run`


class ExportError(CxrError):
    """An export folder, its model.json or one of its model files is missing or does not match."""


def require(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency of the `export` extra; ExportError naming the extra if missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module and not str(exc.name or "").startswith(module + "."):
            raise
        raise ExportError(f"{purpose} needs the Python package {module!r}, which is not installed: "
                          f"{EXTRA}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_export(model_dir: str | Path) -> dict:
    """DIR/model.json as a dict; ExportError saying what is missing or wrong."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ExportError(f"no export folder {folder}: write one with `cxr export --run RUN --out {folder}`")
    path = folder / MODEL_JSON
    if not path.is_file():
        raise ExportError(f"{folder} is not an export folder (no {MODEL_JSON}): write one with "
                          f"`cxr export --run RUN --out {folder}`")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else None
        raise ExportError(f"{path}: format_version {found!r}, expected {FORMAT_VERSION} (written by another "
                          f"cxr? export the run again with `cxr export`)")
    for key in ("labels", "preprocessing", "input", "output", "files"):
        if key not in meta:
            raise ExportError(f"{path}: no {key!r} entry (export the run again with `cxr export`)")
    return meta


def checked_file(model_dir: str | Path, meta: dict, name: str) -> Path:
    """DIR/NAME after checking it is listed in model.json and its sha256 matches; ExportError otherwise."""
    folder = Path(model_dir)
    entry = meta["files"].get(name)
    if entry is None:
        fmt = "onnx" if name == ONNX_FILE else "torchscript"
        raise ExportError(f"{folder / MODEL_JSON} lists no {name}: export with `cxr export --format {fmt}` "
                          f"(or both)")
    path = folder / name
    if not path.is_file():
        raise ExportError(f"{path} is missing (model.json lists it): export the run again with `cxr export`")
    sha = file_sha256(path)
    if sha != entry.get("sha256"):
        raise ExportError(f"{path} does not match {folder / MODEL_JSON}: sha256 {sha[:12]}..., model.json says "
                          f"{str(entry.get('sha256'))[:12]}... (a file from another export? export again)")
    return path


def image_pixels(path: str | Path, pre: dict) -> np.ndarray:
    """uint8 SxS: what the run's shard set stores for this file (`cxrshards.pixels.preprocess`)."""
    from cxrshards.pixels import preprocess

    return preprocess(path, int(pre["size"]), pre.get("fit", "pad"), pre.get("codec", "png"),
                      int(pre.get("jpeg_quality") or 95))


def normalize(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 [B, S, S] -> float32 [B, 1, S, S]: the trainer's normalisation, `(x / 255 - mean) / std`."""
    x = np.asarray(pixels, dtype=np.float32)[:, None] / np.float32(255.0)
    return (x - np.float32(mean)) / np.float32(std)


@dataclass
class ExportedModel:
    folder: Path
    meta: dict
    session: Any             # onnxruntime.InferenceSession
    labels: list[str]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, 1, S, S] -> float32 [N, len(labels)]."""
        return self.session.run([self.meta["output"]["name"]], {self.meta["input"]["name"]: x})[0]


def load_export(model_dir: str | Path, threads: int = 0) -> ExportedModel:
    """DIR -> an onnxruntime CPU session of DIR/model.onnx, checked against model.json."""
    meta = read_export(model_dir)
    path = checked_file(model_dir, meta, ONNX_FILE)
    ort = require("onnxruntime", "cxr predict --model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - a corrupt graph: one line naming the file
        raise ExportError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
    return ExportedModel(folder=Path(model_dir), meta=meta, session=session,
                         labels=[entry["name"] for entry in meta["labels"]])


def predict_exported(images: Sequence[str | Path], model_dir: str | Path, *, batch_size: int = 32) -> dict:
    """Per-label probabilities of raw image files under an export (`cxr predict --model DIR`).

    Returns what `trainer.predict.predict_images` returns for the run and checkpoint the export came from:
    {"run", "checkpoint", "labels", "task", "preprocessing", "predictions": [{"image", "probabilities"}]}.
    """
    if not images:
        raise CxrError("no images given: pass one or more image files, e.g. `cxr predict scan.png --model DIR`")
    model = load_export(model_dir)
    pre = model.meta["preprocessing"]
    preds = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        x = normalize(np.stack([image_pixels(p, pre) for p in chunk]), pre["mean"], pre["std"])
        probs = model.probabilities(x).reshape(len(chunk), -1)
        preds += [{"image": str(path), "probabilities": {name: float(v) for name, v in zip(model.labels, row)}}
                  for path, row in zip(chunk, probs)]
    return {
        "run": model.meta.get("run"),
        "checkpoint": model.meta.get("checkpoint", {}).get("path"),
        "labels": list(model.labels),
        "task": model.meta.get("task"),
        "preprocessing": {key: pre.get(key) for key in PREDICTION_KEYS},
        "predictions": preds,
    }
