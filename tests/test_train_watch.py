"""A run you can watch: TensorBoard events read back, progress lines off a terminal, curves.png, and a
diverging run stopped with a one-line error that keeps the last good checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from manifests.errors import CxrError
from tests.test_train_fit import shard_set, small  # noqa: F401 - the session shard set fixture
from trainer import fitting
from trainer.checkpoint import load_checkpoint
from trainer.fitting import fit


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_tensorboard_events_and_curves_of_a_real_run(shard_set, tmp_path, capsys):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    fit(small(shard_set, run, epochs=2, log_every=1e-9))     # 40 train samples, batch 8: 5 steps an epoch
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_step")] == list(range(1, 11))
    assert len(events.Scalars("train/lr")) == 10
    epoch_tags = ["train/loss", "val/loss", "val/auroc_macro", "val/auroc_micro", "speed/samples_per_s",
                  "speed/data_wait", "val/auroc/Atelectasis", "val/auroc/Cardiomegaly", "val/auroc/No Finding"]
    for tag in epoch_tags:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    rows = fitting._read_metrics(run / "metrics.csv", 2)
    for e, row in zip(events.Scalars("val/auroc_macro"), rows):
        assert math.isclose(e.value, float(row["val_auroc_macro"]), rel_tol=1e-5)
    images = events.Images("train/inputs")
    assert len(images) == 1 and images[0].step == 0
    assert {"val/pr/Atelectasis", "val/pr/Cardiomegaly", "val/pr/No Finding"} <= set(events.Tags()["tensors"])
    assert (run / "curves.png").stat().st_size > 1000
    # not a terminal: a plain progress line per batch (log_every ~ 0) and one at each epoch's end
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert lines[0].startswith("epoch 1/2 batch 1/5 (20%): ") and "samples/s" in lines[0] and "ETA" in lines[0]
    assert sum(line.startswith("epoch 2/2 batch 5/5 (100%)") for line in lines) >= 1


def test_quiet_run_prints_no_progress(shard_set, tmp_path, capsys):  # noqa: F811
    fit(small(shard_set, tmp_path / "q", epochs=1, quiet=True, log_every=1e-9))
    assert "batch" not in capsys.readouterr().err


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_epoch(shard_set, tmp_path, monkeypatch):  # noqa: F811
    real = fitting.make_loss
    calls = {"n": 0}

    def failing_in_epoch_two(*args, **kwargs):
        loss = real(*args, **kwargs)

        def wrapped(logits, y):
            calls["n"] += 1
            value = loss(logits, y)
            return value * float("nan") if calls["n"] == 9 else value   # 5 steps + 1 validation, then step 3 of epoch 2
        return wrapped

    monkeypatch.setattr(fitting, "make_loss", failing_in_epoch_two)
    run = tmp_path / "div"
    with pytest.raises(CxrError) as err:
        fit(small(shard_set, run, epochs=3))
    message = str(err.value)
    assert "\n" not in message
    assert "training loss is nan at epoch 2, step 8, learning rate 0.001" in message   # global step 8 and "Lower --lr" in message
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 1
    assert len(fitting._read_metrics(run / "metrics.csv", 9)) == 1
    assert not (run / ".cxr.lock").exists()


def test_sgd_at_lr_1000_is_said_not_crashed_on(shard_set, tmp_path):  # noqa: F811
    from cli.app import _register, app

    _register()
    result = CliRunner().invoke(app, ["train", "--shards", str(shard_set), "--out", str(tmp_path / "r"),
                                      "--optimizer", "sgd", "--lr", "1000", "--epochs", "2", "--batch-size", "8",
                                      "--workers", "0", "--device", "cpu", "--quiet"])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "learning rate 1e+03" in error[0] and "Lower --lr" in error[0], result.output
    assert "Traceback" not in result.output and "ValueError" not in result.output
