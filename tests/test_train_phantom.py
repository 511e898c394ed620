"""On the phantom NIH set (drawn findings a small CNN can see at 64 px), a few CPU epochs of resnet18
learn the drawn labels: validation macro AUROC >= 0.85."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cxrshards.build import BuildConfig, build_shards
from phantom import NIH_PREVALENCE, make_demo_data
from manifests.options import ManifestOptions
from trainer.checkpoint import load_for_inference
from trainer.config import TrainConfig
from trainer.fitting import fit

# its module fixtures are costly: every test of this module runs on one xdist worker (`--dist loadgroup`)
pytestmark = pytest.mark.xdist_group("test_train_phantom")


@pytest.fixture(scope="session")
def phantom_nih(tmp_path_factory) -> Path:
    """`cxr demo-data nih` (800 images, 64 px) -> `cxr shard build --source nih --size 64` (hdf5)."""
    base = tmp_path_factory.mktemp("phantom-nih")
    make_demo_data("nih", base / "raw", 800, 64, 0)
    result = build_shards(BuildConfig(source="nih", raw=base / "raw", size=64, format="hdf5", out=base / "shards",
                                      workers=1, quiet=True), ManifestOptions(source="nih", seed=0))
    return result.path


@pytest.fixture(scope="module")
def phantom_run(phantom_nih, tmp_path_factory) -> Path:
    """resnet18 from scratch on the drawn findings, 5 CPU epochs: the run both tests below read."""
    torch.set_num_threads(1)
    return fit(TrainConfig(shards=str(phantom_nih), out=str(tmp_path_factory.mktemp("phantom-run") / "run"),
                           labels=tuple(NIH_PREVALENCE), model="resnet18", epochs=5, lr=2e-3, batch_size=32,
                           scheduler="cosine", workers=0, device="cpu", seed=0))


@pytest.mark.slow
def test_resnet18_learns_the_drawn_findings(phantom_run):
    drawn = tuple(NIH_PREVALENCE)
    with open(phantom_run / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = max(float(r["val_auroc_macro"]) for r in rows)
    assert best >= 0.85, [r["val_auroc_macro"] for r in rows]
    model = load_for_inference(phantom_run / "best.pt")
    assert model.labels == list(drawn) and model.task == "multilabel" and model.head == "sigmoid"


@pytest.mark.slow
def test_the_report_shows_a_planted_gap_one_sexs_noisier_labels(phantom_nih, phantom_run, tmp_path):
    """The phantom run is evaluated on a copy of its own set whose recorded test labels of women are flipped
    with probability 0.3: `cxr eval --by sex` must show women's AUROC lower, with a CI that excludes men's."""
    import shutil

    import numpy as np
    import pandas as pd

    from trainer.evaluation.pipeline import evaluate_run

    torch.set_num_threads(1)
    drawn, run = tuple(NIH_PREVALENCE), phantom_run
    noisy = tmp_path / "noisy" / phantom_nih.name
    shutil.copytree(phantom_nih, noisy)
    table = pd.read_parquet(noisy / "manifest.parquet")
    women = (table["split"] == "test") & (table["sex"] == "F")
    assert women.sum() >= 40 and ((table["split"] == "test") & (table["sex"] == "M")).sum() >= 40
    rng = np.random.default_rng(7)
    for label in drawn:
        flip = women.to_numpy() & (rng.random(len(table)) < 0.3)
        table.loc[flip, label] = 1.0 - table.loc[flip, label]
    table.to_parquet(noisy / "manifest.parquet")   # the card (and its sha256) is unchanged: still the run's own set
    report = evaluate_run(run, shards=str(noisy), device="cpu", n_boot=200, by=["sex"], min_group=5, gallery=False,
                          quiet=True)
    assert "external" not in report
    (column,) = report["subgroups"]["columns"]
    groups = {g["value"]: g for g in column["groups"]}
    f, m = groups["F"]["macro_auroc"], groups["M"]["macro_auroc"]
    assert f["value"] < m["value"] and f["high"] < m["value"], (f, m)
    assert groups["F"]["vs_rest"]["macro_auroc"]["high"] < 0
    df = pd.read_parquet(run / "eval" / "predictions.parquet")
    assert set(df["sex"]) == {"F", "M"} and len(df) == groups["F"]["images"] + groups["M"]["images"]
