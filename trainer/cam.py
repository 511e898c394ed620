"""Grad-CAM heatmaps of a trained run, on the exact tensor the model saw.

The rules:
- Computed with the `grad-cam` package (pytorch_grad_cam.GradCAM), which works on our one-channel models
  as they are: the target layer is the last block of the backbone (ResNet `layer4[-1]`, DenseNet
  `features.norm5`); the target is the label's own logit (sigmoid heads), the positive class's logit
  (2-logit softmax heads) or the single logit (1-logit binary heads).
- The input is the normalised tensor `trainer.inputs.model_input` makes, the one `cxr predict` and
  `trainer.loop.predict` feed the model, so a heatmap explains the probability printed beside it.
- A heatmap is [S,S] in 0..1 (GradCAM's own per-image min-max scaling), resized to the input size.
- Figures (`cam_figure`): the stored 8-bit image, then one panel per label with the heatmap over it and
  the label's probability; written atomically as PNG.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from manifests.errors import CxrError
from trainer.plots import save_figure


def target_layer(model: nn.Module) -> nn.Module:
    """The last block of the backbone: where Grad-CAM reads activations and gradients."""
    if hasattr(model, "layer4"):
        return model.layer4[-1]
    features = getattr(model, "features", None)
    if features is not None and hasattr(features, "norm5"):
        return features.norm5
    raise CxrError(f"Grad-CAM: no known target layer in {type(model).__name__} (expected ResNet or DenseNet)")


def output_index(head: str, label_index: int) -> int:
    """Which logit explains label `label_index` under this head."""
    if head == "softmax":
        return 1
    if head == "sigmoid":
        return label_index
    return 0


def gradcam(model: nn.Module, x: torch.Tensor, outputs: Sequence[int], layer: nn.Module | None = None) -> np.ndarray:
    """Heatmaps [B, H, W] in 0..1: image b explained for logit outputs[b] (at `layer`, default `target_layer`)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=model, target_layers=[layer or target_layer(model)]) as cam:
        heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(i)) for i in outputs])
    return np.asarray(heat, dtype=np.float32)


def label_heatmaps(model: nn.Module, x: torch.Tensor, head: str, label_indices: Sequence[int]) -> np.ndarray:
    """[L, H, W] heatmaps of one input x [1,1,H,W], one per label index."""
    if not label_indices:
        return np.zeros((0, *x.shape[-2:]), np.float32)
    batch = x.expand(len(label_indices), *x.shape[1:])
    return gradcam(model, batch, [output_index(head, j) for j in label_indices])


def cam_figure(image: np.ndarray, panels: Sequence[tuple[str, float, np.ndarray]], path: str | Path,
               title: str = "") -> Path:
    """PNG: the image, then per (label, probability, heatmap) the heatmap over the image."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title(title or "input", fontsize=7)
    for ax, (label, prob, heat) in zip(axes[1:], panels):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
        ax.set_title(f"{label}: p={prob:.3f}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    return save_figure(fig, path, dpi=100)


def choose_labels(labels: Sequence[str], probs: np.ndarray, wanted: Sequence[str] = (), top: int = 3) -> list[int]:
    """Indices of `wanted` labels (error naming an unknown one), else of the `top` most probable."""
    if wanted:
        unknown = [w for w in wanted if w not in labels]
        if unknown:
            raise CxrError(f"--labels: {', '.join(unknown)} not among the run's labels ({', '.join(labels)})")
        return [list(labels).index(w) for w in wanted]
    if top < 1:
        raise CxrError(f"--top must be at least 1, not {top}")
    order = np.argsort(-np.asarray(probs, dtype=np.float64), kind="stable")
    return [int(j) for j in order[:top]]


def gallery_picks(y: np.ndarray, p: np.ndarray, labels: Sequence[str], thresholds: dict | None = None,
                  n_labels: int = 3, per_kind: int = 3) -> list[tuple[int, str, list[int], int]]:
    """For the `n_labels` labels with the most positives: (label index, "TP" | "FP", row indices, how many there
    are) of the highest-scored true positives (y = 1) and false positives (y = 0) scored at or above the label's
    threshold (chosen on valid; 0.5 without one), at most `per_kind` each, best first."""
    positives = np.nansum(y == 1.0, axis=0)
    order = [int(j) for j in np.argsort(-positives, kind="stable") if positives[j] > 0][:n_labels]
    picks = []
    for j in order:
        threshold = (thresholds or {}).get(labels[j])
        threshold = 0.5 if threshold is None else threshold
        for kind, value in (("TP", 1.0), ("FP", 0.0)):
            rows = np.flatnonzero((y[:, j] == value) & (p[:, j] >= threshold))
            rows = rows[np.argsort(-p[rows, j], kind="stable")]
            picks.append((j, kind, [int(r) for r in rows[:per_kind]], len(rows)))
    return picks


def write_gallery(loaded, sets, split: str, shared: Sequence[str], df, labels: Sequence[str],
                  thresholds: dict | None, path: str | Path, n_labels: int = 3, per_kind: int = 3) -> Path | None:
    """`gallery.png` of an evaluation (its predictions table `df`, labels as reported): per label (most positives
    first) a row of its highest-scored true positives and a row of its highest-scored false positives, both at or
    above the label's threshold, each with its Grad-CAM heatmap and probability; a row with fewer than
    `per_kind` says how many there are. The pixels are the shard sets' (read as the evaluation read them, labels
    in the run's `shared` names), normalised as the run's model saw them. None when no label has a positive."""
    from cxrshards import mix
    from trainer.inputs import model_input
    from trainer.metrics import frame_arrays
    from trainer.plots import pyplot

    y, p = frame_arrays(df, labels)
    picks = gallery_picks(y, p, labels, thresholds, n_labels, per_kind)
    if not picks:
        return None
    keys = (df["set"].astype(str) + mix.SEP + df["key"].astype(str)).tolist()
    wanted = sorted({keys[r] for _, _, rows, _ in picks for r in rows})
    having = [s for s in sets if any(k.startswith(s.name + mix.SEP) for k in wanted)]
    pixels = {}
    if having:
        stream = mix.open_mix(having, split, list(shared), shuffle=False, keys=wanted, rank=0, world_size=1)
        pixels = {key: img[0].numpy() for img, _, key in stream}
    inf = loaded.inference
    plt = pyplot()
    fig, axes = plt.subplots(len(picks), per_kind, figsize=(2.4 * per_kind, 2.7 * len(picks)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    run_labels = list(inf.labels)
    for line, (j, kind, rows, total) in enumerate(picks):
        threshold = (thresholds or {}).get(labels[j])
        at = f">= {0.5 if threshold is None else threshold:.3f}"
        if len(rows) < per_kind:
            axes[line, len(rows)].text(0.0, 0.5, f"{labels[j]} {kind}: {total} scored {at}" + ("" if total else "\n(none)"),
                                       fontsize=7, va="center", transform=axes[line, len(rows)].transAxes)
        for col, r in enumerate(rows):
            image = pixels[keys[r]]
            x = model_input(image, inf.mean, inf.std).to(loaded.device)
            output = run_labels.index(labels[j]) if labels[j] in run_labels else list(shared).index(labels[j])
            heat = gradcam(inf.model, x, [output_index(inf.head, output)])[0]
            ax = axes[line, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.set_title(f"{labels[j]} {kind} p={p[r, j]:.3f} ({at})\n{df['key'].iloc[r]}", fontsize=6)
    return save_figure(fig, path)
