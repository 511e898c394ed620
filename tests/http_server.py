"""TEST FIXTURE: a real HTTP server over a folder, bound to 127.0.0.1, for remote shard-set tests and the bench.

Serves GET (with single `Range: bytes=A-B` requests, as fsspec's HTTP files send them) and HEAD, counts the
GETs and the HEADs per path, records each GET's Range header (`ranges`), and can be told to misbehave:
- `fail_next[path] = n` answers the next n GETs of that path with 500;
- `drop_after[path] = n` sends the headers and only n bytes of the next GET's body, then closes the
  connection (a list: one such GET per entry);
- `hold_after[path] = (n, event)` sends n bytes of the next GET's body, then waits until the event is set
  or 10 s pass (`holding` is True from that GET's start until then);
- `say_total = False` answers ranges with `Content-Range: bytes A-B/*` (not saying the file's size);
- `ignore_ranges = True` answers every GET with 200 and the whole file.

A client that goes away mid-body (a reader that stops early, a test that closes its file) is normal: the
`BrokenPipeError` or `ConnectionResetError` that the next write meets ends that request quietly
(`FolderServer.handle_error`, counted in `disconnects`); any other error in a handler still prints its traceback.

A body goes out in writes of up to `WRITE_CHUNK` (4 MiB). Measured on a 15 MiB range (bench/read_bench.py's
raw tar, reader pinned to one core): 1 MiB writes cost this server ~40% more CPU per range and the reader
~10% of its rate; `socket.sendfile` saved the server its copies but sent in smaller pieces, so the reader
woke more often and read ~15% slower.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
WRITE_CHUNK = 4 << 20
CLIENT_GONE = (BrokenPipeError, ConnectionResetError)   # a client that disconnected: not a server error


class FolderServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.gets: collections.Counter[str] = collections.Counter()
        self.heads: collections.Counter[str] = collections.Counter()
        self.fail_next: dict[str, int] = {}
        self.drop_after: dict[str, int | list[int]] = {}
        self.hold_after: dict[str, tuple[int, threading.Event]] = {}
        self.ranges: list[tuple[str, str]] = []
        self.holding = False
        self.say_total = True
        self.ignore_ranges = False
        self.disconnects = 0          # requests ended by a client that went away (CLIENT_GONE)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def tar_gets(self) -> int:
        return _tar_requests(self.gets)

    def tar_heads(self) -> int:
        return _tar_requests(self.heads)

    def handle_error(self, request, client_address) -> None:
        """An expected disconnect (CLIENT_GONE) ends its request silently; anything else is printed as usual."""
        if isinstance(sys.exc_info()[1], CLIENT_GONE):
            with self.lock:
                self.disconnects += 1
            return
        super().handle_error(request, client_address)


def _tar_requests(counts: collections.Counter[str]) -> int:
    return sum(n for path, n in counts.items() if path.endswith(".tar"))


class _Handler(BaseHTTPRequestHandler):
    server: FolderServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _file(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        path = (self.server.folder / rel).resolve()
        if self.server.folder not in path.parents or not path.is_file():
            return None
        return path

    def do_HEAD(self) -> None:
        with self.server.lock:
            self.server.heads[self.path.split("?", 1)[0]] += 1
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        rel = self.path.split("?", 1)[0]
        with self.server.lock:
            self.server.gets[rel] += 1
            failing = self.server.fail_next.get(rel, 0)
            if failing:
                self.server.fail_next[rel] = failing - 1
            self.server.ranges.append((rel, self.headers.get("Range", "")))
            drop = self.server.drop_after.pop(rel, None)
            if isinstance(drop, list):
                drop, rest = (drop[0], drop[1:]) if drop else (None, [])
                if rest:
                    self.server.drop_after[rel] = rest
            hold = self.server.hold_after.pop(rel, None)
        if failing:
            self.send_error(500, "injected failure")
            return
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        match = _RANGE.match("" if self.server.ignore_ranges else self.headers.get("Range", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(0, size - int(match.group(2)))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size if self.server.say_total else '*'}")
        else:
            self.send_response(200)
        length = max(0, end - start + 1)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        with open(path, "rb") as fh:
            fh.seek(start)
            left = length if drop is None else min(length, drop)
            sent = 0
            self.server.holding = self.server.holding or hold is not None   # from the start of a held body
            while left > 0:
                step = min(left, WRITE_CHUNK) if hold is None or sent >= hold[0] else min(left, hold[0] - sent)
                chunk = fh.read(step)
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
                sent += len(chunk)
                if hold is not None and sent == hold[0]:
                    hold[1].wait(10)
                    self.server.holding = False
        if drop is not None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)


@contextlib.contextmanager
def serve_folder(folder: str | os.PathLike) -> Iterator[FolderServer]:
    """Serve `folder` on 127.0.0.1 (a free port) for the duration of the block."""
    server = FolderServer(Path(folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
