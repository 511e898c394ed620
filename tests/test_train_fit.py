"""Training runs on a tiny hand-written shard set (labels are noise: these tests check the mechanics:
resume, freezing, transfer, per-label cap, checkpoints, CLI errors, 2-rank DDP)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from manifests.sampling import cap_sample
from manifests.table import read_manifest
from tests.shardset_fixture import make_shard_set
from trainer import fitting
from trainer.config import TrainConfig
from trainer.fitting import fit, state_sha256
from trainer.models import build_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory) -> Path:
    """train 40 / valid 13 / test 4 samples, 32 px, labels Atelectasis, Cardiomegaly, No Finding."""
    root = tmp_path_factory.mktemp("train-shards")
    return make_shard_set(root, "fx-32", size=32, counts={"train": 40, "valid": 13, "test": 4})


def small(shard_set: Path, out: Path, **changes) -> TrainConfig:
    base = dict(shards=str(shard_set), out=str(out), model="resnet18", epochs=2, batch_size=8, workers=0,
                lr=1e-3, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def assert_same_state(a: dict, b: dict) -> None:
    for part in ("model", "optimizer", "scaler"):
        fa, fb = dict(flat(a[part])), dict(flat(b[part]))
        assert fa.keys() == fb.keys()
        for k in fa:
            if torch.is_tensor(fa[k]):
                assert torch.equal(fa[k], fb[k]), f"{part}{k}"
            else:
                assert fa[k] == fb[k], f"{part}{k}"
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])


# --------------------------------------------------------------------------- runs and resume

def test_run_folder_and_checkpoint_contents(shard_set, tmp_path):
    run = fit(small(shard_set, tmp_path / "run", epochs=1, loss="focal", workers=1))
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.csv", "last.pt", "best.pt", "cards"}
    cfg = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(cfg) == small(shard_set, tmp_path / "run", epochs=1, loss="focal", workers=1)
    ck = torch.load(run / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config", "labels", "task",
                "card_sha256", "best_metric", "version"):
        assert key in ck
    assert ck["labels"] == ["Atelectasis", "Cardiomegaly", "No Finding"] and ck["task"] == "multilabel"
    assert (ck["epoch"], ck["step"]) == (1, 5)
    (row,) = metrics(run)
    assert int(row["train_samples"]) == 40 and int(row["val_samples"]) == 13
    for col in ("train_loss", "val_loss", "val_auroc_macro", "val_auroc_micro", "lr", "samples_per_s",
                "data_wait_frac"):
        assert np.isfinite(float(row[col])), col
    assert (run / "cards" / f"{shard_set.name}.json").read_bytes() == (shard_set / "dataset.json").read_bytes()


def test_resume_is_bit_exact(shard_set, tmp_path):
    """2 epochs straight == 1 epoch, then --resume for the 2nd (augmentation and flip on)."""
    common = dict(scheduler="step", step_size=1, gamma=0.5, warmup=2, augment="light", flip=True)
    straight = fit(small(shard_set, tmp_path / "a", **common))
    fit(small(shard_set, tmp_path / "b", epochs=1, **common))
    resumed = fit(small(shard_set, tmp_path / "b", resume="last", **common))
    assert_same_state(torch.load(straight / "last.pt", weights_only=True),
                      torch.load(resumed / "last.pt", weights_only=True))
    assert [r["train_loss"] for r in metrics(straight)] == [r["train_loss"] for r in metrics(resumed)]


def test_resume_after_crash_is_bit_exact(shard_set, tmp_path):
    """A run killed after its first epoch (cosine schedule, per-label cap, worker process) resumes exactly."""
    common = dict(scheduler="cosine", warmup=3, max_per_label=10, workers=1)
    straight = fit(small(shard_set, tmp_path / "a", **common))

    class Crash(Exception):
        pass

    def crash_after_first_epoch(msg: str) -> None:
        if msg.startswith("epoch 1/"):
            raise Crash

    with pytest.raises(Crash):
        fit(small(shard_set, tmp_path / "b", **common), log=crash_after_first_epoch)
    resumed = fit(small(shard_set, tmp_path / "b", resume=str(tmp_path / "b" / "last.pt"), **common))
    assert_same_state(torch.load(straight / "last.pt", weights_only=True),
                      torch.load(resumed / "last.pt", weights_only=True))


# --------------------------------------------------------------------------- cap, stages, transfer

def test_per_label_cap_holds_each_epoch(shard_set, tmp_path, monkeypatch):
    seen: list[list[str]] = []
    real = fitting.train_one_epoch

    def recording(model, loader, *args, **kwargs):
        seen.append([k for _x, _y, keys in loader for k in keys])   # the epoch's exact samples
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(fitting, "train_one_epoch", recording)
    cap = 4
    run = fit(small(shard_set, tmp_path / "cap", epochs=2, max_per_label=cap, seed=3))
    table = read_manifest(shard_set / "manifest.parquet").table
    labels = ["Atelectasis", "Cardiomegaly", "No Finding"]
    for epoch, keys in enumerate(seen):
        assert len(keys) == len(set(keys))
        assert sorted(keys) == sorted(f"{shard_set.name}/{k}" for k in cap_sample(table, labels, cap, 3, epoch))
        # the seed's rule: each label (and the no-positive group) contributes at most `cap` rows
        assert len(keys) <= cap * (len(labels) + 1) < (table["split"] == "train").sum()
    assert seen[0] != seen[1]                                 # a fresh draw each epoch
    assert [int(r["train_samples"]) for r in metrics(run)] == [len(k) for k in seen]


def test_stage_trains_only_its_layers(shard_set, tmp_path):
    run = fit(small(shard_set, tmp_path / "s3", epochs=1, stage=3, seed=5))
    init = build_model("resnet18", 3, seed=5).state_dict()
    after = torch.load(run / "last.pt", weights_only=True)["model"]
    for name, tensor in after.items():
        trained = name.startswith(("layer4.", "fc."))
        if trained and not name.endswith("num_batches_tracked"):
            assert not torch.equal(tensor, init[name]) or "running" in name, name
        if not trained:
            assert torch.equal(tensor, init[name]), name    # weights AND BatchNorm statistics untouched


def test_transfer_loads_backbone_and_replaces_head(shard_set, tmp_path):
    """Seed transfer: multi-label 'NIH' run -> binary Cardiomegaly run with --init PATH (stage 4: head only)."""
    source = fit(small(shard_set, tmp_path / "nih", epochs=1, seed=1))
    src = torch.load(source / "best.pt", weights_only=True)["model"]
    run = fit(small(shard_set, tmp_path / "cardio", epochs=1, labels=("Cardiomegaly",), loss="ce", stage=4,
                    init=str(source / "best.pt"), seed=9))
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["task"] == "binary" and ck["labels"] == ["Cardiomegaly"] and ck["head"] == "softmax"
    assert ck["model"]["fc.weight"].shape == (2, 512)
    for name, tensor in ck["model"].items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, src[name]), name
    fresh = build_model("resnet18", 2, seed=9).state_dict()["fc.weight"]
    assert not torch.equal(ck["model"]["fc.weight"], fresh)   # the new head trained


def test_imagenet_init_uses_local_file(shard_set, tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    weights = tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    weights.parent.mkdir(parents=True)
    rgb = torchvision.models.resnet18()
    torch.save(rgb.state_dict(), weights)
    run = fit(small(shard_set, tmp_path / "im", epochs=1, init="imagenet", stage=4))
    ck = torch.load(run / "last.pt", weights_only=True)
    assert torch.equal(ck["model"]["conv1.weight"], rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(ck["model"]["layer2.0.conv1.weight"], rgb.layer2[0].conv1.weight)


# --------------------------------------------------------------------------- one-line errors

@pytest.fixture(scope="module")
def cli():
    import cli.app as cli_app

    cli_app._register()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_app.app, ["train", *args])

    return invoke


def assert_one_line_error(result, needle: str) -> None:
    text = result.output                                     # stdout and stderr together
    assert result.exit_code == 1, text
    assert "Traceback" not in text and needle in text, text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text


def test_cli_errors_are_one_line(shard_set, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    out = str(tmp_path / "r")
    s = str(shard_set)
    assert_one_line_error(cli("--shards", str(tmp_path / "nope"), "--out", out), "nope")
    assert_one_line_error(cli("--shards", s, "--out", out, "--model", "resnet999"), "resnet999")
    assert_one_line_error(cli("--shards", s, "--out", out, "--stage", "7"), "--stage 7")
    assert_one_line_error(cli("--shards", s, "--out", out, "--labels", "Mass"), "'Mass' is not a label")
    assert_one_line_error(cli("--shards", s, "--out", out, "--task", "binary"), "exactly one label")
    assert_one_line_error(cli("--shards", s, "--out", out, "--init", "imagenet"),
                          str(tmp_path / "empty-torch-home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"))
    assert_one_line_error(cli("--shards", s, "--out", out, "--init", str(tmp_path / "missing.pt")), "missing.pt")
    assert_one_line_error(cli("--shards", s, "--out", out, "--resume"), "no checkpoint")
    assert_one_line_error(cli("--shards", s, "--out", out, "--views", "AP"), "no train rows")
    assert_one_line_error(cli("--shards", s, "--config", str(tmp_path / "no.toml")), "no.toml")


def test_cli_refuses_resume_on_another_shard_set(shard_set, tmp_path, cli):
    run = tmp_path / "r"
    ok = cli("--shards", str(shard_set), "--out", str(run), "--epochs", "1", "--batch-size", "8", "--workers", "0",
             "--device", "cpu", "--no-flip")
    assert ok.exit_code == 0, ok.output
    assert json.loads((run / "config.json").read_text())["flip"] is False
    again = cli("--shards", str(shard_set), "--out", str(run), "--epochs", "1", "--device", "cpu")
    assert_one_line_error(again, "already holds a run")
    other = make_shard_set(tmp_path / "other", "fx-32", size=32, counts={"train": 40, "valid": 13, "test": 5})
    bad = cli("--shards", str(other), "--out", str(run), "--epochs", "2", "--batch-size", "8", "--workers", "0",
              "--device", "cpu", "--no-flip", "--resume")
    assert_one_line_error(bad, "another shard set")
    changed = cli("--shards", str(shard_set), "--out", str(run), "--epochs", "2", "--batch-size", "8",
                  "--workers", "0", "--device", "cpu", "--no-flip", "--lr", "0.1", "--resume")
    assert_one_line_error(changed, "changed option lr")


# --------------------------------------------------------------------------- 2 ranks on gloo

def test_two_rank_gloo_run_ends_with_identical_weights(shard_set, tmp_path):
    hashes = tmp_path / "hashes"
    env = dict(os.environ, CXR_STATE_HASH_DIR=str(hashes), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cli", "train", "--shards", str(shard_set), "--out", str(tmp_path / "ddp"), "--epochs", "1",
           "--batch-size", "4", "--workers", "0", "--device", "cpu", "--lr", "1e-3"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    h0, h1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert h0 == h1
    model = build_model("resnet18", 3)
    model.load_state_dict(torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"])
    assert state_sha256(model) + "\n" == h0                   # rank 0's checkpoint holds those weights
    (row,) = metrics(tmp_path / "ddp")
    assert int(row["val_samples"]) == 13                      # 7 + 6 rows gathered: the whole valid split
    assert int(row["train_samples"]) == 40
    assert not (tmp_path / "ddp" / ".last.pt.tmp").exists()
