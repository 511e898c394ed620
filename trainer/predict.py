"""`cxr predict`: raw PNG/JPG files -> per-label probabilities of a trained run.

An image goes through exactly what a shard sample went through when the run's shard set was built
(gray, fit, size, codec round-trip: `cxrshards.pixels.preprocess` with the parameters of the run's
card.json), then exactly the normalisation the trainer applies before the model
(`trainer.augment.augment_batch` without augmentation, the checkpoint's mean/std).

Also home of the run/checkpoint lookup shared with `trainer.evaluate`, whose errors say what to run first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cxrshards.pixels import preprocess
from manifests.errors import CxrError
from trainer.augment import AugmentSpec, augment_batch
from trainer.checkpoint import InferenceModel, load_for_inference
from trainer.losses import probabilities

CHECKPOINT_NAMES = {"best": "best.pt", "last": "last.pt"}


class RunError(CxrError):
    """A run folder or checkpoint is missing or unusable."""


def resolve_run(run: str | Path) -> Path:
    """The run folder (it must hold config.json); RunError saying how to make one otherwise."""
    if not str(run).strip():
        raise RunError("no run given (`make eval` found none under runs/ or demo/runs/): run `make demo` or "
                       "`cxr train --shards NAME --out runs/RUN` first, then pass --run runs/RUN")
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise RunError(f"no run at {run_dir}: train one first with `cxr train --shards NAME --out {run_dir}`")
    if not (run_dir / "config.json").is_file():
        raise RunError(f"{run_dir} is not a training run (no config.json): train one with "
                       f"`cxr train --shards NAME --out {run_dir}`")
    return run_dir


def resolve_checkpoint(run_dir: Path, ckpt: str | Path = "best") -> Path:
    """best / last -> RUN/best.pt / RUN/last.pt; anything else is a checkpoint path."""
    name = str(ckpt)
    path = run_dir / CHECKPOINT_NAMES[name] if name in CHECKPOINT_NAMES else Path(name)
    if path.is_file():
        return path
    if name in CHECKPOINT_NAMES:
        raise RunError(f"no checkpoint {path}: the run has not finished an epoch yet; train (or resume) it with "
                       f"`cxr train --out {run_dir} --resume` or `cxr train --shards NAME --out {run_dir}`")
    raise RunError(f"no checkpoint at {path}: pass --ckpt best, last or the path of a .pt file written by `cxr train`")


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CxrError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


@dataclass
class LoadedRun:
    run_dir: Path
    ckpt_path: Path
    inference: InferenceModel
    card: dict                      # the shard card the run was trained on (RUN/card.json; several sets: the first's)
    device: torch.device


def load_run(run: str | Path, ckpt: str | Path = "best", device: str | torch.device | None = "auto") -> LoadedRun:
    """Run folder + checkpoint -> model in eval mode, its labels, normalisation and shard card."""
    run_dir = resolve_run(run)
    ckpt_path = resolve_checkpoint(run_dir, ckpt)
    dev = pick_device(device)
    inference = load_for_inference(ckpt_path, dev)
    card_path = run_dir / "card.json"
    sets = inference.checkpoint.get("sets")
    if sets and not card_path.is_file():   # a run over several sets (cxrshards.mix): preprocess as its first set
        card_path = run_dir / "cards" / f"{sets[0]['name']}.json"
    if not card_path.is_file():
        raise RunError(f"{run_dir} has no card.json (the shard card of its training set): re-run "
                       f"`cxr train --out {run_dir} --resume` to restore it")
    try:
        card = json.loads(card_path.read_text())
    except ValueError as exc:
        raise RunError(f"{card_path}: unreadable ({exc})") from None
    return LoadedRun(run_dir=run_dir, ckpt_path=ckpt_path, inference=inference, card=card, device=dev)


def card_pixels(path: str | Path, card: dict) -> np.ndarray:
    """uint8 SxS: what `cxr shard build` stored for this file in the shard set described by `card`."""
    return preprocess(path, int(card["size"]), card.get("fit", "pad"), card.get("codec", "png"),
                      int(card.get("jpeg_quality", 95)))


def model_input(pixels: np.ndarray | torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [S,S] / [1,S,S] / [B,1,S,S] -> float [B,1,S,S]: the normalisation `trainer.loop.predict` applies."""
    x = torch.as_tensor(np.asarray(pixels) if not isinstance(pixels, torch.Tensor) else pixels)
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return augment_batch(x, AugmentSpec(flip=False, light=False, mean=mean, std=std), None)


def predict_tensor(path: str | Path, run: LoadedRun) -> torch.Tensor:
    """float [1,1,S,S]: the exact model input for a raw image file under this run."""
    inf = run.inference
    return model_input(card_pixels(path, run.card), inf.mean, inf.std)


def _write_cam(path: Path, pixels: np.ndarray, x: torch.Tensor, probs: np.ndarray, inf: InferenceModel,
               wanted: Sequence[str], top: int) -> Path:
    from trainer.cam import cam_figure, choose_labels, label_heatmaps

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
