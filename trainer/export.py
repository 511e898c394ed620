"""`cxr export`: a run's checkpoint -> DIR/model.onnx and/or DIR/model.ts, DIR/model.json and DIR/README.md.

The contract (docs/DESIGN.md, "Exported models"; read back by `trainer.runtime`):
- The graph takes `image`, float32 [N, 1, S, S] with N dynamic, already normalised
  (`(pixels / 255 - mean) / std`), and returns `probabilities`, float32 [N, L]: the sigmoid, or
  softmax[:, 1:] of a 2-logit head, is inside the graph (`trainer.losses.probabilities`).
- ONNX through torch's torch.export-based exporter (`dynamo=True`, the supported one; the TorchScript-based
  one is deprecated), weights inside the one file, optimised; TorchScript by `torch.jit.trace`.
- Before anything is written, both are checked against PyTorch on a batch of PARITY_IMAGES seeded random
  images: a probability further than PARITY_TOL from PyTorch's refuses the export.
- model.json holds the labels (with their shared names), the task and head, the exact preprocessing of
  the run's shard set (gray rules, fit, size, codec round trip, mean, std), the Youden thresholds of the
  run's valid split when RUN/eval/report.json evaluated this very checkpoint (else none, saying why), the
  input and output, the opset, library versions, the checkpoint's sha256 and each model file's sha256.
- Files are written atomically; model.json last, so a folder with a model.json is complete. A model file
  of the format not exported this time (left by an earlier export into DIR) is removed.
"""
from __future__ import annotations

import contextlib
import io
import json
import platform
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from manifests import __version__
from manifests.atomic import atomic_path, write_bytes_atomic
from trainer.losses import probabilities
from trainer.predict import load_run
from trainer.runtime import (EXTRA, FORMAT_VERSION, INPUT_NAME, MODEL_JSON, ONNX_FILE, OUTPUT_NAME, TORCHSCRIPT_FILE,
                             ExportError, file_sha256, normalize, require)

FORMATS = {"onnx": (ONNX_FILE,), "torchscript": (TORCHSCRIPT_FILE,), "both": (ONNX_FILE, TORCHSCRIPT_FILE)}
OPSET = 18                 # torch.onnx's torch.export-based exporter's own default; onnxruntime >= 1.14 runs it
PARITY_IMAGES = 4
PARITY_TOL = 1e-4
GRAY_RULES = ("cxrshards.pixels: colour -> ITU-R 601 luma; 16-bit and other non-8-bit -> linear own min..max "
              "to 0..255; EXIF orientation ignored; DICOM -> Modality LUT, first VOI LUT or window, else own "
              "min..max, MONOCHROME1 inverted")


class ProbabilityModel(nn.Module):
    """The run's model with its output activation: normalised images -> probabilities."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model(image), self.head)


def parity_batch(size: int, mean: float, std: float, n: int = PARITY_IMAGES, seed: int = 0) -> np.ndarray:
    """float32 [n, 1, S, S]: seeded random uint8 images, normalised as the trainer does."""
    pixels = np.random.default_rng([seed, size]).integers(0, 256, (n, size, size), dtype=np.uint8)
    return normalize(pixels, mean, std)


def _export_onnx(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    require("onnx", "cxr export --format onnx")
    require("onnxscript", "cxr export --format onnx")
    batch = torch.export.Dim("N", min=1)
    with atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(tmp), dynamo=True, external_data=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                          optimize=True, verbose=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))


def _onnx_probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    ort = require("onnxruntime", "cxr export --format onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def _torchscript_probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def run_thresholds(run_dir: Path, ckpt_sha256: str) -> dict:
    """Youden thresholds of the run's valid split from RUN/eval/report.json, when it evaluated this checkpoint."""
    report_path = run_dir / "eval" / "report.json"
    none = {"method": "youden", "source": None, "per_label": None}
    if not report_path.is_file():
        return {**none, "note": f"no evaluation in {report_path}: run `cxr eval --run {run_dir}` and export "
                                "again to record the thresholds"}
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return {**none, "note": f"{report_path} is not valid JSON: evaluate the run again"}
    if (report.get("checkpoint") or {}).get("sha256") != ckpt_sha256:
        return {**none, "note": f"{report_path} evaluated another checkpoint: run `cxr eval --run {run_dir}` "
                                "with this --ckpt and export again"}
    th = report.get("thresholds") or {}
    if th.get("source") != "valid" or not th.get("per_label"):
        return {**none, "note": f"{report_path} has no valid-split thresholds ({th.get('source')})"}
    return {"method": th.get("method", "youden"), "source": "valid", "per_label": th["per_label"],
            "report": str(report_path), "split_evaluated": report.get("split")}


