"""Shard sets from the phantom NIH, MIMIC-CXR-JPG and cardiomegaly trees, read back with stock tools."""
from __future__ import annotations

import pandas as pd
import pytest

from cxrshards.build import BuildConfig, build_shards
from phantom import make_demo_data
from manifests.build import build_manifest
from manifests.options import ManifestOptions
from tests.test_shard_support import check_set, file_hashes


@pytest.mark.parametrize("source,n,image_size,size,codec,fit", [
    ("nih", 30, 160, 96, "png", "pad"),
    ("mimic", 60, 300, 96, "jpeg", "pad"),          # 2 x 2.5 k x 3 k like MIMIC, scaled down; reduced JPEG decode
    ("cardiomegaly", 30, 200, 64, "raw", "squash"),  # png and jpg files, landscape
])
def test_phantom_trees_read_back_in_both_formats(tmp_path, source, n, image_size, size, codec, fit):
    raw = tmp_path / "raw"
    make_demo_data(source, raw, n, image_size, seed=1)
    options = ManifestOptions(source=source, patient_pattern=r"person(\d+)_" if source == "cardiomegaly" else None)
    manifest = build_manifest(raw, options)
    config = BuildConfig(source=source, raw=raw, out=tmp_path / "out", size=size, codec=codec, fit=fit, shard_size=7,
                         workers=2, quiet=True)
    result = build_shards(config, options)
    table = check_set(result.path, raw, size=size, fit=fit, codec=codec, expect=len(manifest.table))
    assert result.card["labels"] == manifest.labels and result.card["rejects"] == len(manifest.rejects)
    # the located manifest is the manifest plus where each sample lives
    base = manifest.table.set_index("key")
    mine = table.set_index("key").loc[base.index]
    pd.testing.assert_frame_equal(mine[base.columns], base, check_dtype=False)
    rejects = pd.read_parquet(result.path / "rejects.parquet")
    assert len(rejects) == len(manifest.rejects)   # cohort choices (e.g. MIMIC non-AP) are listed too
    assert result.reject_fraction == 0.0

    rebuilt = build_shards(BuildConfig(source=source, raw=raw, out=tmp_path / "again", size=size, codec=codec,
                                       fit=fit, shard_size=7, workers=1, quiet=True), options)
    assert file_hashes(rebuilt.path, skip=("build.json",)) == file_hashes(result.path, skip=("build.json",))
