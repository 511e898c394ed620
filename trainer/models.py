"""torchvision ResNet/DenseNet with a one-channel stem, ImageNet and checkpoint initialisation, and
the seed's staged fine-tuning.

Stages (what each `--stage` TRAINS; everything else is frozen: requires_grad False and its
BatchNorm layers kept in eval mode, so a frozen part does not change at all):

| stage | ResNet                 | DenseNet                                                      |
|-------|------------------------|---------------------------------------------------------------|
| 1     | layer2-4 + fc          | transition1, denseblock2-4 (+ transitions 2-3), norm5 + classifier |
| 2     | layer3-4 + fc          | transition2, denseblock3-4 (+ transition3), norm5 + classifier  |
| 3     | layer4 + fc            | transition3, denseblock4, norm5 + classifier                    |
| 4     | fc only                | classifier only                                                 |

DenseNet mapping: ResNet's `layerK` opens with the downsampling block that reads `layer(K-1)`'s
output; DenseNet's equivalent is `transition(K-1)` (compress + pool) followed by `denseblockK`.
`norm5` (the final BatchNorm) closes denseblock4 as the last block of layer4 does.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from manifests.errors import CxrError
from trainer.config import MODELS


class ModelError(CxrError):
    """A model, its weights or its fine-tuning stage is unusable as asked."""


_RESNET_STAGES = {
    1: ("layer2", "layer3", "layer4", "fc"),
    2: ("layer3", "layer4", "fc"),
    3: ("layer4", "fc"),
    4: ("fc",),
}
_DENSENET_STAGES = {
    1: ("features.transition1", "features.denseblock2", "features.transition2", "features.denseblock3",
        "features.transition3", "features.denseblock4", "features.norm5", "classifier"),
    2: ("features.transition2", "features.denseblock3", "features.transition3", "features.denseblock4",
        "features.norm5", "classifier"),
    3: ("features.transition3", "features.denseblock4", "features.norm5", "classifier"),
    4: ("classifier",),
}
# Trained module prefixes per model family and stage.
STAGES = {"resnet": _RESNET_STAGES, "densenet": _DENSENET_STAGES}
HEAD = {"resnet": "fc", "densenet": "classifier"}
STEM = {"resnet": "conv1", "densenet": "features.conv0"}


def family(name: str) -> str:
    if name.startswith("resnet"):
        return "resnet"
    if name.startswith("densenet"):
        return "densenet"
    raise ModelError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")


def head_prefix(name: str) -> str:
    return HEAD[family(name)]


def architecture(name: str) -> Callable[..., nn.Module]:
    """torchvision's builder of `name` (`torchvision.models.resnet18`, ...).

    When torchvision is not imported yet, only its resnet and densenet modules are loaded: `import
    torchvision` runs its package __init__, which imports every model, the detection ops and through
    them torch._dynamo (~1.9 s of the ~2 s; `cxr predict --run` has no use for any of it). Both package
    __init__s are skipped for the duration of that import and their modules are dropped from sys.modules
    afterwards, so a later `import torchvision` anywhere is the ordinary, complete one.
    """
    family(name)
    if "torchvision" in sys.modules:
        import torchvision.models

        return getattr(torchvision.models, name)
    before = set(sys.modules)
    try:
        for package in ("torchvision", "torchvision.models"):   # the packages, their __init__ not run
            spec = importlib.util.find_spec(package)
            sys.modules[package] = importlib.util.module_from_spec(spec)
        module = importlib.import_module(f"torchvision.models.{family(name)}")
    finally:
        for added in set(sys.modules) - before:
            if added == "torchvision" or added.startswith("torchvision."):
                del sys.modules[added]
    return getattr(module, name)


def build_model(name: str, num_outputs: int, in_chans: int = 1, seed: int | None = None) -> nn.Module:
    """A torchvision model with an `in_chans`-channel first convolution and `num_outputs` logits.

    With `seed`, initialisation draws from a forked RNG seeded with it: the global RNG is untouched.
    """
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = architecture(name)(weights=None, num_classes=num_outputs)
        fam = family(name)
        old = model.get_submodule(STEM[fam])
        conv = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        if fam == "resnet":
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            model.conv1 = conv
        else:
            nn.init.kaiming_normal_(conv.weight)
            model.features.conv0 = conv
    return model


def _fit_stem(state: dict[str, torch.Tensor], name: str, in_chans: int) -> None:
    """Sum the RGB filters of the first convolution into `in_chans` (1) channels, in place."""
    key = STEM[family(name)] + ".weight"
    w = state.get(key)
    if w is not None and w.shape[1] != in_chans:
        if in_chans != 1:
            raise ModelError(f"cannot adapt a {w.shape[1]}-channel stem to {in_chans} channels")
        state[key] = w.sum(dim=1, keepdim=True)


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def imagenet_file_names(name: str) -> list[str]:
    """torchvision's file names for `name`'s ImageNet weights, IMAGENET1K_V1 first."""
    import torchvision

    enum = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
            "resnet101": "ResNet101_Weights", "densenet121": "DenseNet121_Weights",
            "densenet169": "DenseNet169_Weights"}[name]
    return [w.url.rsplit("/", 1)[1] for w in getattr(torchvision.models, enum)]


def imagenet_weights_path(name: str, explicit: str | Path | None = None) -> Path:
    """Where the ImageNet weights are: `explicit`, else the torch hub cache
    (`$TORCH_HOME/hub/checkpoints/<torchvision file name>`). ModelError naming the path if absent."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ModelError(f"ImageNet weights file {path} not found (--imagenet-weights)")
        return path
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    names = imagenet_file_names(name)
    for file_name in names:
        if (folder / file_name).is_file():
            return folder / file_name
    raise ModelError(f"ImageNet weights for {name} not found: expected {folder / names[0]} "
                     f"(copy torchvision's file there or pass --imagenet-weights FILE; nothing is downloaded)")


