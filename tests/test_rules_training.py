"""Rules of a training run that a user only notices in wrong numbers: the focal loss a run trains with
honours `--focal-gamma` / the config file, and each fine-tuning stage trains exactly its named modules.

Each test checks the code that runs (a real `cxr train`, the real stage functions) against a reference
computed here from first principles (the fixture's known pixels and labels, the stage table of the
DESIGN/`trainer.models` docstring written out by hand).
"""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.shardset_fixture import LABELS, expected_pixels, label_row, make_key, make_shard_set
from trainer.models import apply_stage, build_model, set_train_mode

SIZE = 16
COUNTS = {"train": 24, "valid": 12, "test": 4}
MEAN, STD = 0.5, 0.25             # the fixture card's pixel_mean / pixel_std


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return make_shard_set(tmp_path_factory.mktemp("rules-train"), "fx-16", counts=COUNTS, size=SIZE)


def _split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised model input and labels of a whole split, from the fixture's own pixels (not the reader)."""
    keys = [make_key(split, i) for i in range(COUNTS[split])]
    pixels = np.stack([expected_pixels(k, SIZE, "png") for k in keys])[:, None]
    x = (torch.from_numpy(pixels).double() / 255.0 - MEAN) / STD
    return x.float(), torch.from_numpy(np.stack([label_row(k) for k in keys]))


def focal_reference(logits: torch.Tensor, labels: torch.Tensor, gamma: float, alpha: float | None) -> float:
    """Mean over labelled entries of alpha_t * (1 - p_t)^gamma * -log(p_t), in float64, written out."""
    z, y = logits.double(), labels.double()
    p = torch.sigmoid(z)
    p_t = torch.where(y == 1, p, 1 - p)
    per = (1 - p_t).pow(gamma) * -torch.log(p_t)
    if alpha is not None:
        per = torch.where(y == 1, alpha, 1 - alpha) * per
    mask = ~torch.isnan(y)
    return float(per[mask].mean())


def _cli():
    from cli.app import _register, app

    _register()
    return app


def _metrics(run) -> dict[str, str]:
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1
    return rows[0]


def _check_run_loss(run, gamma: float, alpha: float | None) -> None:
    """train_loss and val_loss of a one-epoch run equal the focal loss with (gamma, alpha), and differ from
    the loss with the default gamma and from plain BCE (gamma 0), so a dropped value cannot pass."""
    row = _metrics(run)
    # The epoch is one batch (24 train samples, --batch-size 32): its loss is computed before the only
    # optimizer step, on the initial weights in train mode (BatchNorm on batch statistics).
    model = build_model("resnet18", len(LABELS), seed=0).train()
    x, y = _split("train")
    with torch.no_grad():
        logits = model(x)
    want = focal_reference(logits, y, gamma, alpha)
    for other in (2.0, 0.0):
        if other != gamma:
            assert abs(focal_reference(logits, y, other, alpha) - want) > 1e-2 * want   # the test can tell them apart
    assert float(row["train_loss"]) == pytest.approx(want, rel=1e-4)
    # val_loss: the saved weights after that step, eval mode, on the whole valid split.
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.eval()
    xv, yv = _split("valid")
    with torch.no_grad():
        val = focal_reference(model(xv), yv, gamma, alpha)
    assert float(row["val_loss"]) == pytest.approx(val, rel=1e-4)


TRAIN_FLAGS = ["--loss", "focal", "--epochs", "1", "--batch-size", "32", "--workers", "0", "--device", "cpu",
               "--augment", "none", "--no-flip", "--seed", "0"]


def test_focal_gamma_flag_reaches_the_loss_the_run_trains_with(shard_dir, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(_cli(), ["train", "--shards", str(shard_dir), "--out", str(run), *TRAIN_FLAGS,
                                         "--focal-gamma", "3.5"])
    assert result.exit_code == 0, result.output
    _check_run_loss(run, gamma=3.5, alpha=None)


def test_focal_gamma_and_alpha_from_the_config_file_reach_the_loss(shard_dir, tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "focal.toml"
    config.write_text("focal_gamma = 0.5\nfocal-alpha = 0.25\n")
    result = CliRunner().invoke(_cli(), ["train", "--shards", str(shard_dir), "--out", str(run), *TRAIN_FLAGS,
                                         "--config", str(config)])
    assert result.exit_code == 0, result.output
    _check_run_loss(run, gamma=0.5, alpha=0.25)


# --------------------------------------------------------------------------- stages

# What each --stage trains, written out from the contract (trainer/models.py docstring), not imported.
TRAINED = {
    ("resnet18", 1): ("layer2", "layer3", "layer4", "fc"),
    ("resnet18", 2): ("layer3", "layer4", "fc"),
    ("resnet18", 3): ("layer4", "fc"),
    ("resnet18", 4): ("fc",),
    ("densenet121", 1): ("features.transition1", "features.denseblock2", "features.transition2",
                         "features.denseblock3", "features.transition3", "features.denseblock4", "features.norm5",
                         "classifier"),
    ("densenet121", 2): ("features.transition2", "features.denseblock3", "features.transition3",
                         "features.denseblock4", "features.norm5", "classifier"),
    ("densenet121", 3): ("features.transition3", "features.denseblock4", "features.norm5", "classifier"),
    ("densenet121", 4): ("classifier",),
}


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("name, stage", sorted(TRAINED))
def test_stage_trains_exactly_its_modules_batchnorm_statistics_included(name, stage):
    prefixes = TRAINED[(name, stage)]
    model = build_model(name, 3, seed=0)
    trained = apply_stage(model, name, stage)
    expect = [n for n, _ in model.named_parameters() if _inside(n, prefixes)]
    assert trained == expect and 0 < len(expect) < len(list(model.parameters()))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expect

    # One real training step the way the trainer takes it: train mode for the stage, optimizer over
    # the parameters left trainable.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    set_train_mode(model, name, stage)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 64, 64, generator=gen)
    target = torch.randint(0, 2, (4, 3), generator=gen).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), target)
    loss.backward()
    optimizer.step()

    after = model.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    inside = {k for k in after if _inside(k, prefixes)}
    frozen_changed = sorted(changed - inside)
    assert not frozen_changed, f"stage {stage} changed frozen {frozen_changed[:3]}"
    # Every tensor of a trained module moves: weights by the step, BatchNorm statistics by the forward.
    assert changed == inside, f"stage {stage} left trained {sorted(inside - changed)[:3]} unchanged"
    stats = {k for k in inside if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert bool(stats) == (stage != 4)                  # the head (stage 4) has no BatchNorm
    assert not math.isnan(loss.item())
