"""Shard sets at a URL (http(s)://, s3://, gs://, any fsspec protocol): read in place, pushed, pulled.

The rules:
- Every file goes through fsspec (`url_to_fs`, `fs.open`), so each protocol takes the same path here; the
  one exception is how a streamed block's body arrives (below).
- A URL names a shard-set folder. Its card (dataset.json) is read first, then manifest.parquet, checked
  against the card's manifest_sha256. Both land in a local *mirror* folder (CACHE/sets/CARD_SHA when a
  cache is given, else a temporary folder removed when the process exits) with remote.json naming the URL;
  the reader treats the mirror as a local set and asks `remote_tars(mirror)` how to open each tar.
- File names in a remote card are plain names in the set's folder (letters, digits, `._-`, no `..`, no
  `/`, no `%`): anything else is refused before anything is downloaded.
- Tars are read front to back in 64 MiB blocks held in a local buffer: one ranged GET per 64 MiB of tar
  (one per tar up to that size), never one per sample. Over http(s) and s3 a block's body is streamed into
  its buffer as it arrives and a read waits only for the bytes it needs (fsspec has no streamed ranged
  read: `_STREAMED` is the one branch per protocol; others fill a block with one `_cat_file`). The next
  block's GET is queued to go out when the current body is complete (read-ahead, at most two blocks held).
  A tar's size is the card's `bytes` for it (no request; cards written before that field cost one HEAD per
  tar). An answer that says the file has another size (Content-Range, Content-Length) is a RemoteError
  naming the URL, as is a body that runs past the size (the last block asks for one byte more); a body that
  stops early is asked for again from where it stopped, then reported. Never a silent misread.
- With a cache (`--cache DIR` or $CXR_CACHE) a tar is downloaded whole to a temporary name, checked against
  the card's sha256 and only then renamed to CACHE/tars/SHA256.tar; the least recently used tars leave
  once the cache passes its size limit. A partial or corrupt download never enters.
- Every network read is retried with exponential backoff (`RetryPolicy`); then a one-line CxrError names
  the URL. HDF5 is read from local disk only (`cxr shard pull` first).
- `push_shards` uploads a verified set with the card last (a reader never sees half a set); a missing bucket
  (gcsfs makes none) or a denied upload is a one-line RemoteError. `pull_shards` downloads one (card last,
  so an interrupted pull looks unfinished) and runs `verify_shards` on it.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from cxrshards.card import CARD_NAME, MANIFEST_NAME, REJECTS_NAME
from manifests.atomic import atomic_path, write_bytes_atomic
from manifests.errors import CxrError

REMOTE_NAME = "remote.json"                  # in a mirror folder: where its tars live
CACHE_ENV = "CXR_CACHE"
DEFAULT_CACHE_GB = 100.0
READ_BLOCK = 64 << 20                        # a remote tar is read in blocks of this size, one ranged GET each
_COPY_CHUNK = 8 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
T = TypeVar("T")


class RemoteError(CxrError):
    """A remote shard set could not be read or written: names the URL and what went wrong."""


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    tries: int = 5                 # attempts of one network call in all
    backoff_s: float = 0.5         # wait before the 2nd attempt; doubles each time (0.5, 1, 2, 4 s)


RETRY = RetryPolicy()


def is_url(text: str | os.PathLike) -> bool:
    """True for `scheme://...` with a scheme other than file/local (those are plain paths)."""
    import fsspec.core

    text = os.fspath(text)
    if "://" not in text:
        return False
    return fsspec.core.split_protocol(text)[0] not in (None, "file", "local")


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def check_name(name: str, where: str) -> str:
    """`name` if it is a plain file name inside the set's folder, else RemoteError."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise RemoteError(f"{where}: file name {name!r} is not a plain name inside the shard set's folder; "
                          f"refusing to read it")
    return name


_NOT_RETRIED = (CxrError, FileNotFoundError, PermissionError, IsADirectoryError)   # not network trouble


