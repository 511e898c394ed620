"""One writer per folder: `folder_lock(folder, what)` holds `FOLDER/.cxr.lock` while a build or a run writes.

Rules:
- The lock is a kernel lock (`fcntl.flock`, exclusive, non-blocking) on `FOLDER/.cxr.lock`. A second
  process that finds it held fails at once with `FolderLockedError` naming the holder (pid, host, start
  time, command, read from the file's JSON) and what to do; it touches nothing in the folder.
- A holder that dies, even by kill -9, loses the kernel lock with its last file descriptor: its file is
  then stale and the next process simply takes it (no pid guessing, no pid reuse, no age limit to tune;
  on NFS v4 the server drops a dead client's lock when its lease expires). Two processes taking over the
  same stale file cannot both win: flock on one open file admits one holder.
- The holder writes its JSON into the file after it holds the lock, and removes the file on every way out
  (return, exception, KeyboardInterrupt). Removing while holding races with a process that opened the old
  file: so a new holder checks that the path still names the file it locked, else it starts over.
- A file system without flock (some network mounts): the holder's JSON decides instead; it is stale when
  its pid is gone on this host, or, written from another host, older than STALE_AFTER (24 h).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from manifests.errors import CxrError

LOCK_NAME = ".cxr.lock"
STALE_AFTER = 24 * 3600  # without kernel locks: a lock from another host older than this is stale (seconds)
_READ_TRIES = 20          # a holder that has just locked writes its JSON within microseconds


class FolderLockedError(CxrError):
    """Another live process holds the folder."""


def folder_lock(folder: str | os.PathLike, what: str = "shard build", hint: str = "") -> contextlib.AbstractContextManager:
    """Hold `folder` (created if missing) for the `with` block; FolderLockedError when another process does.

    `what` names the job in the message ("shard build", "training run"); `hint` says what to do instead
    (default: wait for it to finish).
    """
    return _held(Path(folder), what, hint)


def read_holder(folder: str | os.PathLike) -> dict | None:
    """The JSON of the current lock file of `folder` (pid, host, started, command), or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _held(folder: Path, what: str, hint: str) -> Iterator[Path]:
    if folder.exists() and not folder.is_dir():
        raise CxrError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path, what, hint)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()), "what": what,
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)     # while still holding: a waiter that opened it re-checks the path
        os.close(fd)            # releases the kernel lock


def _acquire(path: Path, what: str, hint: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderLockedError(_held_message(path, what, hint)) from None
            return _acquire_by_record(path, what, hint)   # no kernel locks on this file system
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)            # we locked a file its holder had just removed: start over


def _acquire_by_record(path: Path, what: str, hint: str) -> int:
    """Where the file system has no flock (some network mounts): the holder's JSON decides. It is stale when
    its pid is gone on this host, or, from another host, when the file is older than STALE_AFTER seconds.
    Best effort: two processes taking over the same stale file at the same instant are not told apart."""
    holder = read_holder(path.parent)
    if holder and _alive(holder, path):
        raise FolderLockedError(_held_message(path, what, hint))
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _alive(holder: dict, path: Path) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder.get("pid", 0)), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError, OverflowError):
            return True
        return int(holder.get("pid", 0)) > 0
    try:
        return time.time() - path.stat().st_mtime < STALE_AFTER
    except OSError:
        return False


def _held_message(path: Path, what: str, hint: str) -> str:
    holder = None
    for _ in range(_READ_TRIES):
        holder = read_holder(path.parent)
        if holder:
            break
        time.sleep(0.005)
    todo = hint or "wait for it to finish"
    if not holder:
        return f"{path.parent} is in use by another {what} (lock {path}); {todo}"
    return (f"{path.parent} is in use by another {holder.get('what', what)}: pid {holder.get('pid')} on host "
            f"{holder.get('host')} since {holder.get('started')} ({holder.get('command')}); {todo}")
