"""Rules of evaluation that a user only notices in wrong numbers: the bootstrap resamples patients, not
images; prediction (`trainer.loop.predict`, `cxr eval`) applies no augmentation; and the `eval`,
`predict` and `demo` commands print the numbers of the library calls they wrap.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import cxrshards
from tests.shardset_fixture import expected_pixels, make_shard_set
from trainer.config import TrainConfig
from trainer.evaluation.pipeline import evaluate_run
from trainer.metrics import bootstrap_macro_auroc
from trainer.loop import predict
from trainer.models import build_model

SIZE = 16


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cli():
    from cli.app import _register, app

    _register()
    return app


# --------------------------------------------------------------------------- bootstrap by patient

def reference_patient_ci(y, p, patients, labels_idx, n_boot, seed, level=0.95):
    """Plain percentile bootstrap: draw len(patients) patients (sorted ids) with replacement from
    default_rng(seed), take all their rows, macro AUROC (sklearn) over the labels defined in the resample."""
    ids = sorted(set(patients))
    rows_of = {pid: [i for i, q in enumerate(patients) if q == pid] for pid in ids}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        rows = [r for d in rng.integers(0, len(ids), size=len(ids)) for r in rows_of[ids[d]]]
        aucs = []
        for j in labels_idx:
            yy, pp = y[rows, j], p[rows, j]
            keep = ~np.isnan(yy)
            if len(set(yy[keep])) == 2:
                aucs.append(roc_auc_score(yy[keep], pp[keep]))
        if aucs:
            values.append(np.mean(aucs))
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha)), len(values)


def _patient_data(n_patients: int, seed: int):
    """Patients with 1-4 images each, in shuffled row order; 3 labels with NaNs and ties in the scores."""
    rng = np.random.default_rng(seed)
    patients = [f"pt{i:03d}" for i in range(n_patients) for _ in range(rng.integers(1, 5))]
    patients = [patients[i] for i in rng.permutation(len(patients))]
    n = len(patients)
    y = rng.integers(0, 2, (n, 3)).astype(np.float64)
    y[rng.random((n, 3)) < 0.1] = np.nan
    p = np.round(np.clip(0.3 * np.nan_to_num(y) + rng.random((n, 3)), 0, 1), 2)
    return y, p, patients


def test_bootstrap_interval_equals_a_plain_patient_resampling_reference():
    y, p, patients = _patient_data(30, seed=5)
    assert len(patients) > 45                                   # several images per patient
    got = bootstrap_macro_auroc(y, p, patients, [0, 1, 2], n_boot=300, seed=11)
    low, high, used = reference_patient_ci(y, p, patients, [0, 1, 2], n_boot=300, seed=11)
    assert got["unit"] == "patient" and got["n_used"] == used
    assert got["low"] == pytest.approx(low, abs=1e-12) and got["high"] == pytest.approx(high, abs=1e-12)


def test_bootstrap_interval_ignores_identical_copies_of_a_patients_image():
    """Each patient's image stored 3 times changes no patient-level resample (AUROC is unchanged by giving
    every sample the same weight), so the interval must be the same as with one row per patient."""
    rng = np.random.default_rng(3)
    n = 40
    y = rng.integers(0, 2, (n, 2)).astype(np.float64)
    p = np.clip(0.25 * y + rng.random((n, 2)), 0, 1)
    patients = [f"pt{i:03d}" for i in range(n)]
    once = bootstrap_macro_auroc(y, p, patients, [0, 1], n_boot=300, seed=2)
    thrice = bootstrap_macro_auroc(np.repeat(y, 3, axis=0), np.repeat(p, 3, axis=0), np.repeat(patients, 3),
                                   [0, 1], n_boot=300, seed=2)
    assert once["low"] < once["high"]
    assert thrice["low"] == pytest.approx(once["low"], abs=1e-12)
    assert thrice["high"] == pytest.approx(once["high"], abs=1e-12)


# --------------------------------------------------------------------------- no augmentation at evaluation

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from trainer.fitting import fit

    root = tmp_path_factory.mktemp("rules-eval")
    shard_dir = make_shard_set(root / "shards", "fx-16", counts={"train": 24, "valid": 12, "test": 16}, size=SIZE)
    run = root / "runs" / "tiny"
    fit(TrainConfig(shards=str(shard_dir), out=str(run), epochs=1, batch_size=8, workers=0, device="cpu",
                    lr=1e-3, augment="none"))
    return root, shard_dir, run


def _direct_probabilities(run, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """sigmoid(model((pixels / 255 - mean) / std)) of the stored pixels of `keys`, written out here, and the
    same of the left-right mirrored pixels."""
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    model = build_model(state["config"]["model"], len(state["labels"]))
    model.load_state_dict(state["model"])
    model.eval()
    mean, std = state["normalize"]
    pixels = torch.from_numpy(np.stack([expected_pixels(k, SIZE, "png") for k in keys])[:, None])
    x = ((pixels.double() / 255.0 - mean) / std).float()
    with torch.no_grad():
        return torch.sigmoid(model(x)).numpy(), torch.sigmoid(model(x.flip(-1))).numpy()


def _asymmetric(direct: np.ndarray, mirrored: np.ndarray) -> None:
    """The inputs are left-right asymmetric for this model: a flip would show in every row's probabilities."""
    assert (np.abs(direct - mirrored).max(axis=1) > 1e-4).all()


