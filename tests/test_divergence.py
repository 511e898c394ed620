"""The training-loss check (trainer.loop's DivergenceError) stops a run at the step whose loss was not finite:
no later step, no validation, no checkpoint of that epoch. The validation guard (trainer.fitting) is a second
line that this check must never leave the work to."""
from __future__ import annotations

import pytest
import torch

from tests.shardset_fixture import make_shard_set
from trainer import fitting, loop
from trainer.config import TrainConfig
from trainer.fitting import fit
from trainer.loop import DivergenceError

BAD_STEP = 3   # of 5 (40 train samples, batches of 8)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    return make_shard_set(tmp_path_factory.mktemp("div-shards"), "fx-32", size=32,
                          counts={"train": 40, "valid": 13, "test": 4})


def nan_at_call(n: int, calls: list[int], monkeypatch) -> None:
    """The run's loss function returns NaN on its n-th call (1-based); every call is appended to `calls`."""
    real = fitting.make_loss

    def make(*args, **kwargs):
        loss = real(*args, **kwargs)

        def wrapped(logits, y):
            calls.append(len(calls) + 1)
            value = loss(logits, y)
            return value * float("nan") if len(calls) == n else value
        return wrapped

    monkeypatch.setattr(fitting, "make_loss", make)


@pytest.mark.parametrize("flush_every", [1, loop.FLUSH_EVERY])
def test_a_non_finite_training_loss_stops_the_run_at_its_step(shard_set, tmp_path, monkeypatch, flush_every):
    """Losses are read back every FLUSH_EVERY steps: at 1 the run ends at the bad step itself; at the default
    it ends at the next read-back (here the epoch's end), naming the bad step, before any validation."""
    torch.set_num_threads(1)
    monkeypatch.setattr(loop, "FLUSH_EVERY", flush_every)
    calls: list[int] = []
    nan_at_call(BAD_STEP, calls, monkeypatch)
    run = tmp_path / "run"
    cfg = TrainConfig(shards=str(shard_set), out=str(run), model="resnet18", epochs=2, batch_size=8, workers=0,
                      lr=1e-3, device="cpu", quiet=True)
    with pytest.raises(DivergenceError) as err:
        fit(cfg)
    stopped_in = [entry.name for entry in err.traceback]
    assert "train_one_epoch" in stopped_in, f"stopped by another guard, not the training-loss check: {stopped_in}"
    steps_taken = BAD_STEP if flush_every == 1 else 5
    assert len(calls) == steps_taken, f"the loss was computed {len(calls)} times: the run went on past step {BAD_STEP}"
    assert f"the training loss is nan at epoch 1, step {BAD_STEP}, learning rate" in str(err.value)
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists()
