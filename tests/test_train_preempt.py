"""Training that survives preemption (issue 21): a signal stops a run after its current step with last.pt
holding its place in the epoch; `--resume` continues at the next batch and ends with the very weights of an
uninterrupted run (one set, two sets with --mix, the per-label cap, 2 workers, kill -9 after a mid-epoch
save, 2 ranks on gloo). The skip is in the plan: the stream's batches after `set_start(S)` are exactly the
uninterrupted epoch's batches after its first S, and the samples of the first S are never read."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import cxrshards
from cxrshards import mix
from cxrshards import reader as reader_module
from manifests.labelmap import load_label_map
from tests.shardset_fixture import make_shard_set
from trainer.config import TrainConfig
from trainer.fitting import fit

REPO = Path(__file__).resolve().parents[1]
SIGNAL_ENV, KILL_ENV, HASH_ENV = "CXR_TEST_SIGNAL_AT_STEP", "CXR_TEST_KILL_AT_STEP", "CXR_STATE_HASH_DIR"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preempt-shards")
    one = make_shard_set(root, "one-32", size=32, counts={"train": 40, "valid": 12, "test": 2}, shard_size=6)
    other = make_shard_set(root, "two-32", size=32, formats=("wds",), counts={"train": 21, "valid": 6, "test": 2},
                           labels=("Atelectasis", "Effusion"), shard_size=4)
    return {"one": one, "two": other}


def config(sets, out: Path, **changes) -> TrainConfig:
    """2 epochs of 5 batches of 8, tar shards through an 8-sample shuffle buffer, light augmentation."""
    base = dict(shards=(str(sets["one"]),), out=str(out), model="resnet18", epochs=2, batch_size=8, workers=0,
                lr=1e-3, device="cpu", format="wds", shuffle_buffer=8, scheduler="cosine", warmup=2,
                normalize=(0.5, 0.25), save_every=0.0)
    base.update(changes)
    return TrainConfig(**base)


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def metrics_epochs(run: Path) -> list[int]:
    return [int(row["epoch"]) for row in metrics_rows(run)]


def assert_same_metrics(a: Path, b: Path) -> None:
    """Each epoch once, with the uninterrupted run's train loss and sample count (the epoch's totals carry
    over the stop) and validation."""
    cols = ("epoch", "train_loss", "train_samples", "val_loss", "val_auroc_macro", "lr")
    assert [[r[c] for c in cols] for r in metrics_rows(a)] == [[r[c] for c in cols] for r in metrics_rows(b)]


def tensorboard_steps(run: Path, tag: str = "train/loss_step") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def cli():
    import cli.app as cli_app

    cli_app._register()
    runner = CliRunner()
    return lambda *args: runner.invoke(cli_app.app, ["train", *args])


def stopped_then_resumed(cfg: TrainConfig, at_step: int, monkeypatch, capsys) -> tuple[str, list[str]]:
    """Run `cfg` until SIGTERM after global step `at_step`, then `--resume` it; (stop line, log of the resume)."""
    from trainer.preempt import Stop

    monkeypatch.setenv(SIGNAL_ENV, str(at_step))
    with pytest.raises(Stop) as stop:
        fit(cfg)
    assert stop.value.status == 128 + signal.SIGTERM == 143
    monkeypatch.delenv(SIGNAL_ENV)
    log: list[str] = []
    fit(cfg.replace(resume="last"), log=log.append)
    return stop.value.line, log


# --------------------------------------------------------------------------- the plan's skip

def _batches(stream, workers: int) -> list[list[str]]:
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [list(keys) for _x, _y, keys in loader]


@pytest.mark.parametrize("workers", [0, 3])
def test_set_start_gives_the_rest_of_the_epoch_and_reads_none_of_the_rest(sets, workers, monkeypatch):
    """One set (tar shards through a shuffle buffer; hdf5) and two sets mixed 2,1: after set_start(S) the
    loader yields exactly batches S.. of the uninterrupted epoch (every S without workers, some S with), and
    no sample of a batch before S is read from its tar (seen in this process: without workers)."""
    ms = mix.resolve_sets([sets["one"], sets["two"]], None, load_label_map())
    one = lambda fmt: cxrshards.open_shards(sets["one"], "train", format=fmt, batch_size=4, epoch=1,  # noqa: E731
                                            shuffle_buffer=6, rank=0, world_size=1)
    streams = {"one-32/": one("wds"), "hdf5/": one("hdf5"),
               "": mix.open_mix(ms, "train", mix.run_labels(ms).shared, mix="2,1", format="wds", batch_size=4,
                                epoch=1, shuffle_buffer=5, rank=0, world_size=1)}
    real = reader_module.ShardStream._wds_records
    read: set[str] = set()

    def recording(self, rows):
        read.update(f"{self.shard_dir.name}/{k.decode()}" for k in self._keys[rows].tolist())
        return real(self, rows)

    monkeypatch.setattr(reader_module.ShardStream, "_wds_records", recording)
    for prefix, stream in streams.items():
        full = _batches(stream, workers)
        assert len(full) == len(stream) and len({k for b in full for k in b}) == sum(map(len, full))
        for start in range(len(full) + 1) if not workers else (1, 3, 7):
            stream.set_start(start)
            read.clear()
            assert _batches(stream, workers) == full[start:], (prefix, workers, start)
            assert not read & {prefix + k for b in full[:start] for k in b}, (prefix, workers, start)
        stream.set_start(0)


# --------------------------------------------------------------------------- stop and resume

@pytest.fixture(scope="module")
def straight(sets, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs, one per option set the tests stop and resume."""
    root = tmp_path_factory.mktemp("straight")
    torch.set_num_threads(1)
    return {"one": fit(config(sets, root / "one")),
            "mix": fit(config(sets, root / "mix", shards=(str(sets["one"]), str(sets["two"])), mix="2,1",
                              format="auto", epochs=1)),
            "cap": fit(config(sets, root / "cap", max_per_label=6, epochs=1)),
            "workers": fit(config(sets, root / "workers", workers=2, epochs=1))}


