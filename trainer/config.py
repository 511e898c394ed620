"""Every `cxr train` option in one frozen dataclass: the CLI fills it, a TOML/YAML file may set any
field, and the resolved config is saved as `RUN/config.json` and inside every checkpoint."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from manifests.errors import CxrError

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169")
TASKS = ("auto", "multilabel", "binary")
LOSSES = ("bce", "bce-pos-weight", "focal", "ce")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine")
AUGMENTS = ("light", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("auto", "wds", "hdf5")
DECODES = ("cpu", "gpu")


class ConfigError(CxrError):
    """A training option or config file is unusable as given."""


@dataclass(frozen=True)
class TrainConfig:
    # --- data: which shard set, which labels, which samples each epoch
    shards: tuple[str, ...] = ()            # shard set names (under root), folder paths or URLs; several = one run over
                                            # all (cxrshards.mix); a "a,b" string is split at commas
    root: str | None = None                 # shard root; None: $CXR_SHARDS or ./shards
    format: str = "auto"                    # reader format: auto | wds | hdf5
    labels: tuple[str, ...] = ()            # subset of the card's labels; () = all of them
    views: tuple[str, ...] = ()             # keep only these views (manifest `view`, e.g. AP) in train and valid; () = all
    max_per_label: int = 0                  # per-label cap of train positives, fresh draw each epoch; 0 = off
    workers: int = 2                        # DataLoader worker processes
    shuffle_buffer: int = 1000              # reader shuffle buffer (samples)
    mix: str = "proportional"               # several sets: proportional | equal | W1,W2,... (cxrshards.mix)
    select_on: str | None = None            # several sets: best.pt on this set's valid macro AUROC; None = pooled
    label_map: str | None = None            # CSV source,label,shared over the built-in label map (manifests.labelmap)
    cache: str | None = None                # URL sets: keep downloaded tars here; None: $CXR_CACHE, else stream
    cache_gb: float = 100.0                 # URL sets: size limit of the tar cache (GiB), least recently used out
    decode: str = "cpu"                     # cpu (loader workers) | gpu (JPEG tars decoded on the GPU in batches)

    # --- model
    model: str = "resnet18"                 # resnet18|34|50|101, densenet121|169 (1-channel input)
    init: str = "scratch"                   # scratch | imagenet | PATH to a cxr checkpoint (backbone transfer)
    imagenet_weights: str | None = None     # torchvision .pth file; None: $TORCH_HOME/hub/checkpoints/<name>
    task: str = "auto"                      # auto (1 label -> binary) | multilabel | binary
    stage: int = 0                          # staged fine-tuning 1..4 (see trainer.models.STAGES); 0 = train all

    # --- loss
    loss: str = "bce"                       # bce | bce-pos-weight | focal | ce (binary, 2 logits)
    focal_gamma: float = 2.0                # focal loss focusing parameter (seed 000)
    focal_alpha: float | None = None        # focal loss positive-class weight; None = no alpha term

    # --- optimisation
    optimizer: str = "adam"                 # adam | adamw | sgd
    lr: float = 1e-5                        # peak learning rate (the seeds' 1e-5)
    weight_decay: float = 0.0
    momentum: float = 0.9                   # sgd only
    scheduler: str = "none"                 # none | step | cosine  (lr is a pure function of the step)
    step_size: int = 7                      # step: multiply lr by gamma every step_size epochs
    gamma: float = 0.1
    warmup: int = 0                         # linear warmup over this many optimizer steps
    min_lr: float = 0.0                     # cosine floor
    epochs: int = 50
    batch_size: int = 64                    # per process (per GPU under torchrun)
    early_stop: int = 0                     # stop after N epochs without a better val macro AUROC; 0 = off

    # --- augmentation (on the model's device, whole batches, RNG seeded by (seed, epoch, step, rank))
    flip: bool = True                       # random horizontal flip (seed parity)
    augment: str = "light"                  # light: small random resized crop + rotation | none
    normalize: tuple[float, float] | None = None   # (mean, std) on the 0..1 scale; None = card's train stats

    # --- runtime
    precision: str = "fp32"                 # fp32 | bf16 | fp16 (autocast; GradScaler for fp16)
    channels_last: bool = False
    compile: bool = False                   # torch.compile the model
    device: str = "auto"                    # auto (cuda if available) | cpu | cuda
    seed: int = 0                           # model init, data order, augmentation
    quiet: bool = False                     # no progress within epochs
    log_every: float = 30.0                 # seconds between progress lines when output is not a terminal

    # --- run folder
    out: str = ""                           # run folder: config.json, metrics.csv, last.pt, best.pt, cards/NAME.json
    resume: str | None = None               # None | "last" (OUT/last.pt) | path to a checkpoint
    save_every: float = 10.0                # minutes between last.pt saves inside an epoch; 0 = epoch ends only

    def __post_init__(self) -> None:
        # A single set may be given as a plain string (old config.json files, TrainConfig(shards="nih-224")).
        object.__setattr__(self, "shards", _coerce("shards", self.shards, "shards") or ())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists; one shard set stays a string, as before several)."""
        values = json.loads(json.dumps(dataclasses.asdict(self)))
        if len(self.shards) == 1:
            values["shards"] = self.shards[0]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        known = {f.name: f for f in fields(cls)}
        clean: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key not in known:
                raise ConfigError(f"{where}: unknown option {raw_key!r} (known: {', '.join(known)})")
            clean[key] = _coerce(key, value, where)
        cfg = cls(**clean)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> "TrainConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError (one line) on any bad value."""
        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(options)}")

        choice("model", MODELS)
        choice("task", TASKS)
        choice("loss", LOSSES)
        choice("optimizer", OPTIMIZERS)
        choice("scheduler", SCHEDULERS)
        choice("augment", AUGMENTS)
        choice("precision", PRECISIONS)
        choice("device", DEVICES)
        choice("format", FORMATS)
        choice("decode", DECODES)
        if not self.init:
            raise ConfigError("--init must be scratch, imagenet or a checkpoint path")
        positive = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size, "log_every": self.log_every,
                    "step_size": self.step_size, "shuffle_buffer": self.shuffle_buffer}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be > 0")
        non_negative = {"weight_decay": self.weight_decay, "warmup": self.warmup, "workers": self.workers,
                        "max_per_label": self.max_per_label, "early_stop": self.early_stop,
                        "min_lr": self.min_lr, "focal_gamma": self.focal_gamma, "momentum": self.momentum,
                        "save_every": self.save_every}
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be >= 0")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"--gamma {self.gamma}: must be in (0, 1]")
        if self.stage not in (0, 1, 2, 3, 4):
            raise ConfigError(f"--stage {self.stage}: expected 1, 2, 3 or 4 (0 = train every layer)")
        if self.focal_alpha is not None and not 0 <= self.focal_alpha <= 1:
            raise ConfigError(f"--focal-alpha {self.focal_alpha}: must be in [0, 1]")
        if self.normalize is not None and (len(self.normalize) != 2 or not self.normalize[1] > 0):
            raise ConfigError(f"--normalize {self.normalize}: expected MEAN,STD with STD > 0, e.g. 0.5,0.5")
        if self.loss == "ce" and self.task == "multilabel":
            raise ConfigError("--loss ce is for --task binary (2 logits); use bce, bce-pos-weight or focal")
        if len(set(self.shards)) != len(self.shards):
            raise ConfigError(f"--shards {','.join(self.shards)}: a shard set is listed twice")
        if len(self.shards) < 2 and self.mix != "proportional":
            raise ConfigError(f"--mix {self.mix}: mixing needs several shard sets (--shards A,B)")
        if len(self.shards) >= 2:
            from cxrshards.mix import MixError, parse_mix

            try:
                parse_mix(self.mix, len(self.shards))
            except MixError as exc:
                raise ConfigError(str(exc)) from None
        if len(self.shards) < 2 and self.select_on is not None:
            raise ConfigError(f"--select-on {self.select_on}: needs several shard sets (--shards A,B)")
        if not self.cache_gb > 0:
            raise ConfigError(f"--cache-gb {self.cache_gb}: must be > 0")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"--labels {','.join(self.labels)}: a label is listed twice")