def with_retries(url: str, action: Callable[[], T], retry: RetryPolicy | None = None) -> T:
    """`action()`, retried with backoff on network errors; a missing file or a CxrError is not retried."""
    retry = retry or RETRY
    for attempt in range(retry.tries):
        try:
            return action()
        except _NOT_RETRIED:
            raise
        except Exception as exc:  # noqa: BLE001 - aiohttp, botocore and OSError all signal network trouble
            if attempt + 1 == retry.tries:
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                raise RemoteError(f"{url}: {type(exc).__name__}: {reason} (gave up after {retry.tries} tries)") \
                    from None
            time.sleep(retry.backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=None)
def _filesystem(pid: int, protocol: str):
    """One filesystem per process and protocol, never fsspec's shared instance: a DataLoader worker forked
    from this process drops fsspec's cached instances, and finalizing one there breaks this process's
    pooled connections. This cache keeps a reference in the child too, so nothing is finalized there."""
    import fsspec

    return fsspec.filesystem(protocol, skip_instance_cache=True)


def _fs(url: str):
    """(filesystem, path) for `url`."""
    import fsspec.core

    protocol = fsspec.core.split_protocol(url)[0] or "file"
    try:
        fs = _filesystem(os.getpid(), protocol)
    except ImportError as exc:
        raise RemoteError(f"{url}: this protocol needs an extra package ({exc}); e.g. pip install 'cxr[s3]' "
                          f"or 'cxr[gcs]'") from None
    except ValueError as exc:
        raise RemoteError(f"{url}: not a URL fsspec can open ({exc})") from None
    return fs, fs._strip_protocol(url)


def fetch_bytes(url: str, retry: RetryPolicy | None = None) -> bytes:
    fs, path = _fs(url)
    try:
        return with_retries(url, lambda: fs.cat_file(path), retry)
    except FileNotFoundError:
        raise RemoteError(f"{url}: not found") from None
    except PermissionError as exc:
        raise RemoteError(f"{url}: access denied ({exc}); check the credentials "
                          f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)") from None


# --------------------------------------------------------------------------------------------------
# Reading in place: the mirror folder and its tars


def card_files(card: dict, where: str) -> dict[str, str]:
    """{file name: sha256} of the card's shard files, every name checked."""
    out = {}
    for entry in card.get("files", []):
        out[check_name(str(entry.get("file")), where)] = str(entry.get("sha256"))
    return out


