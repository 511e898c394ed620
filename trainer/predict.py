"""`cxr predict`: raw PNG/JPG files -> per-label probabilities of a trained run.

An image goes through exactly what a shard sample went through when the run's shard set was built
(gray, fit, size, codec round-trip: `cxrshards.pixels.preprocess` with the parameters of the run's
cards/NAME.json: the first set), then exactly the normalisation the trainer applies before the model
(`trainer.augment.augment_batch` without augmentation, the checkpoint's mean/std).

The run/checkpoint lookup is `trainer.runs` (shared with the evaluation), whose errors say what to run first;
its names stay importable from here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from manifests.errors import CxrError
from trainer.cam import cam_figure, choose_labels, label_heatmaps
from trainer.checkpoint import InferenceModel
from trainer.inputs import card_pixels, model_input
from trainer.losses import probabilities
from trainer.runs import (CHECKPOINT_NAMES, LoadedRun, RunError, load_run, pick_device,  # noqa: F401 - as before
                          resolve_checkpoint, resolve_run)

def predict_tensor(path: str | Path, run: LoadedRun) -> torch.Tensor:
    """float [1,1,S,S]: the exact model input for a raw image file under this run."""
    inf = run.inference
    return model_input(card_pixels(path, run.card), inf.mean, inf.std)


def _write_cam(path: Path, pixels: np.ndarray, x: torch.Tensor, probs: np.ndarray, inf: InferenceModel,
               wanted: Sequence[str], top: int) -> Path:
    chosen = choose_labels(list(inf.labels), probs, wanted, top)
    heat = label_heatmaps(inf.model, x, inf.head, chosen)
    panels = [(inf.labels[j], float(probs[j]), heat[k]) for k, j in enumerate(chosen)]
    return cam_figure(pixels, panels, path, title=path.stem)


@torch.no_grad()
def predict_images(
    images: Sequence[str | Path],
    run: str | Path,
    ckpt: str | Path = "best",
    *,
    device: str | torch.device | None = "auto",
    batch_size: int = 32,
    cam_dir: str | Path | None = None,
    cam_labels: Sequence[str] = (),
    cam_top: int = 3,
) -> dict:
    """Per-label probabilities of raw image files under a run's model.

    Returns {"run", "checkpoint", "labels", "task", "preprocessing", "predictions": [{"image",
    "probabilities": {label: p}}]} in the order given. With `cam_dir`, also writes per image
    `CAM_DIR/NNN-STEM.png`: the image and a Grad-CAM heatmap per label (`cam_labels`, else the `cam_top`
    most probable), computed on the same input tensor (`trainer.cam`); each prediction then has "cam".
    """
    if not images:
        raise CxrError("no images given: pass one or more PNG/JPG files, e.g. `cxr predict scan.png --run runs/RUN`")
    loaded = load_run(run, ckpt, device)
    inf = loaded.inference
    preds = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        pixels = np.stack([card_pixels(p, loaded.card) for p in chunk])[:, None]
        x = model_input(torch.from_numpy(pixels), inf.mean, inf.std).to(loaded.device)
        probs = probabilities(inf.model(x).float(), inf.head).cpu().numpy()
        probs = probs.reshape(len(chunk), -1)
        for i, (path, row) in enumerate(zip(chunk, probs)):
            preds.append({"image": str(path),
                          "probabilities": {name: float(v) for name, v in zip(inf.labels, row)}})
            if cam_dir is not None:
                preds[-1]["cam"] = str(_write_cam(Path(cam_dir) / f"{start + i:03d}-{Path(path).stem}.png",
                                                  pixels[i, 0], x[i:i + 1], row, inf, cam_labels, cam_top))
    card = loaded.card
    return {
        "run": str(loaded.run_dir),
        "checkpoint": str(loaded.ckpt_path),
        "labels": list(inf.labels),
        "task": inf.task,
        "preprocessing": {"size": card.get("size"), "fit": card.get("fit"), "codec": card.get("codec"),
                          "jpeg_quality": card.get("jpeg_quality"), "mean": inf.mean, "std": inf.std,
                          "shard_set": card.get("name")},
        "predictions": preds,
    }
