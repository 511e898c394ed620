"""The build's worker processes: how they start, and starting them early. Imports nothing heavy, so the CLI
can start the workers' server before it imports pandas and reads the manifest.

- Start method: forkserver (spawn where there is none), never plain fork: a parent that already ran OpenCV,
  pyarrow or Dask threads can leave a forked child deadlocked on a lock copied mid-use (seen with OpenCV's
  thread pool). The server imports the main module, `cxrshards.tasks` and `cxrshards.pixels` (numpy,
  OpenCV, libspng, libdeflate) once,
  so each worker then starts in milliseconds.
- `start_worker_server()` starts that server without waiting for it: its imports run in its own process
  while the caller goes on (imports, manifest, plan); the pool made later forks ready workers.
"""
from __future__ import annotations

import multiprocessing

PRELOAD = ["__main__", "cxrshards.tasks", "cxrshards.pixels"]


def mp_context():
    """The multiprocessing context of the build's worker pool (see the module docstring)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        return context
    return multiprocessing.get_context("spawn")


def start_worker_server() -> None:
    """Start the forkserver of `mp_context()` now (no-op under spawn, or when it already runs)."""
    if mp_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
