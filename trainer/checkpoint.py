"""Checkpoints: plain dicts of tensors and JSON-like values, written atomically, loaded with
`torch.load(weights_only=True)`.

Keys: model, optimizer, scheduler, scaler, epoch (epochs completed), step (optimizer steps done),
rng, config (TrainConfig as dict), labels, task, head ("sigmoid" | "softmax"), card_sha256 (`sets_sha256` of
the sets' card sha256s), sets ([{name, path, source, card_sha256, labels}], one per shard set), shared_labels,
label_map, best_metric, best_epoch, normalize ([mean, std] used), world_size, version.
Release 0.1 wrote a one-set run's checkpoint without `sets`, with `card_sha256` its one card's sha256:
`trained_card_shas` reads both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from manifests import __version__
from manifests.atomic import atomic_path
from manifests.errors import CxrError

CARD = "dataset.json"


class CheckpointError(CxrError):
    """A checkpoint is missing, unreadable or does not belong to this run's shard set."""


def card_sha256(shard_dir: str | Path) -> str:
    """sha256 of the shard set's card (dataset.json bytes)."""
    return hashlib.sha256((Path(shard_dir) / CARD).read_bytes()).hexdigest()


def sets_sha256(card_shas: list[str]) -> str:
    """A run's identity over its shard sets: sha256 of their card sha256s, one per line, in the run's order."""
    return hashlib.sha256("".join(sha + "\n" for sha in card_shas).encode()).hexdigest()


def trained_card_shas(state: dict[str, Any]) -> list[str]:
    """The card sha256 of each shard set a checkpoint was trained on, in the run's order."""
    sets = state.get("sets")
    if sets:
        return [str(s.get("card_sha256")) for s in sets]
    return [str(state.get("card_sha256"))]   # release 0.1, one set: its card's own sha256


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save `state` to a temporary sibling, then rename it over `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A cxr checkpoint dict (weights_only load); CheckpointError naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"no checkpoint in {path} (expected best.pt or last.pt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated / foreign file: one line naming it
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not {"model", "config", "labels", "task"} <= set(state):
        raise CheckpointError(f"{path} is not a cxr checkpoint (no model/config/labels/task)")
    state["path"] = str(path)
    return state


def rng_state() -> dict[str, Any]:
    """Global RNG states (the trainer draws nothing from them, saved so a resume restores them too)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


@dataclass
class InferenceModel:
    """What `cxr eval` / `cxr predict` need from a run: the model and how its inputs and outputs look."""
    model: nn.Module          # in eval mode, on the requested device
    labels: list[str]         # output columns, in order
    task: str                 # "multilabel" | "binary"
    head: str                 # "sigmoid" | "softmax" (probability = softmax[:, 1])
    mean: float               # input normalisation on the 0..1 scale
    std: float
    config: dict              # the run's TrainConfig as a dict
    card_sha256: str
    checkpoint: dict          # the whole checkpoint dict


def load_for_inference(path: str | Path, device: str | torch.device = "cpu") -> InferenceModel:
    """Rebuild the model of a checkpoint (file, or run folder: best.pt then last.pt) for prediction."""
    from trainer.models import build_model

    state = load_checkpoint(path)
    cfg = state["config"]
    head = state.get("head", "sigmoid")
    outputs = 2 if head == "softmax" else len(state["labels"])
    model = build_model(cfg["model"], outputs)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    mean, std = state.get("normalize", (0.5, 0.5))
    return InferenceModel(model=model, labels=list(state["labels"]), task=state["task"], head=head,
                          mean=float(mean), std=float(std), config=dict(cfg),
                          card_sha256=state.get("card_sha256", ""), checkpoint=state)


def version() -> str:
    return __version__