def load_imagenet(model: nn.Module, name: str, path: str | Path) -> None:
    """Load torchvision ImageNet weights into `model` (stem summed to 1 channel, head left as is)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable file: one line naming it
        raise ModelError(f"cannot read ImageNet weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path} is not a state dict of torchvision {name} weights")
    if family(name) == "densenet":
        state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    _fit_stem(state, name, model.get_submodule(STEM[family(name)]).in_channels)
    head = head_prefix(name) + "."
    state = {k: v for k, v in state.items() if not k.startswith(head)}
    _load_backbone_state(model, state, name, str(path))


def _load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], name: str, source: str) -> None:
    head = head_prefix(name) + "."
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ModelError(f"{source} does not fit a {name}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                         f"expected {tuple(own[wrong[0]].shape)}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        first = (missing or result.unexpected_keys)[0]
        raise ModelError(f"{source} does not hold {name} weights ({'missing' if missing else 'unexpected'} "
                         f"key {first})")


def load_transfer(model: nn.Module, name: str, state: dict[str, torch.Tensor], keep_head: bool,
                  source: str) -> None:
    """Load a cxr checkpoint's model state: the whole model when `keep_head`, else the backbone only
    (the head keeps its fresh initialisation: task or labels differ)."""
    state = dict(state)
    _fit_stem(state, name, model.get_submodule(STEM[family(name)]).in_channels)
    if keep_head:
        own = model.state_dict()
        head = head_prefix(name) + "."
        bad = [k for k in state if k.startswith(head) and k in own and own[k].shape != state[k].shape]
        if not bad:
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelError(f"{source} does not hold {name} weights (key {(missing or unexpected)[0]})")
            return
    head = head_prefix(name) + "."
    _load_backbone_state(model, {k: v for k, v in state.items() if not k.startswith(head)}, name, source)


def trained_prefixes(name: str, stage: int) -> tuple[str, ...]:
    """Module prefixes trained at `stage` (0: everything -> ("",))."""
    if stage == 0:
        return ("",)
    stages = STAGES[family(name)]
    if stage not in stages:
        raise ModelError(f"--stage {stage}: {name} has stages {', '.join(map(str, stages))}")
    return stages[stage]


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def apply_stage(model: nn.Module, name: str, stage: int) -> list[str]:
    """Freeze everything outside the stage's trained modules; return the trained parameter names."""
    prefixes = trained_prefixes(name, stage)
    trained = []
    for pname, param in model.named_parameters():
        param.requires_grad_(_under(pname, prefixes))
        if param.requires_grad:
            trained.append(pname)
    return trained


def set_train_mode(model: nn.Module, name: str, stage: int) -> None:
    """model.train(), then BatchNorm layers of frozen modules back to eval (running stats stay put)."""
    model.train()
    if stage == 0:
        return
    prefixes = trained_prefixes(name, stage)
    for mname, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _under(mname, prefixes):
            module.eval()
