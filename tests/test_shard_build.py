"""`cxr shard build` (library): real images read back through stock webdataset/h5py (tests/data), determinism
and options (on a phantom folder set in Kermany's layout)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cxrshards.build import BuildConfig, build_shards, sample_order
from cxrshards.verify import verify_shards
from manifests.errors import CxrError
from manifests.options import ManifestOptions
from tests.test_shard_support import check_set, file_hashes, real_nih_tree


def kermany_options(seed: int = 0) -> ManifestOptions:
    return ManifestOptions(source="folder", label="Pneumonia", patient_pattern=r"(person\d+)_", seed=seed)


def test_real_kermany_folder_reads_back_in_both_formats(tmp_path, real_data):
    raw = real_data / "real" / "kermany"
    config = BuildConfig(source="folder", raw=raw, out=tmp_path, name="k", size=128, shard_size=3, workers=1,
                         quiet=True)
    result = build_shards(config, kermany_options())
    table = check_set(result.path, raw, size=128, expect=12)
    card = result.card
    assert card["labels"] == ["Pneumonia"] and card["rejects"] == 0 and result.reject_fraction == 0
    assert sum(card["splits"][s]["count"] for s in ("train", "valid", "test")) == 12
    # both files of patient person1946 are in one split (patient-level split kept)
    assert table.loc[table["patient_id"] == "person1946", "split"].nunique() == 1
    assert 0.0 < card["pixel_mean"] < 1.0 and 0.0 < card["pixel_std"] < 0.5
    assert {f["file"] for f in card["files"]} == {p.name for p in result.path.iterdir() if p.suffix in (".tar", ".h5")}
    assert all(f["bytes"] == (result.path / f["file"]).stat().st_size for f in card["files"])  # remote readers size by it
    assert not (result.path / ".work").exists() and not (result.path / ".progress").exists()


@pytest.mark.parametrize("codec,fit", [("jpeg", "squash"), ("raw", "crop")])
def test_real_nih_tree_reads_back(tmp_path, real_data, codec, fit):
    raw = real_nih_tree(real_data, tmp_path / "raw")
    config = BuildConfig(source="nih", raw=raw, out=tmp_path / "out", size=96, codec=codec, fit=fit, shard_size=2,
                         workers=2, quiet=True)
    result = build_shards(config, ManifestOptions(source="nih", ratios=(0.5, 0.25, 0.25)))
    table = check_set(result.path, raw, size=96, fit=fit, codec=codec, expect=4)
    assert result.path.name == "nih-96"
    row = table[table["key"] == "00000001_000"].iloc[0]
    assert row["Cardiomegaly"] == 1.0 and row["No Finding"] == 0.0


def test_pixel_mean_std_match_the_train_pixels(tmp_path, phantom_kermany):
    raw = phantom_kermany
    result = build_shards(BuildConfig(source="folder", raw=raw, out=tmp_path, size=64, format="hdf5", workers=1,
                                      quiet=True), kermany_options())
    import h5py

    with h5py.File(result.path / "train.h5") as h5:
        pixels = h5["images"][:].astype(np.float64) / 255.0
    assert result.card["pixel_mean"] == pytest.approx(pixels.mean(), rel=1e-9)
    assert result.card["pixel_std"] == pytest.approx(pixels.std(), rel=1e-9)
    assert not list(result.path.glob("*.tar")) and result.card["formats"] == ["hdf5"]
    table = check_set(result.path, raw, size=64, formats=("hdf5",))
    assert table["shard"].isna().all() and (table["shard_index"] == -1).all()
    assert verify_shards(result.path).ok


def test_rebuild_is_byte_identical_whatever_the_worker_count(tmp_path, phantom_kermany):
    raw = phantom_kermany
    hashes = []
    for workers, name in ((1, "a"), (2, "b")):
        build_shards(BuildConfig(source="folder", raw=raw, out=tmp_path, name=name, size=64, shard_size=2,
                                 workers=workers, quiet=True), kermany_options())
        hashes.append(file_hashes(tmp_path / name, skip=("build.json", "dataset.json", "README.md")))
    assert hashes[0] == hashes[1] and len(hashes[0]) >= 8
    cards = [json.loads((tmp_path / n / "dataset.json").read_text()) for n in "ab"]
    assert {**cards[0], "name": "b"} == cards[1]   # the card differs only by name
    # the same command again, over a finished set: identical bytes, build.json included
    before = file_hashes(tmp_path / "a")
    build_shards(BuildConfig(source="folder", raw=raw, out=tmp_path, name="a", size=64, shard_size=2, workers=1,
                             quiet=True), kermany_options())
    assert file_hashes(tmp_path / "a") == before


def test_sample_order_is_a_pure_function_of_the_seed():
    keys = [f"k{i:03d}" for i in range(50)]
    assert sample_order(reversed(keys), 3) == sample_order(keys, 3)
    assert sample_order(keys, 3) != sample_order(keys, 4)
    perm = np.random.default_rng([3, 0x5EED]).permutation(50)
    assert sample_order(keys, 3) == [keys[i] for i in perm]


def test_other_options_into_an_existing_set_are_refused_and_force_rebuilds(tmp_path, phantom_kermany):
    raw = phantom_kermany
    base = dict(source="folder", raw=raw, out=tmp_path, name="k", size=64, workers=1, quiet=True)
    build_shards(BuildConfig(**base), kermany_options())
    with pytest.raises(CxrError, match=r"--codec: was 'png', now 'jpeg'"):
        build_shards(BuildConfig(**base, codec="jpeg"), kermany_options())
    with pytest.raises(CxrError, match=r"--seed: was 0, now 1"):
        build_shards(BuildConfig(**base, seed=1), kermany_options(seed=1))
    assert (tmp_path / "k" / "dataset.json").is_file()   # a refused build leaves the set as it was
    result = build_shards(BuildConfig(**base, codec="jpeg", force=True), kermany_options())
    assert result.card["codec"] == "jpeg" and not list(result.path.glob("*.tar.*"))
    check_set(result.path, raw, size=64, codec="jpeg")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CxrError, match="not a cxr shard set"):
        build_shards(BuildConfig(**{**base, "name": "other"}), kermany_options())


def test_config_errors_are_user_errors(tmp_path):
    with pytest.raises(CxrError, match="--codec"):
        BuildConfig(source="nih", raw=tmp_path, codec="webp")
    with pytest.raises(CxrError, match="--raw"):
        BuildConfig(source="nih")
    with pytest.raises(CxrError, match="--scheduler"):
        BuildConfig(source="nih", raw=tmp_path, scheduler="localhost:8786")
