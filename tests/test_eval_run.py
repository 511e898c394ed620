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


def test_eval_by_sex_and_age_after_a_mimic_iv_style_demographics_join(tiny_run, tmp_path):
    """`cxr eval --by sex,age,race --demographics patients.csv.gz` (MIMIC-IV columns as they are) and a second table
    by --demographics-key: the joined columns land in predictions.parquet, every group count and AUROC equals a
    direct computation on that file, calibration equals sklearn's Brier, report.html embeds every figure."""
    import base64
    import gzip
    import re

    from sklearn.metrics import brier_score_loss

    root, shard_dir, run = tiny_run
    manifest = pd.read_parquet(shard_dir / "manifest.parquet")
    patients = sorted(manifest["patient_id"].astype(str).unique())
    rows = ["subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod"]
    rows += [f"{p},{'F' if i % 2 else 'M'},{(25, 50, 75)[i % 3]},2150,2008 - 2010," for i, p in enumerate(patients)]
    table = tmp_path / "patients.csv.gz"
    table.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    out = tmp_path / "eval"
    args = ["eval", "--run", str(run), "--out", str(out), "--device", "cpu", "--bootstrap", "30", "--by", "sex,age",
            "--min-group", "1", "--demographics", str(table), "--age-bands", "0,40,60"]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert "by sex" in result.output and "by age" in result.output and str(out / "report.html") in result.output
    df = pd.read_parquet(out / "predictions.parquet")
    want = {p: ("F" if i % 2 else "M", float((25, 50, 75)[i % 3])) for i, p in enumerate(patients)}
    assert [(s, a) for s, a in zip(df["sex"], df["age"])] == [want[p] for p in df["patient_id"]]
    report = json.loads((out / "report.json").read_text())
    sex, age = report["subgroups"]["columns"]
    assert [(g["value"], g["images"]) for g in sex["groups"]] == [(v, int((df["sex"] == v).sum())) for v in ("F", "M")]
    bands = {"[0,40)": df["age"] < 40, "[40,60)": (df["age"] >= 40) & (df["age"] < 60), "60+": df["age"] >= 60}
    assert {g["value"]: g["images"] for g in age["groups"]} == {k: int(v.sum()) for k, v in bands.items()}
    assert sum(v.any() for v in bands.values()) >= 2
    labels = report["metrics"]["labels"]
    for g in sex["groups"]:
        part = df[df["sex"] == g["value"]]
        for name in labels:
            keep = ~part[name].isna()
            y, p = part.loc[keep, name].to_numpy(), part.loc[keep, "prob_" + name].to_numpy()
            if g["per_label"][name]["auroc"] is not None:
                assert g["per_label"][name]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
    for name in labels:
        keep = ~df[name].isna()
        assert report["calibration"]["per_label"][name]["brier"]["value"] == pytest.approx(
            brier_score_loss(df.loc[keep, name], df.loc[keep, "prob_" + name]), abs=1e-6)
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert {base64.b64decode(e) for e in embedded} >= {(out / f).read_bytes() for f in
                                                        ("roc.png", "pr.png", "calibration.png", "subgroups.png")}
    # a table keyed by another column: its other columns become groups; a missing key column is one line
    extra = tmp_path / "race.csv"
    extra.write_text("pid,race\n" + "".join(f"{p},{'A' if i % 3 else 'B'}\n" for i, p in enumerate(patients)))
    result = CliRunner().invoke(_cli(), [*args[:-6], "--by", "race", "--demographics", str(extra),
                                         "--demographics-key", "pid", "--min-group", "1"])
    assert result.exit_code == 0, result.output
    assert [c["column"] for c in json.loads((out / "report.json").read_text())["subgroups"]["columns"]] == ["race"]
    result = CliRunner().invoke(_cli(), [*args[:-6], "--by", "race", "--demographics", str(extra),
                                         "--demographics-key", "patient"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and "race.csv" in result.output and "patient" in result.output
