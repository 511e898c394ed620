"""`--scheduler`: the same per-shard tasks on a Dask cluster give byte-identical shard sets."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from cxrshards.build import BuildConfig, build_shards
from manifests.errors import CxrError
from manifests.options import ManifestOptions
from tests.test_shard_support import check_set, file_hashes

distributed = pytest.importorskip("distributed")


@pytest.fixture(autouse=True)
def _dask_info_logs_off(caplog):
    """Dask logs its routine start and shutdown at INFO, a client's closed connection with a traceback
    (CommClosedError): normal, not an error of the build, and no traceback in a passing test's output."""
    caplog.set_level(logging.WARNING, logger="distributed")


@pytest.mark.slow
def test_local_dask_cluster_build_is_byte_identical_to_local(tmp_path, phantom_kermany):
    raw = phantom_kermany
    options = ManifestOptions(source="folder", patient_pattern=r"(person\d+)_")
    local = build_shards(BuildConfig(source="folder", raw=raw, out=tmp_path / "local", size=64, shard_size=3,
                                     codec="jpeg", workers=1, quiet=True), options)
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                  silence_logs=40) as cluster:
        config = replace(local_config(raw, tmp_path / "dask"), scheduler=cluster.scheduler_address)
        remote = build_shards(config, options)
        with distributed.Client(cluster) as client:   # both workers took part
            assert len(client.scheduler_info()["workers"]) == 2
    assert file_hashes(remote.path, skip=("build.json",)) == file_hashes(local.path, skip=("build.json",))
    check_set(remote.path, raw, size=64, codec="jpeg", expect=12)


def local_config(raw, out) -> BuildConfig:
    return BuildConfig(source="folder", raw=raw, out=out, size=64, shard_size=3, codec="jpeg", workers=1, quiet=True)


def test_unreachable_scheduler_is_a_user_error(tmp_path, phantom_kermany, monkeypatch):
    monkeypatch.setattr("cxrshards.build.DASK_CONNECT_TIMEOUT", "1s")
    config = BuildConfig(source="folder", raw=phantom_kermany, out=tmp_path, size=32,
                         scheduler="tcp://127.0.0.1:9", quiet=True)
    with pytest.raises(CxrError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        build_shards(config, ManifestOptions(source="folder"))
