"""Seeing a shard set: `cxr shard show` contact sheets and the README.md every build writes."""
from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli.app import _register, app
from cxrshards.build import BuildConfig, build_shards
from cxrshards.sheet import pick_samples

_register()
runner = CliRunner()


def small_set(tmp_path):
    """normal/ dark images and abnormal/ bright ones, 12 each, built at 32 px (wds + hdf5, 4 per tar)."""
    for cls, level in (("normal", 40), ("abnormal", 220)):
        for i in range(12):
            path = tmp_path / "raw" / cls / f"{cls}{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.full((40, 48), level + i, np.uint8))
    config = BuildConfig(source="cardiomegaly", raw=tmp_path / "raw", size=32, format="both", shard_size=4,
                         out=tmp_path / "shards", workers=1, quiet=True)
    return build_shards(config).path


def test_show_draws_only_positive_samples_in_shard_order(tmp_path):
    path = small_set(tmp_path)
    table = pd.read_parquet(path / "manifest.parquet")
    train = table[table["split"] == "train"].sort_values(["shard", "shard_index"])
    expected = train[train["Cardiomegaly"] == 1.0]["key"].head(3).tolist()
    assert pick_samples(path, "train", 3, "Cardiomegaly")["key"].tolist() == expected
    assert pick_samples(path, "train", 2)["key"].tolist() == train["key"].head(2).tolist()

    sheet = tmp_path / "sheet.png"
    result = runner.invoke(app, ["shard", "show", str(path), "--label", "Cardiomegaly", "--n", "3", "--out", str(sheet)])
    assert result.exit_code == 0, result.output
    img = cv2.imread(str(sheet), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100
    bad = runner.invoke(app, ["shard", "show", str(path), "--label", "Nope", "--out", str(sheet)])
    assert bad.exit_code == 1 and "no label 'Nope'" in bad.output


def test_readme_counts_and_stock_readers_are_true(tmp_path):
    path = small_set(tmp_path)
    card = json.loads((path / "dataset.json").read_text())
    readme = (path / "README.md").read_text()
    assert "cxr shard build" in readme and "--source cardiomegaly" in readme and "--size 32" in readme
    for split, info in card["splits"].items():
        assert re.search(rf"^\| {split} \| {info['count']:,} \| {info['patients']:,} \|$", readme, re.M), split
    positives = card["splits"]["train"]["positives"]["Cardiomegaly"]
    assert re.search(rf"^\| Cardiomegaly \| {positives:,} \(", readme, re.M)
    # The README's python snippets run as written, from inside the set, with stock webdataset and h5py.
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(blocks) == 2
    cwd = os.getcwd()
    os.chdir(path)
    try:
        wds_ns, h5_ns = {}, {}
        exec(blocks[0], wds_ns)
        exec(blocks[1], h5_ns)
    finally:
        os.chdir(cwd)
    first = pd.read_parquet(path / "manifest.parquet").query("split == 'train' and shard_index == 0")
    first = first.sort_values("shard").iloc[0]
    assert wds_ns["sample"]["__key__"] == first["key"]
    assert h5_ns["key"] == first["key"] and h5_ns["image"].shape == (32, 32)
    assert json.loads(h5_ns["names"]) == ["Cardiomegaly"]
