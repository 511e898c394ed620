"""Shard sets at a URL (http(s)://, s3://, gs://, any fsspec protocol): read in place, pushed, pulled.

The rules:
- Every file goes through fsspec (`url_to_fs`, `fs.open`), so each protocol takes the same path here.
- A URL names a shard-set folder. Its card (dataset.json) is read first, then manifest.parquet, checked
  against the card's manifest_sha256. Both land in a local *mirror* folder (CACHE/sets/CARD_SHA when a
  cache is given, else a temporary folder removed when the process exits) with remote.json naming the URL;
  the reader treats the mirror as a local set and asks `remote_tars(mirror)` how to open each tar.
- File names in a remote card are plain names in the set's folder (letters, digits, `._-`, no `..`, no
  `/`, no `%`): anything else is refused before anything is downloaded.
- Tars are read front to back in 64 MiB blocks held in a local buffer: one ranged GET per 64 MiB of tar
  (one per tar up to that size), never one per sample. The next block's GET goes out while the reader
  parses the current one (read-ahead, at most two blocks held); a block shorter than asked for is refetched.
  A tar's size is the card's `bytes` for it (no request; cards written before that field cost one HEAD per
  tar). The last block's GET asks for one byte more than that size, so a served file longer than the card
  says is a RemoteError naming the URL, as is one shorter (after the refetches), never a silent misread.
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
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

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


def with_retries(url: str, action: Callable[[], T], retry: RetryPolicy | None = None) -> T:
    """`action()`, retried with backoff on network errors; a missing file or a CxrError is not retried."""
    retry = retry or RETRY
    for attempt in range(retry.tries):
        try:
            return action()
        except (CxrError, FileNotFoundError, PermissionError, IsADirectoryError):
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


class RemoteFile:
    """A remote file read front to back in blocks of `block` bytes, one ranged GET each (`cat_file`), held in
    a local buffer (an `io.BytesIO` over the block, no copy of it): the reader's many small reads, seeks and
    tells inside a block are one C call each, not a call through fsspec.

    Read-ahead: on an async filesystem (fsspec's http, s3fs, gcsfs) the GET of the next block goes out on
    fsspec's event loop as soon as the reader starts on a block, so the server sends it while the reader
    parses; at most two blocks are held. The reader waits until that request is under way: a thread that
    only waits for the GIL would not send it before the reader next blocks.

    `size` is the file's size in bytes (the card's); without it the size is asked first (one HEAD or its
    protocol's equivalent). The last block's GET asks for one byte past the size: a file longer than that is
    a RemoteError. A block shorter than asked for (a partial download, or a file shorter than its size) is
    fetched again. Each block is retried with backoff, then a RemoteError names the URL."""

    def __init__(self, url: str, retry: RetryPolicy | None = None, block: int | None = None,
                 size: int | None = None):
        self.url, self.retry, self.block = url, retry, int(block or READ_BLOCK)
        self._fs, self._path = _fs(url)
        self._buf, self._buf_start = io.BytesIO(), 0    # the block held; the position is _buf_start + _buf.tell()
        self._ahead: tuple[int, concurrent.futures.Future] | None = None
        self._size_from = "the card gives for it" if size is not None else "its size said"
        if size is None:
            try:
                size = with_retries(self.url, lambda: self._fs.size(self._path), self.retry)
            except FileNotFoundError:
                raise RemoteError(f"{self.url}: not found (listed in the card but missing)") from None
        self._size = int(size)
        self._read_ahead(0)

    def _range(self, pos: int) -> tuple[int, int]:
        """(start, end) of the GET of the block at `pos`; the last block's asks for one byte past the size."""
        end = min(pos + self.block, self._size)
        return pos, end + (end == self._size)

    def _checked(self, data: bytes, pos: int) -> bytes:
        want = min(self.block, self._size - pos)
        if len(data) > want:
            if pos + want == self._size:
                raise RemoteError(f"{self.url}: longer than the {self._size:,} bytes {self._size_from}; the file "
                                  f"changed after the card was written, or the set is damaged")
            raise RemoteError(f"{self.url}: the server sent {len(data):,} bytes for a range of {want:,}; it must "
                              f"answer range requests")
        if len(data) < want:
            raise OSError(f"got {len(data):,} of the {want:,} bytes asked for at byte {pos:,} (a download cut "
                          f"short, or a file shorter than the {self._size:,} bytes {self._size_from})")
        return data

    def _read_ahead(self, pos: int) -> None:
        """Start the GET of the block at `pos` on fsspec's event loop (async filesystems only)."""
        self._ahead = None
        if pos >= self._size or not getattr(self._fs, "async_impl", False):
            return
        sent = threading.Event()
        start, end = self._range(pos)

        async def fetch() -> bytes:
            sent.set()
            return await self._fs._cat_file(self._path, start=start, end=end)
        self._ahead = (pos, asyncio.run_coroutine_threadsafe(fetch(), self._fs.loop))
        sent.wait()

    def _load(self, pos: int) -> None:
        """Make the block starting at `pos` the buffer, then start the GET of the one after it."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] != pos:   # a seek away from the block under way
            ahead[1].cancel()
            ahead = None
        tries = [ahead[1]] if ahead is not None else []
        start, end = self._range(pos)

        def attempt() -> bytes:  # the read-ahead's result first; a retry asks again
            data = tries.pop().result() if tries else self._fs.cat_file(self._path, start=start, end=end)
            return self._checked(data, pos)
        try:
            block = with_retries(self.url, attempt, self.retry)
        except FileNotFoundError:
            raise RemoteError(f"{self.url}: not found (listed in the card but missing)") from None
        self._buf, self._buf_start = io.BytesIO(block), pos
        self._read_ahead(pos + len(block))

    def read(self, n: int = -1) -> bytes:
        data = self._buf.read(n)
        if len(data) == n:                   # inside the block held: the common case
            return data
        return self._read_on(data, n)

    def _read_on(self, first: bytes, n: int | None) -> bytes:
        """`first` (what the block held had left) and the bytes after it: `n` in all, or up to the end."""
        pieces, pos = [first], self.tell()
        end = self._size if n is None or n < 0 else min(pos - len(first) + n, self._size)
        while pos < end:
            self._load(pos)
            pieces.append(self._buf.read(end - pos))
            pos += len(pieces[-1])
        return first if len(pieces) == 1 else b"".join(pieces)

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("RemoteFile seeks from the start only")
        pos = int(pos)
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        if pos >= self._buf_start:
            self._buf.seek(pos - self._buf_start)          # past the block's end too: a read loads from there
        else:
            self._buf, self._buf_start = io.BytesIO(), pos  # before the block held: a read loads from there
        return pos

    def tell(self) -> int:
        return self._buf_start + self._buf.tell()

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()              # stops the download on the event loop
            self._ahead = None
        self._buf = io.BytesIO()

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