def test_sigterm_mid_epoch_one_set_resumes_to_the_same_weights(sets, straight, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    line, log = stopped_then_resumed(config(sets, run), 7, monkeypatch, capsys)
    assert line == f"stopped at epoch 2 step 2/5 by SIGTERM; continue with: cxr train --out {run} --resume"
    assert f"resuming {run} at epoch 2 step 2/5" in log
    assert_same_weights(straight["one"], run)
    assert metrics_epochs(run) == [1, 2]
    assert_same_metrics(straight["one"], run)
    assert tensorboard_steps(run) == list(range(1, 11))


def test_sigterm_two_sets_mixed_resumes_to_the_same_weights(sets, straight, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = config(sets, run, shards=(str(sets["one"]), str(sets["two"])), mix="2,1", format="auto", epochs=1)
    line, log = stopped_then_resumed(cfg, 3, monkeypatch, capsys)
    assert line.startswith("stopped at epoch 1 step 3/")
    assert any(m.startswith(f"resuming {run} at epoch 1 step 3/") for m in log)
    assert_same_weights(straight["mix"], run)
    assert metrics_epochs(run) == [1]
    assert_same_metrics(straight["mix"], run)


def test_sigterm_with_the_per_label_cap_resumes_to_the_same_weights(sets, straight, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    line, log = stopped_then_resumed(config(sets, run, max_per_label=6, epochs=1), 2, monkeypatch, capsys)
    assert line.startswith("stopped at epoch 1 step 2/")
    assert any(m.startswith(f"resuming {run} at epoch 1 step 2/") for m in log)
    assert_same_weights(straight["cap"], run)
    assert metrics_epochs(run) == [1]
    assert_same_metrics(straight["cap"], run)


def test_sigterm_with_two_workers_resumes_to_the_same_weights(sets, straight, tmp_path, monkeypatch, capsys):
    """5 batches over 2 workers (3 + 2): stopped after 3, the resumed loader's first worker is the second."""
    run = tmp_path / "run"
    line, log = stopped_then_resumed(config(sets, run, workers=2, epochs=1), 3, monkeypatch, capsys)
    assert line == f"stopped at epoch 1 step 3/5 by SIGTERM; continue with: cxr train --out {run} --resume"
    assert f"resuming {run} at epoch 1 step 3/5" in log
    assert_same_weights(straight["workers"], run)
    assert metrics_epochs(run) == [1]
    assert_same_metrics(straight["workers"], run)


def test_kill_9_after_a_mid_epoch_save_resumes_to_the_same_weights(sets, straight, tmp_path, cli):
    """--save-every tiny: last.pt after every step; SIGKILL after step 3 (before its save) loses that step.
    `cxr train --out RUN --resume` alone continues with the run's own options."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "cli", "train", "--shards", str(sets["one"]), "--out", str(run), "--model",
            "resnet18", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--lr", "1e-3", "--device", "cpu",
            "--format", "wds", "--shuffle-buffer", "8", "--scheduler", "cosine", "--warmup", "2",
            "--normalize", "0.5,0.25", "--quiet", "--save-every", "1e-9"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{KILL_ENV: "3"})
    killed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["batches_done"], state["step"]) == (0, 2, 2)
    resumed = cli("--out", str(run), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming {run} at epoch 1 step 2/5" in resumed.output
    assert_same_weights(straight["one"], run)
    assert metrics_epochs(run) == [1, 2]
    assert_same_metrics(straight["one"], run)


def test_tensorboard_of_a_resumed_run_has_no_step_twice(tmp_path):
    """A run killed after logging past its checkpoint: the resumed writer purges from its first step on."""
    from trainer.watch import TensorBoard

    board = TensorBoard(tmp_path)
    board.steps([(s, float(s), 0.1) for s in range(6)])        # steps 1..6 logged, checkpoint after step 4
    board.close()
    board = TensorBoard(tmp_path, purge_step=5)
    board.steps([(s, 10.0 + s, 0.1) for s in range(4, 8)])     # steps 5..8 again
    board.close()
    assert tensorboard_steps(tmp_path) == list(range(1, 9))


def test_two_rank_gloo_run_stopped_by_sigterm_resumes_to_the_same_weights(sets, tmp_path):
    """Rank 0 alone gets SIGTERM after step 3; both ranks stop there (their parameters at the stop agree),
    and the resumed run's weights (both ranks) are those of an uninterrupted 2-rank run."""
    def torchrun(out: Path, hashes: Path, *extra: str, **env_extra: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{HASH_ENV: str(hashes)}, **env_extra)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cli",
               "train", "--out", str(out), *extra]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    options = ["--shards", str(sets["one"]), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device",
               "cpu", "--lr", "1e-3", "--format", "wds", "--shuffle-buffer", "4", "--normalize", "0.5,0.25",
               "--quiet"]
    whole = torchrun(tmp_path / "whole", tmp_path / "h-whole", *options)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = torchrun(tmp_path / "run", tmp_path / "h-stopped", *options, **{SIGNAL_ENV: "3"})
    assert stopped.returncode != 0
    assert f"stopped at epoch 1 step 3/5 by SIGTERM; continue with: cxr train --out {tmp_path / 'run'} --resume" \
        in stopped.stdout, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["batches_done"] == 3
    at_stop = [(tmp_path / "h-stopped" / f"rank{rank}.stop.sha256").read_text() for rank in (0, 1)]
    assert at_stop[0] == at_stop[1]                          # the same parameters: the same step
    resumed = torchrun(tmp_path / "run", tmp_path / "h-resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'run'} at epoch 1 step 3/5" in resumed.stdout
    want = (tmp_path / "h-whole" / "rank0.sha256").read_text()
    assert (tmp_path / "h-whole" / "rank1.sha256").read_text() == want
    for rank in (0, 1):
        assert (tmp_path / "h-resumed" / f"rank{rank}.sha256").read_text() == want
    assert metrics_epochs(tmp_path / "run") == [1]


# --------------------------------------------------------------------------- the one-line answers

def test_resume_with_nothing_to_resume_or_a_finished_run_says_so_in_one_line(sets, straight, tmp_path, cli):
    empty = cli("--out", str(tmp_path / "never"), "--resume")
    assert empty.exit_code == 1
    assert [ln for ln in empty.output.splitlines() if ln.strip()] == [
        f"error: nothing to resume in {tmp_path / 'never'}: no checkpoint at {tmp_path / 'never' / 'last.pt'}; "
        f"start the run without --resume"]
    done = cli("--out", str(straight["workers"]), "--resume")
    assert done.exit_code == 0, done.output
    assert [ln for ln in done.output.splitlines() if ln.strip()] == [
        f"{straight['workers']} already finished: 1 of 1 epochs done, nothing to resume "
        f"(pass a larger --epochs to train on)"]


def test_a_signal_waits_for_the_step_and_a_second_one_ends_the_process_at_once():
    script = ("import os, signal, sys\n"
              "from trainer.preempt import Preemption\n"
              "with Preemption(0) as p:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print(p.poll(1), flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    print('still here', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == f"(True, {int(signal.SIGTERM)})\n" and done.returncode == -signal.SIGTERM, done
