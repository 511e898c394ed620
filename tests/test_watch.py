"""Watching a run: plain progress lines off a terminal, TensorBoard events read back, curves.png."""
from __future__ import annotations

import io

import numpy as np
import torch

from trainer.watch import BatchReport, Progress, TensorBoard, format_duration, plot_training_curves


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_every_log_every_seconds_with_rate_wait_loss_and_eta():
    out, clock = io.StringIO(), Clock()
    progress = Progress(epochs=3, log_every=30, stream=out, terminal=False, clock=clock)
    progress.start_epoch(1, batches=10)       # the second of three epochs
    for batch, t in ((1, 10.0), (2, 20.0), (4, 31.0), (5, 40.0), (8, 64.0)):
        clock.now = t
        progress.update(BatchReport(batch=batch, batches=10, samples=32 * batch, seconds=t, wait_seconds=t / 10,
                                    losses=[(batch, 0.5 + batch / 100, 1e-3)]))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2                    # at 31 s and 64 s (>= 30 s after the previous line), not at 10/20/40
    assert lines[0].startswith("epoch 2/3 batch 4/10 (40%): ")
    assert "4.1 samples/s" in lines[0]        # 128 samples in 31 s
    assert "data wait 10.0%" in lines[0]
    assert "loss 0.5233" in lines[0]          # mean of 0.51, 0.52, 0.54
    # 31 s for 4 batches: 6 left in the epoch (46.5 s), then one more epoch of 10 (77.5 s)
    assert "ETA epoch 46s, run 2m04s" in lines[0]
    assert lines[1].startswith("epoch 2/3 batch 8/10 (80%)")
    progress.end_epoch(BatchReport(batch=10, batches=10, samples=320, seconds=80.0, wait_seconds=8.0, losses=[]))
    assert out.getvalue().splitlines()[-1].startswith("epoch 2/3 batch 10/10 (100%)")


def test_quiet_prints_nothing():
    out, clock = io.StringIO(), Clock()
    progress = Progress(epochs=1, quiet=True, log_every=0, stream=out, terminal=False, clock=clock)
    progress.start_epoch(0, batches=2)
    clock.now = 100.0
    progress.update(BatchReport(1, 2, 8, 100.0, 1.0, [(0, 0.3, 0.1)]))
    progress.end_epoch(BatchReport(2, 2, 16, 120.0, 1.0, []))
    assert out.getvalue() == ""


def test_durations():
    assert [format_duration(s) for s in (5, 65, 3700, float("nan"))] == ["5s", "1m05s", "1h01m", "?"]


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoard(tmp_path)
    tb.steps([(0, 0.9, 0.1), (1, 0.8, 0.2), (2, 0.7, 0.3)])
    tb.inputs(torch.zeros(4, 1, 8, 8), 1)
    tb.inputs(torch.ones(4, 1, 8, 8), 2)      # once per run: ignored
    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0]], dtype=np.float32)
    p = np.array([[0.9, 0.2], [0.1, 0.5], [0.8, 0.7], [0.3, 0.1]], dtype=np.float32)
    tb.epoch(1, train_loss=0.8, val_loss=0.7, macro=0.75, micro=0.8, per_label={"A": 1.0, "B": 0.5},
             samples_per_s=10.0, wait_fraction=0.01, pr=(y, p, ["A", "B"]))
    tb.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("train/loss_step")] == [1, 2, 3]
    assert [round(e.value, 4) for e in events.Scalars("train/lr")] == [0.1, 0.2, 0.3]
    for tag in ("train/loss", "val/loss", "val/auroc_macro", "val/auroc_micro", "val/auroc/A", "val/auroc/B",
                "speed/samples_per_s", "speed/data_wait"):
        assert tag in scalars and [e.step for e in events.Scalars(tag)] == [1], tag
    assert events.Scalars("val/auroc/B")[0].value == 0.5
    images = events.Images("train/inputs")
    assert len(images) == 1 and images[0].step == 1
    assert set(events.Tags()["tensors"]) >= {"val/pr/A", "val/pr/B"}


def test_tensorboard_disabled_on_other_ranks_writes_nothing(tmp_path):
    tb = TensorBoard(tmp_path, enabled=False)
    tb.steps([(0, 1.0, 0.1)])
    tb.close()
    assert not (tmp_path / "tb").exists()


def test_curves_png(tmp_path):
    rows = [{"epoch": str(e), "train_loss": str(1 / e), "val_loss": str(1.2 / e), "val_auroc_macro": str(a),
             "val_auroc_micro": str(a)} for e, a in ((1, 0.6), (2, 0.8), (3, 0.7))]
    path = plot_training_curves(rows, tmp_path / "curves.png")
    import cv2

    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] > img.shape[0] > 100
