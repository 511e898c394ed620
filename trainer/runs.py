"""A trained run, loaded for scoring: its folder, checkpoint, model, cards and shard sets.

The contract:
- A run folder holds config.json and best.pt / last.pt (`cxr train`). Its shard cards are
  RUN/cards/NAME.json, one per set in the checkpoint's `sets`; a one-set run of release 0.1 (checkpoint
  without `sets`) has RUN/card.json instead, read as the one card.
- `run_sets` resolves the run's own shard sets from config.json (`shards`, `root`) and refuses a set whose
  card is no longer the one the run was trained on (`trainer.checkpoint.trained_card_shas`).
- The label map of a run is its checkpoint's (`label_map`, the rows used at training), else the built-in one;
  `--label-map FILE` replaces it (`label_map_for`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from manifests.errors import CxrError
from manifests.labelmap import LabelMap, load_label_map
from trainer.checkpoint import InferenceModel, card_sha256, load_for_inference, trained_card_shas

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


def card_paths(run_dir: Path, checkpoint: dict) -> list[Path]:
    """Where the run keeps the card of each of its shard sets, in the run's order."""
    sets = checkpoint.get("sets")
    if sets:
        return [run_dir / "cards" / f"{s['name']}.json" for s in sets]
    return [run_dir / "card.json"]   # release 0.1, one set


@dataclass
class LoadedRun:
    run_dir: Path
    ckpt_path: Path
    inference: InferenceModel
    cards: list[dict]               # the shard cards the run was trained on, one per set, in the run's order
    device: torch.device

    @property
    def card(self) -> dict:
        """The first set's card: how `cxr predict` preprocesses a raw image (all sets share the size)."""
        return self.cards[0]

    @property
    def name(self) -> str:
        """The run's shard sets as one name: `nih-224`, or `nih-224+mimic-224`."""
        return "+".join(str(c.get("name")) for c in self.cards)


def load_run(run: str | Path, ckpt: str | Path = "best", device: str | torch.device | None = "auto") -> LoadedRun:
    """Run folder + checkpoint -> model in eval mode, its labels, normalisation and shard cards."""
    run_dir = resolve_run(run)
    ckpt_path = resolve_checkpoint(run_dir, ckpt)
    dev = pick_device(device)
    inference = load_for_inference(ckpt_path, dev)
    cards = []
    for path in card_paths(run_dir, inference.checkpoint):
        if not path.is_file():
            raise RunError(f"{run_dir} has no {path.relative_to(run_dir)} (the shard card of its training set): "
                           f"re-run `cxr train --out {run_dir} --resume` to restore it")
        try:
            cards.append(json.loads(path.read_text()))
        except ValueError as exc:
            raise RunError(f"{path}: unreadable ({exc})") from None
    return LoadedRun(run_dir=run_dir, ckpt_path=ckpt_path, inference=inference, cards=cards, device=dev)


def label_map_for(checkpoint: dict, override: str | Path | None = None) -> tuple[LabelMap, str]:
    """(map, description): `--label-map FILE` over the built-in table, else the checkpoint's, else built-in."""
    if override is not None:
        return load_label_map(override), f"built-in with {override} on top (--label-map)"
    rows = checkpoint.get("label_map")
    if rows:
        return LabelMap(renames={(r["source"], r["label"]): r["shared"] for r in rows}), "the checkpoint's (used at training)"
    return load_label_map(), "built-in (manifests/label_map.csv)"


def run_sets(loaded: LoadedRun, label_map: LabelMap, root: str | Path | None = None, **remote):
    """The run's own shard sets (`cxrshards.mix.MixSet`), each checked to hold the card it was trained on."""
    from cxrshards import mix

    cfg = loaded.inference.config
    refs = cfg.get("shards")
    if not refs:
        raise RunError(f"{loaded.run_dir}/config.json names no shard set: pass --shards NAME_OR_PATH")
    refs = [refs] if isinstance(refs, str) else list(refs)
    try:
        sets = mix.resolve_sets(refs, root if root is not None else cfg.get("root"), label_map,
                                **{"cache": cfg.get("cache"), "cache_gb": cfg.get("cache_gb"), **remote})
    except CxrError as exc:
        raise RunError(f"the run's own shard set(s) {', '.join(map(str, refs))} cannot be opened "
                       f"({str(exc).splitlines()[0]}): evaluation needs them (the valid split gives the thresholds); "
                       f"make them reachable (--root) or evaluate where they are") from None
    trained = trained_card_shas(loaded.inference.checkpoint)
    for s, sha in zip(sets, trained):
        if card_sha256(s.shard_dir) != sha:
            raise RunError(f"shard set {s.shard_dir} is no longer the one {loaded.run_dir} was trained on (card "
                           f"sha256 differs): rebuild it as it was, or restore it")
    return sets
