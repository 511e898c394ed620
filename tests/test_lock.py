"""One writer per folder: a second build or training run into a held folder fails at once naming the
holder; the first finishes unharmed; a lock left by a killed process does not block the next run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manifests.lock import LOCK_NAME, FolderLockedError, folder_lock, read_holder
from tests.test_shard_resume import cli_build, comparable, copies_tree
from tests.test_shard_support import REPO

HOLD = ("import sys, time\nfrom manifests.lock import folder_lock\n"
        "with folder_lock(sys.argv[1], 'shard build'):\n    print('held', flush=True)\n    time.sleep(600)\n")


def wait_for_holder(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        holder = read_holder(folder)
        if holder and holder["pid"] == proc.pid:
            return holder
        assert proc.poll() is None, "the process ended before it held the folder"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_second_holder_in_one_process_is_refused_and_the_lock_is_gone_after(tmp_path):
    with folder_lock(tmp_path / "set", "shard build"):
        holder = read_holder(tmp_path / "set")
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()} on host {socket.gethostname()} since 20"):
            with folder_lock(tmp_path / "set", "shard build"):
                pass
        assert read_holder(tmp_path / "set")["pid"] == os.getpid()   # the refused one left it alone
    assert not (tmp_path / "set" / LOCK_NAME).exists()
    with pytest.raises(KeyboardInterrupt):
        with folder_lock(tmp_path / "set"):
            raise KeyboardInterrupt
    assert not (tmp_path / "set" / LOCK_NAME).exists()


def test_lock_of_a_kill_9_process_is_taken_over(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    folder = tmp_path / "set"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=env, stdout=subprocess.PIPE)
    try:
        wait_for_holder(folder, proc)
        with pytest.raises(FolderLockedError, match=f"pid {proc.pid} "):
            with folder_lock(folder):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_holder(folder)["pid"] == proc.pid          # the dead holder's file is still there
    with folder_lock(folder):
        assert read_holder(folder)["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()


def test_two_builds_into_one_folder_second_refused_first_unharmed(tmp_path, phantom_kermany):
    raw = copies_tree(phantom_kermany, tmp_path / "raw", copies=4)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    reference = subprocess.run(cli_build(raw, tmp_path / "ref", "--workers", "1"), env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "out"
    first = subprocess.Popen(cli_build(raw, out, "--workers", "1"), env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "set" / ".progress" / "options.json").exists():   # mid-build: it holds the folder
        assert first.poll() is None and time.monotonic() < deadline, "the first build ended too soon"
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)   # keep it mid-build, whatever this machine's speed
    try:
        holder = read_holder(out / "set") or {}
        second = subprocess.run(cli_build(raw, out, "--workers", "1"), env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert second.returncode == 1
    message = second.stderr.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error:"), message
    assert f"pid {first.pid} on host {socket.gethostname()} since {holder['started']}" in message
    assert "another --name" in message
    assert comparable(out / "set") == comparable(tmp_path / "ref" / "set")
    assert not (out / "set" / LOCK_NAME).exists()


def test_train_into_a_folder_in_use_is_refused(tmp_path):
    from trainer.config import TrainConfig
    from trainer.fitting import fit

    run = tmp_path / "run"
    cfg = TrainConfig(shards=str(tmp_path / "no-such-set"), out=str(run), model="resnet18", epochs=1, batch_size=8,
                      workers=0, device="cpu")
    with folder_lock(run, "training run"):
        with pytest.raises(FolderLockedError, match=rf"in use by another training run: pid {os.getpid()} .*another --out"):
            fit(cfg)
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]   # nothing written by the refused run


def test_without_kernel_locks_the_record_decides(tmp_path, monkeypatch):
    import errno

    import manifests.lock as lock_module

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    folder = tmp_path / "set"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    here = socket.gethostname()
    cases = [({"pid": os.getpid(), "host": here}, 0, True),          # a live pid on this host
             ({"pid": dead_pid, "host": here}, 0, False),            # its pid is gone: stale
             ({"pid": 1, "host": "elsewhere"}, 0, True),             # another host, recent
             ({"pid": 1, "host": "elsewhere"}, 2 * 86400, False)]    # another host, two days old: stale
    for holder, age, refused in cases:
        lock = folder / LOCK_NAME
        lock.write_text(json.dumps({**holder, "started": "then", "what": "shard build", "command": "cxr"}))
        os.utime(lock, (time.time() - age, time.time() - age))
        if refused:
            with pytest.raises(FolderLockedError, match=f"pid {holder['pid']} on host {holder['host']}"):
                with folder_lock(folder):
                    pass
        else:
            with folder_lock(folder):
                assert read_holder(folder)["pid"] == os.getpid()
            assert not lock.exists()
