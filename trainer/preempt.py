"""Stopping a run on a signal, and saving it inside an epoch, so that `--resume` continues at the next batch.

The rules:
- SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 only set a flag (the first signal is the one reported; a second
  one gets the signal's default action at once, e.g. Ctrl-C twice, or a rank hung in a collective): the step
  in progress finishes, last.pt is written with its place in the epoch, one line is printed
  (`stop_line`), and the run ends with exit status 128 + the signal's number (the shell's convention for a
  process ended by that signal: SIGTERM 143, SIGINT 130, SIGUSR1 138 on Linux).
- `--save-every MINUTES` (0: off) writes last.pt inside an epoch when that long has passed since the last
  save, so a kill -9 loses at most that much work.
- `Preemption.poll` runs after every step and before every epoch. Under torchrun every rank makes the
  same decision at the same step: (signal, save due) is max-reduced over the ranks every poll, on a gloo
  group (CPU tensors: no device sync), and rank 0's clock alone says when a save is due.
- DataLoader workers are forked after the handlers are set, so a signal sent to the whole process group
  only sets their own (unused) flag: they keep feeding the step in progress.
- Test hooks (environment, rank 0 only; not for users): CXR_TEST_SIGNAL_AT_STEP=N sends the process SIGTERM
  after global step N (steps counted from 1); CXR_TEST_KILL_AT_STEP=N sends it SIGKILL there, before any
  save at that step.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
SIGNAL_AT_STEP_ENV = "CXR_TEST_SIGNAL_AT_STEP"
KILL_AT_STEP_ENV = "CXR_TEST_KILL_AT_STEP"


class Stop(Exception):
    """The run ends early on purpose (raised by `trainer.fit`, which has logged `line`): exit with `status`."""

    def __init__(self, line: str, status: int) -> None:
        super().__init__(line)
        self.line, self.status = line, status


def exit_status(signum: int) -> int:
    """128 + the signal's number."""
    return 128 + int(signum)


def stop_line(epoch: int, batches_done: int, batches: int, signum: int, run: str) -> str:
    """`epoch` 0-based (the line says epoch + 1, as the epoch lines do)."""
    return (f"stopped at epoch {epoch + 1} step {batches_done}/{batches} by {signal.Signals(signum).name}; "
            f"continue with: cxr train --out {run} --resume")


def resume_line(run: str, epoch: int, batches_done: int, batches: int) -> str:
    return f"resuming {run} at epoch {epoch + 1} step {batches_done}/{batches}"


def _hook(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


class Preemption:
    """Signal flag and save timer of one run; a context manager that sets the handlers and puts the old
    ones back. `poll(steps)` -> (save now, signal to stop on or 0), the same on every rank."""

    def __init__(self, save_every_minutes: float, *, is_main: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.save_every = float(save_every_minutes) * 60.0
        self.is_main, self.clock = is_main, clock
        self.signum = 0
        self.last_save = clock()
        self._old: dict[int, object] = {}
        self._group = None
        self._signal_at = _hook(SIGNAL_AT_STEP_ENV) if is_main else None
        self._kill_at = _hook(KILL_AT_STEP_ENV) if is_main else None

    def _on_signal(self, signum: int, _frame) -> None:
        if self.signum:   # a second signal: the default action now (e.g. Ctrl-C twice, or a rank hung in a collective)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def start(self) -> "Preemption":
        """Set the handlers (main thread only) and, under torchrun, the group the ranks agree on."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return self

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.close()

    def poll(self, steps: int | None = None) -> tuple[bool, int]:
        """After global step `steps` (None: between epochs): (write last.pt now, signal number or 0)."""
        if steps is not None and steps == self._kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if steps is not None and steps == self._signal_at:
            os.kill(os.getpid(), signal.SIGTERM)   # the handler runs before the next line
        due = self.is_main and self.save_every > 0 and self.clock() - self.last_save >= self.save_every
        signum, save = self.signum, int(due)
        if self._group is not None:
            import torch.distributed as dist

            agreed = torch.tensor([signum, save], dtype=torch.int64)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._group)
            signum, save = (int(v) for v in agreed.tolist())
        self.signum = signum
        return bool(save or signum), signum

    def saved(self) -> None:
        """last.pt was just written: the timer starts again."""
        self.last_save = self.clock()