def card_sizes(card: dict, where: str) -> dict[str, int]:
    """{file name: size in bytes} of the card's shard files that give one (`bytes`; older cards have none)."""
    out = {}
    for entry in card.get("files", []):
        if "bytes" in entry:
            size = entry["bytes"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise RemoteError(f"{where}: file {entry.get('file')!r} has bytes {size!r}, not a size in bytes; "
                                  f"the card is damaged")
            out[check_name(str(entry.get("file")), where)] = size
    return out


def read_remote_card(url: str, retry: RetryPolicy | None = None) -> tuple[bytes, dict]:
    card_url = join(url, CARD_NAME)
    try:
        raw = fetch_bytes(card_url, retry)
    except RemoteError as exc:
        if str(exc).endswith(": not found"):
            raise RemoteError(f"{url} is not a shard set: it has no {CARD_NAME} (an unfinished push?)") from None
        raise
    try:
        card = json.loads(raw)
    except ValueError as exc:
        raise RemoteError(f"{card_url}: unreadable card ({exc})") from None
    if not isinstance(card, dict):
        raise RemoteError(f"{card_url}: the card is not a JSON object")
    card_files(card, card_url)
    card_sizes(card, card_url)
    return raw, card


@functools.lru_cache(maxsize=None)
def _temp_mirrors(pid: int) -> Path:
    """This process's folder of mirrors when no cache is given; removed when the process exits."""
    path = Path(tempfile.mkdtemp(prefix="cxr-remote-"))
    atexit.register(lambda: os.getpid() == pid and shutil.rmtree(path, ignore_errors=True))
    return path


def mirror(url: str, cache: str | os.PathLike | None = None, cache_gb: float | None = None,
           retry: RetryPolicy | None = None) -> Path:
    """The local mirror folder of the shard set at `url` (card, manifest.parquet, remote.json)."""
    url = url.rstrip("/")
    raw, card = read_remote_card(url, retry)
    cache = cache if cache is not None else (os.environ.get(CACHE_ENV) or None)
    base = Path(cache).expanduser() / "sets" if cache else _temp_mirrors(os.getpid())
    folder = base / hashlib.sha256(raw).hexdigest()[:24]
    remote = {"url": url, "cache": str(Path(cache).expanduser().resolve()) if cache else None,
              "cache_gb": float(cache_gb if cache_gb is not None else DEFAULT_CACHE_GB)}
    card_path = folder / CARD_NAME
    if not (card_path.is_file() and card_path.read_bytes() == raw):
        manifest_url = join(url, MANIFEST_NAME)
        data = fetch_bytes(manifest_url, retry)
        sha = hashlib.sha256(data).hexdigest()
        if sha != card.get("manifest_sha256"):
            raise RemoteError(f"{manifest_url}: sha256 {sha[:12]}... does not match the card's manifest_sha256 "
                              f"({str(card.get('manifest_sha256'))[:12]}...); the set changed while read or is "
                              f"damaged")
        write_bytes_atomic(folder / MANIFEST_NAME, data)
        write_bytes_atomic(folder / REMOTE_NAME, (json.dumps(remote, indent=2) + "\n").encode())
        write_bytes_atomic(card_path, raw)        # last: a mirror with its card is complete
    elif json.loads((folder / REMOTE_NAME).read_text()) != remote:
        write_bytes_atomic(folder / REMOTE_NAME, (json.dumps(remote, indent=2) + "\n").encode())
    return folder


class RemoteTars:
    """How the reader opens the tars of a mirror: in place over the network, or through the cache.

    Picklable (DataLoader workers get a copy); filesystems are made in the process that reads.
    """

    def __init__(self, url: str, files: dict[str, str], cache: str | None, cache_gb: float,
                 retry: RetryPolicy | None = None, sizes: dict[str, int] | None = None):
        self.url, self.files, self.retry = url, files, retry
        self.sizes = dict(sizes or {})            # from the card; a tar without one is sized by a HEAD
        self.cache = TarCache(Path(cache), cache_gb) if cache else None

    def has(self, name: str) -> bool:
        return name in self.files

    def where(self, name: str) -> str:
        return join(self.url, name)

    def open(self, name: str):
        """A readable, seekable binary file of tar `name` (front-to-back reads are cheapest)."""
        url = join(self.url, check_name(name, self.url))
        if self.cache is not None:
            return open(self.cache.get_or_fetch(url, self.files[name], self.retry), "rb", buffering=1 << 20)
        return RemoteFile(url, self.retry, size=self.sizes.get(name))


def remote_tars(shard_dir: Path, retry: RetryPolicy | None = None) -> RemoteTars | None:
    """The `RemoteTars` of a mirror folder; None for a local shard set."""
    path = Path(shard_dir) / REMOTE_NAME
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    card = json.loads((Path(shard_dir) / CARD_NAME).read_text())
    return RemoteTars(info["url"], card_files(card, info["url"]), info.get("cache"),
                      float(info.get("cache_gb", DEFAULT_CACHE_GB)), retry, card_sizes(card, info["url"]))


class _Body:
    """The answer to one ranged GET: whether it is a 206, the file's complete length if the answer says it
    (Content-Range `bytes A-B/TOTAL`), the body's length if it says that (Content-Length), and the body as an
    async iterator of chunks."""

    def __init__(self, partial: bool, total: int | None, length: int | None, chunks):
        self.partial, self.total, self.length, self.chunks = partial, total, length, chunks


def _complete_length(content_range: str | None) -> int | None:
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", (content_range or "").strip())
    return int(match.group(1)) if match else None


@contextlib.asynccontextmanager
async def _http_range(fs, path: str, start: int, end: int):
    """GET bytes [start, end) with fsspec's own HTTP session and settings (its `_cat_file`, body unread)."""
    kw = fs.kwargs.copy()
    headers = {**kw.pop("headers", {}), "Range": f"bytes={start}-{end - 1}"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(path), headers=headers, **kw) as r:
        fs._raise_not_found_for_status(r, path)
        yield _Body(r.status == 206, _complete_length(r.headers.get("Content-Range")), r.content_length,
                    r.content.iter_any())


@contextlib.asynccontextmanager
async def _s3_range(fs, path: str, start: int, end: int):
    """GetObject of bytes [start, end) through s3fs's client (its `_cat_file`, body unread)."""
    bucket, key, version = fs.split_path(path)
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                             **({"VersionId": version} if version else {}))
    body = resp["Body"]
    try:
        yield _Body(True, _complete_length(resp.get("ContentRange")), resp.get("ContentLength"),
                    body.iter_chunks(1 << 20))
    finally:
        body.close()