def _coerce(key: str, value: Any, where: str) -> Any:
    """Turn config-file / CLI values into the field's type (lists -> tuples, "a,b" strings -> tuples)."""
    if value is None:
        return None
    try:
        if key == "labels":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if key == "shards":
            if isinstance(value, str):
                value = value.split(",")
            return tuple(str(v).strip() for v in value if str(v).strip())
        if key == "views":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        if key == "normalize":
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return tuple(float(v) for v in value)
        if key in ("lr", "weight_decay", "momentum", "gamma", "min_lr", "focal_gamma", "focal_alpha", "cache_gb",
                   "save_every"):
            return float(value)
        if key in ("max_per_label", "workers", "shuffle_buffer", "stage", "step_size", "warmup", "epochs",
                   "batch_size", "early_stop", "seed"):
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if key in ("flip", "channels_last", "compile"):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if key in ("mix", "select_on", "label_map", "root", "cache", "decode", "format", "model", "init", "imagenet_weights", "task", "loss",
                   "optimizer", "scheduler", "augment", "precision", "device", "out", "resume"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: bad value {value!r} for {key!r}") from None
    return value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a .toml or .yaml/.yml file (a flat table; a [train] table is also accepted)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text()) or {}
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path}: expected a .toml, .yaml or .json file")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line naming the file
        raise ConfigError(f"config file {path}: cannot parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of options")
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return data


def resolve_config(config_file: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults <- config file <- overrides (the CLI flags that were given, i.e. not None)."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config_file(config_file))
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    where = f"config file {config_file}" if config_file is not None else "options"
    cfg = TrainConfig.from_dict(values, where=where)
    if not cfg.shards:
        raise ConfigError("no shard set: pass --shards NAME_OR_PATH (or set shards in the config file)")
    if not cfg.out:
        raise ConfigError("no run folder: pass --out runs/RUN (or set out in the config file)")
    return cfg


# Fields that may change between a run and its --resume: they do not change the arithmetic.
RESUMABLE_CHANGES = frozenset({"epochs", "early_stop", "workers", "device", "out", "resume", "compile",
                               "root", "shards", "quiet", "log_every", "cache", "cache_gb",
                               "save_every"})
