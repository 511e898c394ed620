"""`cxr predict` feeds the model exactly the tensor the shard path feeds it, on the real NIH PNGs."""
from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxrshards import H5Split, open_shards
from cxrshards.build import BuildConfig, build_shards
from manifests.options import ManifestOptions
from trainer.augment import AugmentSpec, augment_batch
from trainer.config import TrainConfig
from trainer.predict import card_pixels, load_run, predict_images, predict_tensor

NAMES = ["00000001_000.png", "00000002_000.png", "00000013_003.png"]


def _nih_tree(real_data, raw):
    """A tiny NIH raw tree in the Kaggle layout: the 3 real PNGs, their real Data_Entry rows, the
    official split lists cut down to them."""
    images = raw / "images_001" / "images"
    images.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(real_data / "real" / "nih-1024" / name, images / name)
    with gzip.open(real_data / "nih" / "Data_Entry_2017_v2020.csv.gz", "rt") as fh:
        lines = [line for i, line in enumerate(fh) if i == 0 or line.split(",", 1)[0] in NAMES]
    assert len(lines) == 4
    (raw / "Data_Entry_2017_v2020.csv").write_text("".join(lines))
    for lst in ("train_val_list.txt", "test_list.txt"):
        names = (real_data / "nih" / lst).read_text().split()
        (raw / lst).write_text("".join(n + "\n" for n in names if n in NAMES))


@pytest.fixture(scope="module")
def real_run(real_data, tmp_path_factory):
    torch.set_num_threads(1)
    from trainer.fitting import fit

    tmp = tmp_path_factory.mktemp("predict")
    raw = tmp / "nih"
    _nih_tree(real_data, raw)
    options = ManifestOptions(source="nih", valid_fraction=0.5)   # 2 train_val patients: one to valid
    result = build_shards(BuildConfig(source="nih", raw=raw, size=48, format="both", codec="png",
                                      out=tmp / "shards", workers=1, quiet=True), options)
    run = tmp / "runs" / "real"
    fit(TrainConfig(shards=str(result.path), out=str(run), epochs=1, batch_size=2, workers=0, device="cpu",
                    augment="none", flip=False))
    return tmp, raw, result.path, run


def _shard_samples(shard_dir):
    card = json.loads((shard_dir / "dataset.json").read_text())
    out = {}
    for split, info in card["splits"].items():
        if info.get("count"):
            for image, _labels, key in open_shards(shard_dir, split, format="wds"):
                out[key] = image
            if "hdf5" not in card["formats"]:
                continue
            h5 = H5Split(shard_dir, split)
            for i in range(len(h5)):
                image, _labels, key = h5[i]
                assert torch.equal(image, out[key])
    return out


def test_predict_tensor_equals_shard_tensor(real_run):
    tmp, raw, shard_dir, run = real_run
    samples = _shard_samples(shard_dir)
    assert sorted(samples) == [n[:-4] for n in NAMES]
    loaded = load_run(run, "best", "cpu")
    inf = loaded.inference
    spec = AugmentSpec(flip=False, light=False, mean=inf.mean, std=inf.std)   # what trainer.loop.predict applies
    for name in NAMES:
        path = raw / "images_001" / "images" / name
        from_shard = augment_batch(samples[name[:-4]][None], spec, None)
        from_file = predict_tensor(path, loaded)
        assert from_file.shape == (1, 1, 48, 48) and from_file.dtype == torch.float32
        assert torch.equal(from_file, from_shard), name
        # and the model's output on them is the same number
        with torch.no_grad():
            want = torch.sigmoid(inf.model(from_shard)).numpy()[0]
        got = predict_images([path], run, device="cpu")["predictions"][0]["probabilities"]
        np.testing.assert_allclose([got[n] for n in inf.labels], want, rtol=0, atol=1e-6)


def test_jpeg_codec_round_trip_matches_shard(real_run, tmp_path):
    tmp, raw, _shard_dir, _run = real_run
    result = build_shards(BuildConfig(source="nih", raw=raw, size=40, format="wds", codec="jpeg", jpeg_quality=80,
                                      fit="crop", out=tmp_path, workers=1, quiet=True),
                          ManifestOptions(source="nih", valid_fraction=0.5))
    samples = _shard_samples(result.path)
    for name in NAMES:
        pixels = card_pixels(raw / "images_001" / "images" / name, result.card)
        np.testing.assert_array_equal(pixels, samples[name[:-4]][0].numpy())


def test_cli_predict_json_and_table(real_run):
    from cli.app import _register, app

    _register()
    tmp, raw, shard_dir, run = real_run
    paths = [str(raw / "images_001" / "images" / n) for n in NAMES[:2]]
    result = CliRunner().invoke(app, ["predict", *paths, "--run", str(run), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [p["image"] for p in data["predictions"]] == paths
    assert len(data["labels"]) == 15 and data["preprocessing"]["size"] == 48
    assert all(0.0 <= v <= 1.0 for p in data["predictions"] for v in p["probabilities"].values())
    table = CliRunner().invoke(app, ["predict", *paths, "--run", str(run), "--device", "cpu"])
    assert table.exit_code == 0 and "Cardiomegaly" in table.output
    missing = CliRunner().invoke(app, ["predict", str(tmp / "nope.png"), "--run", str(run)])
    assert missing.exit_code == 1 and "missing" in missing.output and "Traceback" not in missing.output