# fsspec's API has no streamed ranged read (cat_file returns a range only once its last byte is in), so the
# two protocols the tests serve for real get a body that arrives chunk by chunk; any other protocol (gcsfs,
# ...) fills each block with one `_cat_file`, or `cat_file` on a synchronous filesystem.
_STREAMED = {"http": _http_range, "https": _http_range, "s3": _s3_range, "s3a": _s3_range}


class _Block:
    """Bytes [start, start + size) of a remote file, arriving in `view` on fsspec's event loop.

    `got` bytes have arrived (they never change after); `done` says the fill has ended and `error` why it
    ended early (None: the body just stopped). The loop thread writes these, the reader waits on `arrived`,
    which the loop sets once `got` reaches the reader's `need`, and when the fill ends."""

    def __init__(self, start: int, size: int, ask: int):
        self.start, self.size, self.ask = start, size, ask    # ask: size, or size + 1 for the last block
        self.view = memoryview(b"")
        self.got, self.done, self.error = 0, True, None
        self.judged = False                                   # the reader has seen this fill end short
        self.need = ask + 1                                   # nobody waits yet
        self.arrived = threading.Event()
        self.future: concurrent.futures.Future | None = None

    def take(self, chunk) -> None:
        """Append an arrived chunk (the loop thread)."""
        n = len(chunk)
        if self.got + n > self.size:
            raise _Overrun(self.got + n)
        if n == self.size:                                    # the whole block at once (`_cat_file`): kept
            self.view = memoryview(chunk)
        else:
            if len(self.view) < self.size:                    # a buffer for the whole block
                self.view = memoryview(np.empty(self.size, np.uint8))
            self.view[self.got:self.got + n] = chunk
        self.got += n
        if self.got >= self.need:
            self.arrived.set()

    def wait(self, need: int) -> None:
        """Until `need` bytes have arrived or the fill has ended (the reader's thread)."""
        self.need = need
        self.arrived.clear()
        if self.got < need and not self.done:
            self.arrived.wait()

    def cancel(self) -> None:
        if self.future is not None:
            self.future.cancel()                              # stops the download on the event loop


class _Overrun(Exception):
    """More bytes than a block's range arrived: `got` of them."""

    def __init__(self, got: int):
        self.got = got