def test_loop_predict_is_a_plain_forward_pass_of_the_normalised_shard_pixels(tiny_run):
    from trainer.checkpoint import load_for_inference

    _root, shard_dir, run = tiny_run
    inf = load_for_inference(run / "best.pt")
    loader = torch.utils.data.DataLoader(
        cxrshards.open_shards(shard_dir, "test", format="wds", shuffle=False, batch_size=5, rank=0, world_size=1),
        batch_size=None, num_workers=0)
    probs, _labels, keys = predict(inf.model, loader, torch.device("cpu"), mean=inf.mean, std=inf.std, gather=False)
    direct, mirrored = _direct_probabilities(run, keys)
    _asymmetric(direct, mirrored)
    np.testing.assert_allclose(probs, direct, rtol=0, atol=1e-5)


def test_cxr_eval_predictions_are_a_plain_forward_pass_of_the_shard_pixels(tiny_run, tmp_path):
    _root, _shard_dir, run = tiny_run
    result = CliRunner().invoke(_cli(), ["eval", "--run", str(run), "--bootstrap", "0", "--device", "cpu",
                                         "--batch-size", "5", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name, n in (("predictions.parquet", 16), ("valid_predictions.parquet", 12)):
        df = pd.read_parquet(tmp_path / name)
        assert len(df) == n
        labels = [c[len("prob_"):] for c in df.columns if c.startswith("prob_")]
        direct, mirrored = _direct_probabilities(run, df["key"].tolist())
        _asymmetric(direct, mirrored)
        np.testing.assert_allclose(df[[f"prob_{n}" for n in labels]].to_numpy(np.float64), direct, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- CLI numbers = library numbers

def test_cli_eval_prints_the_macro_auroc_and_interval_of_evaluate_run(tiny_run, tmp_path):
    _root, _shard_dir, run = tiny_run
    result = CliRunner().invoke(_cli(), ["eval", "--run", str(run), "--ckpt", "last", "--bootstrap", "40",
                                         "--seed", "3", "--device", "cpu", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    report = evaluate_run(run, ckpt="last", n_boot=40, seed=3, device="cpu", out=tmp_path / "lib")
    m = report["metrics"]
    shown = re.search(r"macro AUROC (\S+), 95% CI (\S+) to (\S+)\s+\((\d+) bootstrap", result.output)
    assert shown, result.output
    ci = m["macro_auroc_ci"]
    assert shown.groups() == (f"{m['macro_auroc']:.3f}", f"{ci['low']:.3f}", f"{ci['high']:.3f}", str(ci["n_used"]))
    saved = json.loads((tmp_path / "cli" / "report.json").read_text())["metrics"]
    assert saved == json.loads(json.dumps(m))                  # every number, not only the 3 printed digits


def test_cli_predict_prints_the_probabilities_of_predict_images(tiny_run, real_data):
    from trainer.predict import predict_images

    _root, _shard_dir, run = tiny_run
    images = [str(real_data / "real" / "nih-1024" / n) for n in ("00000001_000.png", "00000013_003.png")]
    result = CliRunner().invoke(_cli(), ["predict", *images, "--run", str(run), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    lib = predict_images(images, run, device="cpu")
    assert [p["image"] for p in shown["predictions"]] == images
    for got, want in zip(shown["predictions"], lib["predictions"]):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-12)
    assert len({round(v, 6) for p in shown["predictions"] for v in p["probabilities"].values()}) > 1
    table = CliRunner().invoke(_cli(), ["predict", *images, "--run", str(run), "--device", "cpu"])
    assert table.exit_code == 0, table.output
    first = lib["labels"][0]
    row = re.search(rf"{first}\s+\S?\s*(\d\.\d{{3}})\s+\S?\s*(\d\.\d{{3}})", table.output)
    assert row, table.output
    assert row.groups() == tuple(f"{p['probabilities'][first]:.3f}" for p in lib["predictions"])


def test_cli_demo_prints_the_macro_auroc_of_its_runs(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(_cli(), ["demo", "--out", str(out), "--n-nih", "60", "--n-cardiomegaly", "30",
                                         "--size", "32", "--epochs", "1", "--finetune-epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for path in ("demo.json", "runs/nih/best.pt", "runs/cardiomegaly/eval/report.json"):
        assert (out / path).is_file(), path
    shown = re.findall(r"macro AUROC (\S+), 95% CI (\S+) to (\S+)", result.output)
    reports = [evaluate_run(out / "runs" / name, n_boot=200, device="cpu", out=tmp_path / f"eval-{name}")
               for name in ("nih", "cardiomegaly")]
    # The interval line is printed for each run whose macro AUROC is defined (at this toy size the
    # NIH test split may hold no label with both classes), in the order nih, cardiomegaly.
    want = [(f"{m['macro_auroc']:.3f}", f"{m['macro_auroc_ci']['low']:.3f}", f"{m['macro_auroc_ci']['high']:.3f}")
            for m in (r["metrics"] for r in reports) if m["macro_auroc"] is not None]
    assert want and shown == want, result.output
