"""External evaluation: a tiny NIH-style run scored on a MIMIC-style shard set of the same size.

Labels meet through the shared names (NIH `Effusion` = MIMIC `Pleural Effusion`), the output goes to
RUN/eval/NAME/ with RUN/eval untouched, every number equals scikit-learn's (and a plain patient-resampling
bootstrap) on the saved predictions, and the mistakes (another size, nothing in common) are one-line errors.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from typer.testing import CliRunner

from tests.shardset_fixture import make_shard_set
from trainer.config import TrainConfig
from trainer.evaluation.pipeline import evaluate_run
from trainer.metrics import metrics_from_predictions

NIH = ("Atelectasis", "Effusion", "Mass", "No Finding")
MIMIC = ("Atelectasis", "Pleural Effusion", "Support Devices")


def _restamp(shard_dir, source: str) -> None:
    """Make a fixture set look like `source`'s, with two images per patient (the fixture has 10)."""
    path = shard_dir / "manifest.parquet"
    table = pq.read_table(path)
    df = table.to_pandas()
    df["source"] = source
    df["patient_id"] = [f"{k.split('_')[0]}-{int(k.split('_')[1]) // 2}" for k in df["key"]]
    meta = json.loads(table.schema.metadata[b"cxr"])
    meta["source"] = source
    arrow = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(arrow.replace_schema_metadata({**arrow.schema.metadata, b"cxr": json.dumps(meta).encode()}), path)
    card = json.loads((shard_dir / "dataset.json").read_text())
    card["source"] = source
    card["manifest_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (shard_dir / "dataset.json").write_text(json.dumps(card, indent=2))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    torch.set_num_threads(1)
    from trainer.fitting import fit

    root = tmp_path_factory.mktemp("external")
    shards = root / "shards"
    nih = make_shard_set(shards, "nih-16", counts={"train": 24, "valid": 12, "test": 16}, labels=NIH)
    mimic = make_shard_set(shards, "mimic-16", counts={"train": 4, "valid": 4, "test": 24}, labels=MIMIC, seed=5)
    mimic32 = make_shard_set(shards, "mimic-32", counts={"train": 2, "valid": 2, "test": 2}, size=32, labels=MIMIC)
    other = make_shard_set(shards, "fracture-16", counts={"train": 2, "valid": 2, "test": 4}, labels=("Fracture",))
    _restamp(nih, "nih")
    for d in (mimic, mimic32, other):
        _restamp(d, "mimic")
    run = root / "runs" / "nih"
    fit(TrainConfig(shards=str(nih), out=str(run), model="resnet18", epochs=1, batch_size=8, workers=0,
                    device="cpu", lr=1e-3, augment="none"))
    internal = evaluate_run(run, n_boot=40, device="cpu")
    before = {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.is_file()}
    report = evaluate_run(run, shards=str(mimic), n_boot=40, device="cpu")
    return {"root": root, "nih": nih, "mimic": mimic, "mimic32": mimic32, "other": other, "run": run,
            "internal": internal, "report": report, "before": before}


def _cli():
    from cli.app import _register, app

    _register()
    return app


def _plain_patient_bootstrap(y, p, patients, n_boot, seed, level=0.95):
    """Reference: draw len(unique patients) patients with replacement (sorted ids, default_rng(seed)),
    take all their images, AUROC by scikit-learn; percentile interval over the defined resamples."""
    uniq = sorted(set(patients))
    rows_of = {u: [i for i, q in enumerate(patients) if q == u] for u in uniq}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        rows = [i for d in rng.integers(0, len(uniq), size=len(uniq)) for i in rows_of[uniq[d]]]
        yy, pp = y[rows], p[rows]
        keep = ~np.isnan(yy)
        if len(set(yy[keep])) == 2:
            values.append(roc_auc_score(yy[keep], pp[keep]))
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def test_labels_matched_through_the_map_and_output_beside_run_eval(sets):
    report, run = sets["report"], sets["run"]
    labels = report["external"]["labels"]
    assert labels["matched"] == [{"shared": "Atelectasis", "run": "Atelectasis", "set": "Atelectasis"},
                                 {"shared": "Effusion", "run": "Effusion", "set": "Pleural Effusion"}]
    assert labels["run_only"] == ["Mass", "No Finding"]
    assert labels["set_only"] == ["Support Devices"]
    out = run / "eval" / "mimic-16"
    for name in ("report.json", "report.md", "predictions.parquet", "valid_predictions.parquet",
                 "internal_predictions.parquet", "roc.png", "pr.png"):
        assert (out / name).is_file(), name
    # The run's own RUN/eval is left exactly as it was.
    after = {p.name: p.read_bytes() for p in (run / "eval").iterdir() if p.is_file()}
    assert after == sets["before"]
    md = (out / "report.md").read_text()
    assert "## Internal vs external" in md and "| Effusion | `Effusion` | `Pleural Effusion` |" in md
    assert "Support Devices" in md and "the run's own valid split (nih-16)" in md
    assert report["external"]["internal"]["source"].startswith("reused")


def test_predictions_equal_a_direct_forward_pass(sets):
    from cxrshards import H5Split
    from trainer.checkpoint import load_for_inference
    from trainer.predict import model_input

    df = pd.read_parquet(sets["run"] / "eval" / "mimic-16" / "predictions.parquet")
    assert list(df.columns) == ["key", "patient_id", "split", "set", "view", "sex", "age", "Atelectasis", "Effusion",
                                "prob_Atelectasis", "prob_Effusion"]
    inf = load_for_inference(sets["run"] / "best.pt")
    split = H5Split(sets["mimic"], "test")
    items = sorted((split[i] for i in range(len(split))), key=lambda t: t[2])
    x = model_input(torch.stack([t[0] for t in items]), inf.mean, inf.std)
    with torch.no_grad():
        probs = torch.sigmoid(inf.model(x)).numpy()
    assert df["key"].tolist() == [t[2] for t in items]
    cols = [inf.labels.index("Atelectasis"), inf.labels.index("Effusion")]
    np.testing.assert_allclose(df[["prob_Atelectasis", "prob_Effusion"]].to_numpy(), probs[:, cols], atol=1e-6)
    # True labels: the set's own columns (MIMIC `Pleural Effusion` under the shared name `Effusion`).
    truth = np.stack([t[1].numpy() for t in items])
    np.testing.assert_array_equal(df[["Atelectasis", "Effusion"]].to_numpy(), truth[:, [0, 1]])


def test_numbers_equal_sklearn_and_a_plain_patient_bootstrap(sets):
    report = sets["report"]
    out = sets["run"] / "eval" / "mimic-16"
    ext = report["external"]
    sides = {"external": pd.read_parquet(out / "predictions.parquet"),
             "internal": pd.read_parquet(out / "internal_predictions.parquet")}
    assert sorted(sides["internal"]["key"]) == sorted(pd.read_parquet(sets["run"] / "eval" / "predictions.parquet")["key"])
    checked = 0
    for row in ext["comparison"]:
        name = row["label"]
        aucs = {}
        for side, df in sides.items():
            keep = df[name].notna()
            y, p = df.loc[keep, name].to_numpy(), df.loc[keep, f"prob_{name}"].to_numpy(np.float64)
            if len(set(y)) < 2:
                assert row[side]["auroc"] is None
                continue
            aucs[side] = roc_auc_score(y, p)
            assert row[side]["auroc"] == pytest.approx(aucs[side], abs=1e-12)
            low, high = _plain_patient_bootstrap(df[name].to_numpy(np.float64), df[f"prob_{name}"].to_numpy(np.float64),
                                                 df["patient_id"].tolist(), 40, 0)
            assert (row[side]["low"], row[side]["high"]) == pytest.approx((low, high), abs=1e-12)
            checked += 1
        if len(aucs) == 2:
            assert row["difference"] == pytest.approx(aucs["external"] - aucs["internal"], abs=1e-12)
        m = report["metrics"]["per_label"][name]
        if m["defined"]:
            keep = sides["external"][name].notna()
            assert m["auprc"] == pytest.approx(average_precision_score(
                sides["external"].loc[keep, name], sides["external"].loc[keep, f"prob_{name}"].astype(np.float64)), abs=1e-12)
    assert checked >= 3
    # Thresholds: Youden on the run's own valid split (the nih-16 valid keys), not on the external set.
    valid = pd.read_parquet(out / "valid_predictions.parquet")
    nih_valid = pd.read_parquet(sets["nih"] / "manifest.parquet").query("split == 'valid'")["key"]
    assert sorted(valid["key"]) == sorted(nih_valid)
    for name, thr in report["thresholds"]["per_label"].items():
        keep = valid[name].notna()
        fpr, tpr, cut = roc_curve(valid.loc[keep, name], valid.loc[keep, f"prob_{name}"].astype(np.float64))
        best = int(np.argmax(tpr - fpr))
        assert thr == (pytest.approx(float(cut[best])) if tpr[best] - fpr[best] > 0 else None)
    again = metrics_from_predictions(out / "predictions.parquet", out / "valid_predictions.parquet", n_boot=40)
    assert json.dumps(again, sort_keys=True) == json.dumps(report["metrics"], sort_keys=True)


def test_internal_numbers_predicted_when_run_eval_is_absent_equal_the_reused_ones(sets, tmp_path):
    copy = tmp_path / "nih-copy"
    shutil.copytree(sets["run"], copy, ignore=shutil.ignore_patterns("eval"))
    report = evaluate_run(copy, shards=str(sets["mimic"]), n_boot=40, device="cpu")
    assert report["external"]["internal"]["source"].startswith("predicted on the run's own shard set")
    assert not (copy / "eval" / "report.json").exists()   # RUN/eval itself is not written
    fresh = pd.read_parquet(copy / "eval" / "mimic-16" / "internal_predictions.parquet")
    reused = pd.read_parquet(sets["run"] / "eval" / "mimic-16" / "internal_predictions.parquet")
    pd.testing.assert_frame_equal(fresh, reused, check_exact=True)
    assert report["external"]["comparison"] == sets["report"]["external"]["comparison"]


def test_label_map_override_changes_the_match(sets, tmp_path):
    override = tmp_path / "map.csv"
    override.write_text("source,label,shared\nmimic,Pleural Effusion,Pleural Effusion\nmimic,Support Devices,Mass\n")
    result = CliRunner().invoke(_cli(), ["eval", "--run", str(sets["run"]), "--shards", str(sets["mimic"]),
                                         "--label-map", str(override), "--bootstrap", "10", "--device", "cpu",
                                         "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    labels = json.loads((tmp_path / "out" / "report.json").read_text())["external"]["labels"]
    assert [(m["run"], m["set"]) for m in labels["matched"]] == [("Atelectasis", "Atelectasis"), ("Mass", "Support Devices")]
    assert labels["run_only"] == ["Effusion", "No Finding"] and labels["set_only"] == ["Pleural Effusion"]
    assert "internal" in result.output and "external" in result.output and "Mass (Support Devices)" in result.output


def test_checkpoint_shared_labels_and_label_map_are_used(sets, tmp_path):
    """Contract with multi-set runs: a checkpoint's `shared_labels` and `label_map` win over the built-in map."""
    copy = tmp_path / "run"
    shutil.copytree(sets["run"], copy, ignore=shutil.ignore_patterns("eval"))
    state = torch.load(copy / "best.pt", weights_only=True)
    state["shared_labels"] = ["Atelectasis", "Effusion", "Devices", "No Finding"]   # run's Mass named Devices
    state["label_map"] = [{"source": "mimic", "label": "Support Devices", "shared": "Devices"}]  # no Effusion row
    torch.save(state, copy / "best.pt")
    labels = evaluate_run(copy, shards=str(sets["mimic"]), n_boot=0, device="cpu")["external"]["labels"]
    assert [(m["shared"], m["run"], m["set"]) for m in labels["matched"]] == [
        ("Atelectasis", "Atelectasis", "Atelectasis"), ("Devices", "Mass", "Support Devices")]
    assert labels["set_only"] == ["Pleural Effusion"]


def test_one_line_errors(sets):
    app = _cli()
    cases = [
        (["eval", "--run", str(sets["run"]), "--shards", str(sets["mimic32"])],
         "trained on 16 px: build the set at the run's size with `cxr shard build --source mimic --raw RAW --size 16`"),
        (["eval", "--run", str(sets["run"]), "--shards", str(sets["other"])], "share no label"),
    ]
    for args, needle in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert needle in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
