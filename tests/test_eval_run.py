"""End to end: a tiny trained run -> `cxr eval` -> RUN/eval/, numbers equal sklearn's on the saved
predictions; missing run / checkpoint / shard set and a shard set of another size give one-line errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from tests.shardset_fixture import make_shard_set
from trainer.config import TrainConfig
from trainer.evaluation.pipeline import evaluate_run
from trainer.metrics import metrics_from_predictions


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    torch.set_num_threads(1)
    from trainer.fitting import fit

    root = tmp_path_factory.mktemp("eval")
    shard_dir = make_shard_set(root / "shards", "fx-16", counts={"train": 24, "valid": 12, "test": 16})
    run = root / "runs" / "tiny"
    fit(TrainConfig(shards=str(shard_dir), out=str(run), model="resnet18", epochs=1, batch_size=8,
                    workers=0, device="cpu", lr=1e-3, augment="none"))
    return root, shard_dir, run


def _cli():
    from cli.app import _register, app

    _register()
    return app


def test_evaluate_run_writes_report_equal_to_sklearn(tiny_run):
    root, shard_dir, run = tiny_run
    report = evaluate_run(run, n_boot=50, device="cpu")
    out = run / "eval"
    for name in ("report.json", "report.md", "predictions.parquet", "valid_predictions.parquet", "roc.png", "pr.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(report["metrics"]))
    assert saved["shard_set"]["card_sha256"] and saved["checkpoint"]["path"].endswith("best.pt")

    df = pd.read_parquet(out / "predictions.parquet")
    labels = report["metrics"]["labels"]
    assert list(df.columns) == ["key", "patient_id", "split", "set", "view", "sex", "age", *labels,
                                *[f"prob_{n}" for n in labels]]
    assert len(df) == 16 and df["key"].is_monotonic_increasing
    manifest = pd.read_parquet(shard_dir / "manifest.parquet").set_index("key")
    assert (df["patient_id"].to_numpy() == manifest.loc[df["key"], "patient_id"].to_numpy()).all()
    np.testing.assert_array_equal(df[labels].to_numpy(), manifest.loc[df["key"], labels].to_numpy())

    m = report["metrics"]
    aucs = []
    for name in labels:
        keep = df[name].notna()
        y, p = df.loc[keep, name].to_numpy(), df.loc[keep, f"prob_{name}"].to_numpy(np.float64)
        entry = m["per_label"][name]
        if len(set(y)) < 2:
            assert entry["auroc"] is None and name in m["undefined_labels"]
            continue
        assert entry["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert entry["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
        aucs.append(roc_auc_score(y, p))
    assert m["macro_auroc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    # The same numbers again from the two saved files alone.
    again = metrics_from_predictions(out / "predictions.parquet", out / "valid_predictions.parquet", n_boot=50)
    assert json.dumps(again, sort_keys=True) == json.dumps(m, sort_keys=True)


def test_cli_eval_prints_table(tiny_run):
    root, shard_dir, run = tiny_run
    result = CliRunner().invoke(_cli(), ["eval", "--run", str(run), "--ckpt", "last", "--bootstrap", "20",
                                         "--device", "cpu", "--out", str(root / "eval-last")])
    assert result.exit_code == 0, result.output
    assert "macro" in result.output and "Cardiomegaly" in result.output
    assert (root / "eval-last" / "report.md").is_file()


def test_one_line_errors(tiny_run, tmp_path):
    root, shard_dir, run = tiny_run
    app = _cli()
    other = make_shard_set(tmp_path, "other-8", counts={"train": 4, "valid": 2, "test": 2}, size=8, seed=3)
    no_best = tmp_path / "no-best"
    no_best.mkdir()
    shutil.copy(run / "config.json", no_best / "config.json")
    cases = [
        (["eval", "--run", str(tmp_path / "nope")], "train one first with `cxr train"),
        (["eval", "--run", ""], "run `make demo` or `cxr train"),
        (["eval", "--run", str(no_best)], "has not finished an epoch"),
        (["eval", "--run", str(run), "--ckpt", str(tmp_path / "x.pt")], "no checkpoint at"),
        (["eval", "--run", str(run), "--shards", str(tmp_path / "missing-16")], "build it first with `cxr shard build"),
        # another shard set is an external evaluation (tests/test_eval_external.py); another size cannot be
        (["eval", "--run", str(run), "--shards", str(other)], "--size 16"),
        (["predict", str(tmp_path / "a.png"), "--run", str(tmp_path / "nope")], "train one first"),
    ]
    for args, needle in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert needle in result.output, (args, result.output)
        assert "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_eval_keeps_the_views_the_run_trained_on(tiny_run):
    """A run trained with `--views` is evaluated on those views only; views absent from the split are an error."""
    from cxrshards import mix
    from manifests.labelmap import load_label_map
    from trainer.evaluation.score import manifest_context, select_keys

    root, shard_dir, run = tiny_run
    sets = mix.resolve_sets([shard_dir], None, load_label_map())
    context = manifest_context(sets)
    manifest = pd.read_parquet(shard_dir / "manifest.parquet")
    test_keys = sorted(f"{sets[0].name}/{k}" for k in manifest.loc[manifest["split"] == "test", "key"])
    assert sorted(select_keys(context, "test", ())[0]) == test_keys
    assert sorted(select_keys(context, "test", ("PA",))[0]) == test_keys
    assert select_keys(context, "test", ("AP",)) == ([], [])
    keys, notes = select_keys(context.assign(view=None), "test", ("AP",))
    assert (sorted(keys), notes) == (test_keys, [f"{sets[0].name} records no views, so all its test "
                                                                 f"images are used (the run was trained on views AP)"])