def _versions(formats: Sequence[str]) -> dict:
    import torchvision

    out = {"cxr": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__}
    if ONNX_FILE in formats:
        for name in ("onnx", "onnxscript", "onnxruntime"):
            out[name] = require(name, "cxr export --format onnx").__version__
    return out


def export_run(run: str | Path, out: str | Path, ckpt: str | Path = "best", fmt: str = "both",
               log: Callable[[str], None] | None = None) -> dict:
    """Export a run's checkpoint into `out`; returns model.json's content."""
    log = log or (lambda _msg: None)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected onnx, torchscript or both")
    files = FORMATS[fmt]
    if ONNX_FILE in files:   # a missing extra fails before the checkpoint is even read
        for name in ("onnx", "onnxscript", "onnxruntime"):
            require(name, "cxr export --format onnx")
    loaded = load_run(run, ckpt, "cpu")
    inf, card = loaded.inference, loaded.card
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    size = int(card["size"])
    wrapper = ProbabilityModel(inf.model, inf.head).eval()
    x = parity_batch(size, inf.mean, inf.std)
    example = torch.from_numpy(x[:2])
    with torch.no_grad():
        reference = wrapper(torch.from_numpy(x)).numpy()
    written, parity = {}, {}
    for name in files:
        log(f"writing {out / name}")
        if name == ONNX_FILE:
            _export_onnx(wrapper, example, out / name)
            got = _onnx_probabilities(out / name, x)
        else:
            _export_torchscript(wrapper, example, out / name)
            got = _torchscript_probabilities(out / name, x)
        diff = float(np.abs(got.astype(np.float64) - reference).max())
        if not np.isfinite(diff) or diff > PARITY_TOL or got.shape != reference.shape:
            (out / name).unlink(missing_ok=True)
            raise ExportError(f"{out / name}: its probabilities differ from PyTorch's by {diff:.2g} (> {PARITY_TOL}) "
                              f"on {len(x)} test images; not exported")
        parity[name] = diff
        written[name] = {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
        if name == ONNX_FILE:
            import onnx

            opsets = {o.domain or "ai.onnx": o.version for o in onnx.load(str(out / name), load_external_data=False).opset_import}
            written[name]["opset"] = opsets.get("ai.onnx", OPSET)
    labels = list(inf.labels)
    shared = list(inf.checkpoint.get("shared_labels") or labels)
    n_out = reference.shape[1]
    meta = {
        "format_version": FORMAT_VERSION,
        "run": str(loaded.run_dir),
        "checkpoint": {"path": str(loaded.ckpt_path), "sha256": file_sha256(loaded.ckpt_path),
                       "epoch": inf.checkpoint.get("epoch"), "best_metric": inf.checkpoint.get("best_metric")},
        "model": inf.config.get("model"),
        "task": inf.task,
        "head": inf.head,
        "labels": [{"name": n, "shared": s, "output": i} for i, (n, s) in enumerate(zip(labels, shared))],
        "preprocessing": {
            "code": "cxrshards.pixels.preprocess(path, size, fit, codec, jpeg_quality)",
            "gray": GRAY_RULES,
            "fit": card.get("fit", "pad"),
            "size": size,
            "codec": card.get("codec", "png"),
            "jpeg_quality": card.get("jpeg_quality"),
            "codec_round_trip": "jpeg: encode at jpeg_quality then decode, as the shard set stores it; "
                                "png and raw are lossless (no change)",
            "normalize": "x = (pixels / 255 - mean) / std, float32",
            "mean": inf.mean,
            "std": inf.std,
            "shard_set": card.get("name"),
            "card_sha256": inf.card_sha256,
        },
        "thresholds": run_thresholds(loaded.run_dir, file_sha256(loaded.ckpt_path)),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 1, size, size], "dynamic": ["N"],
                  "layout": "NCHW, one gray channel, normalised as preprocessing.normalize says"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", n_out],
                   "activation": "softmax[:, 1:]" if inf.head == "softmax" else "sigmoid", "inside_graph": True,
                   "columns": labels},
        "files": written,
        "opset": written.get(ONNX_FILE, {}).get("opset"),
        "parity": {"images": len(x), "inputs": "seeded random uint8 images, normalised", "tolerance": PARITY_TOL,
                   "max_abs_diff": parity},
        "versions": _versions(files),
    }
    for stale in set(FORMATS["both"]) - set(files):   # an earlier export's other file: model.json no longer vouches for it
        (out / stale).unlink(missing_ok=True)
    write_bytes_atomic(out / "README.md", readme(meta).encode())
    write_bytes_atomic(out / MODEL_JSON, (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def readme(meta: dict) -> str:
    """DIR/README.md: what the folder holds and how to run it with onnxruntime alone."""
    pre, th = meta["preprocessing"], meta["thresholds"]
    names = ", ".join(e["name"] for e in meta["labels"])
    files = ", ".join(meta["files"])
    threshold_line = ("Decision thresholds (Youden, on the run's valid split) are in model.json `thresholds`; "
                      "tune your own on local data." if th.get("per_label")
                      else f"No thresholds recorded: {th.get('note')}.")
    return f"""# {meta['model']} exported from {meta['run']}

Files: {files}, model.json (everything below, machine-readable). Written by `cxr export` (cxr {meta['versions']['cxr']}).

- Input `{meta['input']['name']}`: float32 [N, 1, {pre['size']}, {pre['size']}], N any.
- Output `{meta['output']['name']}`: float32 [N, {meta['output']['shape'][1]}], probabilities of: {names}
  ({meta['output']['activation']}, inside the graph).
- Preprocessing: gray, fit `{pre['fit']}` to {pre['size']} px, codec round trip `{pre['codec']}`, then
  `(pixels / 255 - {pre['mean']}) / {pre['std']}`. `cxr predict IMAGE --model DIR` does all of it.
- {threshold_line}

With onnxruntime, numpy and OpenCV only (an image already {pre['fit']}-resized to {pre['size']} px; other
images: `cxrshards.pixels.preprocess`, or `cxr predict IMAGE --model DIR`):

```python
import json, cv2, numpy as np, onnxruntime as ort

meta = json.load(open("model.json"))
pre = meta["preprocessing"]
session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
pixels = cv2.imread("image.png", cv2.IMREAD_GRAYSCALE)            # uint8 {pre['size']} x {pre['size']}
x = ((pixels / np.float32(255) - pre["mean"]) / pre["std"]).astype(np.float32)[None, None]
probs = session.run(["{meta['output']['name']}"], {{"{meta['input']['name']}": x}})[0][0]
for label, p in zip(meta["output"]["columns"], probs):
    print(f"{{label}}: {{p:.3f}}")
```
"""


__all__ = ["FORMATS", "EXTRA", "OPSET", "PARITY_TOL", "ProbabilityModel", "export_run", "parity_batch", "readme",
           "run_thresholds"]