class RemoteFile:
    """A remote file read front to back in blocks of `block` bytes, one ranged GET each, held in a local buffer.

    Streaming: over http(s) and s3 a block's body lands in its buffer chunk by chunk as it arrives (fsspec's
    loop thread copies it in), and a read waits only for the bytes it asks for, so the reader parses the
    front of a tar while the server still sends the rest. Other protocols fill a block with one `_cat_file`.
    Reads inside the part of a block that has arrived are slices of its buffer (`read_view`: no copy).

    Read-ahead: on an async filesystem the next block's GET is queued as the reader moves into a block and
    goes out when the current block's body is complete (one transfer at a time; at most two blocks held); if
    that body ended short, it waits until the reader gets there.

    `size` is the file's size in bytes (the card's); without it the size is asked first (one HEAD or its
    protocol's equivalent). A GET whose answer says the file has another size (Content-Range), or whose body
    runs past its range (the last block asks for one byte past the size), is a RemoteError naming the URL. A
    body that stops early is asked for again from where it stopped, with backoff; then a RemoteError."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, block: int | None = None,
                 size: int | None = None):
        self.url, self.retry, self.block = url, retry, int(block or READ_BLOCK)
        self._fs, self._path = _fs(url)
        self._async = bool(getattr(self._fs, "async_impl", False))
        protocols = self._fs.protocol if isinstance(self._fs.protocol, (tuple, list)) else (self._fs.protocol,)
        self._ranged = next((_STREAMED[p] for p in protocols if p in _STREAMED), None) if self._async else None
        self._size_from = "the card gives for it" if size is not None else "its size said"
        if size is None:
            try:
                size = with_retries(self.url, lambda: self._fs.size(self._path), self.retry)
            except FileNotFoundError:
                raise RemoteError(f"{self.url}: not found (listed in the card but missing)") from None
        self._size, self._pos = int(size), 0
        self._cur = self._start(0)            # the first GET goes out now
        self._next: _Block | None = None

    # --- filling blocks

    def _start(self, pos: int, after: _Block | None = None) -> _Block:
        """A block from `pos`, its fill begun (queued behind `after`'s on an async filesystem)."""
        size = min(self.block, self._size - pos)
        block = _Block(pos, size, size + (pos + size == self._size))
        if size > 0:
            self._fill(block, after)
        return block

    def _fill(self, block: _Block, after: _Block | None = None) -> None:
        """(Re)start fetching what `block` lacks: on fsspec's loop (async filesystems), else here and now."""
        block.done, block.error, block.judged = False, None, False
        if self._async:
            block.future = asyncio.run_coroutine_threadsafe(self._fetch(block, after), self._fs.loop)
            return
        try:
            self._take(block, self._fs.cat_file(self._path, start=block.start + block.got, end=block.start + block.ask))
        except Exception as exc:  # noqa: BLE001 - judged by the reader's retries, like a failed GET
            block.error = exc
        block.done = True

    async def _fetch(self, block: _Block, after: _Block | None) -> None:
        try:
            if after is not None and after.future is not None:
                await asyncio.wait([asyncio.wrap_future(after.future)])   # one transfer at a time
                if after.got < after.size:      # the block before ended short: no GET until the reader gets here
                    block.judged = True
                    return
            start, end = block.start + block.got, block.start + block.ask
            if self._ranged is None:
                self._take(block, await self._fs._cat_file(self._path, start=start, end=end))
                return
            async with self._ranged(self._fs, self._path, start, end) as body:
                self._check(body, block, start)
                async for chunk in body.chunks:
                    self._take(block, chunk)
        except Exception as exc:  # noqa: BLE001 - judged by the reader's retries, like a failed GET
            block.error = exc
        finally:
            block.done = True
            block.arrived.set()

    def _check(self, body: _Body, block: _Block, start: int) -> None:
        """Refuse an answer that says the file has another size than the card's, before its body arrives."""
        if not body.partial and start > 0:
            raise RemoteError(f"{self.url}: the server answered a range request with the whole file; it must "
                              f"answer range requests")
        has = body.total
        if has is None and body.length is not None:
            if not body.partial:                   # a 200 from byte 0: the body is the whole file
                has = body.length
            elif start + body.length < block.start + block.ask:
                has = start + body.length          # the body stops before the end asked for: the file ends there
        if has is not None and has != self._size:
            if has > self._size:
                raise self._longer()
            raise RemoteError(f"{self.url}: shorter than the {self._size:,} bytes {self._size_from} (the server "
                              f"has {has:,}); the file changed after the card was written, or the set is damaged")
        if body.length is not None and start + body.length > block.start + block.size:
            raise self._overrun(block, start - block.start + body.length)

    def _take(self, block: _Block, chunk) -> None:
        try:
            block.take(chunk)
        except _Overrun as over:
            raise self._overrun(block, over.got) from None

    def _overrun(self, block: _Block, got: int) -> RemoteError:
        """`got` bytes for the block's range: a file longer than its size, or a server ignoring ranges."""
        if block.start + block.size == self._size:
            return self._longer()
        return RemoteError(f"{self.url}: the server sent {got:,} bytes for a range of {block.size:,}; it must "
                           f"answer range requests")

    def _longer(self) -> RemoteError:
        return RemoteError(f"{self.url}: longer than the {self._size:,} bytes {self._size_from}; the file "
                           f"changed after the card was written, or the set is damaged")

    def _wait(self, block: _Block, need: int) -> None:
        """Until `need` bytes of `block` have arrived. A fill that ended short is asked again from where it
        stopped (`with_retries`: backoff, then a RemoteError naming the URL)."""
        def attempt() -> None:
            if block.judged:                  # the fill ended short last time: ask for the rest again
                self._fill(block)
            block.wait(need)
            if block.got < need:
                block.judged = True
                if isinstance(block.error, _NOT_RETRIED):
                    raise block.error
                why = (f"a download cut short, or a file shorter than the {self._size:,} bytes {self._size_from}"
                       if block.error is None else f"{type(block.error).__name__}: {block.error}")
                raise OSError(f"got {block.got:,} of the {block.size:,} bytes asked for at byte {block.start:,} "
                              f"({why})")
        if block.got < need:
            try:
                with_retries(self.url, attempt, self.retry)
            except FileNotFoundError:
                raise RemoteError(f"{self.url}: not found (listed in the card but missing)") from None

    # --- the file interface

    def _block_at(self, pos: int) -> _Block:
        """The block holding `pos`: the current one, the read-ahead (which becomes current), or a new one."""
        for block in (self._cur, self._next):
            if block is not None and block.start <= pos < block.start + block.size:
                break
        else:
            self._drop()
            block = self._start(pos)
        if block is not self._cur:
            self._cur.cancel()
            self._cur, self._next = block, None
        if self._next is None and self._async and block.start + block.size < self._size:
            self._next = self._start(block.start + block.size, after=block)
        return block

    def read_view(self, n: int = -1) -> memoryview | bytes:
        """The next `n` bytes (all the rest for n < 0), as a view into the block's buffer when they lie in one."""
        block, at = self._cur, self._pos - self._cur.start
        if 0 <= n and 0 <= at and at + n <= block.got:        # already arrived: the common case
            self._pos += n
            return block.view[at:at + n]
        end = self._size if n < 0 else min(self._pos + n, self._size)
        pieces = []
        while self._pos < end:
            block = self._block_at(self._pos)
            at = self._pos - block.start
            take = min(end, block.start + block.size) - self._pos
            self._wait(block, at + take)
            pieces.append(block.view[at:at + take])
            self._pos += take
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)   # b"" at the end

    def read(self, n: int = -1) -> bytes:
        return bytes(self.read_view(n))

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("RemoteFile seeks from the start only")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = int(pos)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _drop(self) -> None:
        for block in (self._cur, self._next):
            if block is not None:
                block.cancel()
        self._next = None

    def close(self) -> None:
        self._drop()
        self._cur = _Block(self._size, 0, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# The tar cache


class TarCache:
    """CACHE/tars/SHA256.tar, each checked before it enters; least recently used out past `max_gb`."""

    def __init__(self, root: Path, max_gb: float):
        self.root, self.max_bytes = Path(root), int(max_gb * 2**30)
        self.tars = self.root / "tars"

    def path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise RemoteError(f"{self.root}: {sha256!r} is not a sha256; the card is damaged")
        return self.tars / f"{sha256}.tar"

    def get_or_fetch(self, url: str, sha256: str, retry: RetryPolicy | None = None) -> Path:
        path = self.path(sha256)
        try:
            os.utime(path)               # recently used
            return path
        except FileNotFoundError:
            pass
        download(url, path, sha256, retry)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used tars until the cache holds at most its limit; returns those removed."""
        entries = []
        for p in self.tars.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:    # another process evicted it
                continue
            entries.append((st.st_mtime_ns, p.name, p, st.st_size))
        total = sum(e[3] for e in entries)
        removed = []
        for _, _, p, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            total -= size
            removed.append(p)
        return removed


def download(url: str, dest: Path, sha256: str | None, retry: RetryPolicy | None = None) -> Path:
    """Copy `url` to `dest` through a temporary name; checked against `sha256` (if given) before the rename."""
    fs, path = _fs(url)

    def attempt():
        with atomic_path(dest) as tmp:
            digest = hashlib.sha256()
            with fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead") as src, open(tmp, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if sha256 is not None and got != sha256:
                raise RemoteError(f"{url}: downloaded sha256 {got[:12]}... does not match the card's "
                                  f"{sha256[:12]}...; not kept")
    try:
        with_retries(url, attempt, retry)
    except FileNotFoundError:
        raise RemoteError(f"{url}: not found (listed in the card but missing)") from None
    return dest


# --------------------------------------------------------------------------------------------------
# Publishing and fetching whole sets


def push_shards(shard_dir: str | os.PathLike, url: str, retry: RetryPolicy | None = None,
                log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Verify the local set, upload its files to `url`, the card last; returns the names uploaded."""
    from cxrshards.verify import verify_shards

    shard_dir = Path(shard_dir)
    report = verify_shards(shard_dir)
    if not report.ok:
        raise RemoteError(f"{shard_dir}: not pushed, `cxr shard verify` finds {len(report.problems)} problem(s), "
                          f"e.g. {report.problems[0]}")
    card = json.loads((shard_dir / CARD_NAME).read_text())
    names = [*card_files(card, str(shard_dir / CARD_NAME)), MANIFEST_NAME, REJECTS_NAME]
    names += [n for n in ("build.json",) if (shard_dir / n).is_file()]
    url = os.fspath(url).rstrip("/")
    fs, base = _fs(url)
    with_retries(url, lambda: fs.makedirs(base, exist_ok=True), retry)
    for name in [*names, CARD_NAME]:       # the card last
        target = join(url, name)
        _, path = _fs(target)
        log(f"push {name}")
        try:
            with_retries(target, lambda: fs.put_file(str(shard_dir / name), path), retry)
        except FileNotFoundError as exc:     # e.g. gcsfs: a bucket that does not exist (makedirs cannot make one)
            raise RemoteError(f"{target}: not uploaded, its folder or bucket does not exist "
                              f"({' '.join(str(exc).split())}); create the bucket first") from None
        except PermissionError as exc:
            raise RemoteError(f"{target}: not uploaded, access denied ({' '.join(str(exc).split())}); "
                              f"check the credentials") from None
    return [*names, CARD_NAME]


def pull_shards(url: str, dest: str | os.PathLike, retry: RetryPolicy | None = None,
                log: Callable[[str], None] = lambda _m: None):
    """Download the set at `url` into `dest` (files already there with the right sha256 are kept), the card
    last, then `verify_shards(dest)`; returns its report. RemoteError on any problem."""
    from cxrshards.verify import verify_shards
    from cxrshards.writers import sha256_file

    url = url.rstrip("/")
    raw, card = read_remote_card(url, retry)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {**card_files(card, join(url, CARD_NAME)), MANIFEST_NAME: card.get("manifest_sha256"),
              REJECTS_NAME: None}
    for name, sha in wanted.items():
        target = dest / name
        if sha is not None and target.is_file() and sha256_file(target) == sha:
            continue
        log(f"pull {name}")
        download(join(url, name), target, sha, retry)
    write_bytes_atomic(dest / CARD_NAME, raw)     # last: the set is complete
    report = verify_shards(dest)
    if not report.ok:
        raise RemoteError(f"{dest}: pulled from {url}, but `cxr shard verify` finds {len(report.problems)} "
                          f"problem(s), e.g. {report.problems[0]}")
    return report
