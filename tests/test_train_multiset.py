"""One run over several shard sets (`cxrshards.mix`, `cxr train --shards A,B`, `cxr eval --run` of such a run),
on two tiny hand-written sets at 32 px: an NIH-like one (hdf5 read) and a MIMIC-like one (tars only) whose
`Pleural Effusion` is NIH's `Effusion` and which lacks `No Finding`."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cxrshards import mix
from manifests.labelmap import load_label_map
from tests.shardset_fixture import label_row, make_shard_set
from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.fitting import fit
from trainer.losses import masked_bce
from trainer.metrics import read_predictions

NIH_LABELS = ("Atelectasis", "Effusion", "No Finding")
MIMIC_LABELS = ("Atelectasis", "Pleural Effusion", "Edema")
UNION = ["Atelectasis", "Effusion", "No Finding", "Edema"]   # first set's order, then the next set's new names


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _restamp(shard_dir: Path, **card) -> Path:
    path = shard_dir / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **card}, indent=2))
    return shard_dir


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix-shards")
    nih = make_shard_set(root, "nih-32", size=32, labels=NIH_LABELS, counts={"train": 24, "valid": 10, "test": 8})
    mimic = make_shard_set(root, "mimic-32", size=32, labels=MIMIC_LABELS, formats=("wds",),
                           counts={"train": 12, "valid": 8, "test": 6})
    small = make_shard_set(root, "nih-16", size=16, counts={"train": 4, "valid": 2, "test": 2})
    chex = make_shard_set(root, "chex-32", size=32, labels=("Pleural Effusion", "Cardiomegaly"),
                          counts={"train": 2, "valid": 2, "test": 12})
    return {"nih": _restamp(nih, source="nih", pixel_mean=0.5, pixel_std=0.25),
            "mimic": _restamp(mimic, source="mimic", pixel_mean=0.3, pixel_std=0.2),
            "small": small, "chex": _restamp(chex, source="chexpert")}


def resolved(sets) -> list[mix.MixSet]:
    return mix.resolve_sets([sets["nih"], sets["mimic"]], None, load_label_map())


def small(sets, out: Path, **changes) -> TrainConfig:
    base = dict(shards=(str(sets["nih"]), str(sets["mimic"])), out=str(out), model="resnet18", epochs=2,
                batch_size=8, workers=0, lr=1e-3, device="cpu", mix="equal")
    base.update(changes)
    return TrainConfig(**base)


def cli_app():
    from cli.app import _register, app

    _register()
    return app


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- labels and the loss

def test_union_labels_nan_for_a_missing_label_and_no_loss_from_it(sets):
    ms = resolved(sets)
    assert mix.run_labels(ms) == mix.RunLabels(UNION, UNION)
    # each label is named as the first set holding it names it: MIMIC first keeps its Pleural Effusion
    assert mix.run_labels(ms[::-1]) == mix.RunLabels(["Atelectasis", "Pleural Effusion", "Edema", "No Finding"],
                                                     ["Atelectasis", "Effusion", "Edema", "No Finding"])
    stream = mix.open_mix(ms, "train", UNION, shuffle=False, batch_size=36, rank=0, world_size=1)
    images, y, keys = next(iter(stream))
    assert len(keys) == 36 and len(set(keys)) == 36 and {k.split("/")[0] for k in keys} == {"nih-32", "mimic-32"}
    for row, key in zip(y.numpy(), keys):
        name, raw = key.split("/")
        if name == "nih-32":
            want = dict(zip(NIH_LABELS, label_row(raw, NIH_LABELS)), Edema=np.nan)
        else:   # MIMIC's Pleural Effusion is the run's Effusion; it has no No Finding: NaN, never a negative
            got = dict(zip(MIMIC_LABELS, label_row(raw, MIMIC_LABELS)))
            want = {"Atelectasis": got["Atelectasis"], "Effusion": got["Pleural Effusion"],
                    "No Finding": np.nan, "Edema": got["Edema"]}
        np.testing.assert_array_equal(row, np.array([want[n] for n in UNION], np.float32))

    # The loss: mean BCE over the labelled entries only; the entries a set lacks get zero gradient.
    logits = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = masked_bce(logits, y)
    loss.backward()
    known = ~torch.isnan(y)
    p, t = torch.sigmoid(logits.detach().double()), torch.nan_to_num(y.double())
    per = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    assert loss.item() == pytest.approx(per[known].mean().item(), rel=1e-6)
    missing = torch.zeros_like(known)
    missing[[i for i, k in enumerate(keys) if k.startswith("mimic-32/")], UNION.index("No Finding")] = True
    assert missing.any() and torch.all(logits.grad[missing] == 0)
    np.testing.assert_allclose(logits.grad[known].numpy(), ((p - t) / known.sum()).numpy()[known.numpy()],
                               rtol=1e-5)


# --------------------------------------------------------------------------- --mix counts and the order

def _epoch_keys(ms, mix_rule: str, epoch: int, seed: int = 0) -> list[str]:
    stream = mix.open_mix(ms, "train", UNION, mix=mix_rule, seed=seed, epoch=epoch, batch_size=5, rank=0, world_size=1)
    batches = list(stream)
    assert len(batches) == len(stream)
    return [k for _, _, keys in batches for k in keys]


@pytest.mark.parametrize("rule,expected", [("proportional", {"nih-32": 24, "mimic-32": 12}),
                                           ("equal", {"nih-32": 12, "mimic-32": 12}),
                                           ("1,2", {"nih-32": 6, "mimic-32": 12}),
                                           ("1,1", {"nih-32": 12, "mimic-32": 12})])
def test_mix_counts_per_epoch_redrawn_and_reproducible(sets, rule, expected):
    ms = resolved(sets)
    e0, e1 = _epoch_keys(ms, rule, 0), _epoch_keys(ms, rule, 1)
    for keys in (e0, e1):
        assert len(set(keys)) == len(keys)   # without replacement
        assert {n: sum(k.startswith(n + "/") for k in keys) for n in expected} == expected
    assert _epoch_keys(ms, rule, 1) == e1    # the same (seed, epoch): the same samples in the same order
    assert e0 != e1                           # the order (and any draw) changes with the epoch
    if expected["nih-32"] < 24:               # a draw from NIH: other samples next epoch
        nih0, nih1 = ({k for k in e if k.startswith("nih-32/")} for e in (e0, e1))
        assert nih0 != nih1


def test_two_ranks_two_workers_equal_batches_each_sample_once(sets):
    ms = resolved(sets)
    seen, lengths = [], []
    for rank in range(2):
        stream = mix.open_mix(ms, "train", UNION, mix="equal", epoch=3, batch_size=5, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        batches = list(loader)
        assert len(batches) == len(stream)
        lengths.append(len(batches))
        seen += [k for _, _, keys in batches for k in keys]
    assert lengths[0] == lengths[1]
    one = mix.open_mix(ms, "train", UNION, mix="equal", epoch=3, batch_size=5, rank=0, world_size=1)
    assert sorted(seen) == sorted(k for _, _, keys in one for k in keys)   # the epoch's selection, once each
    assert len(seen) == len(set(seen)) == 24


# --------------------------------------------------------------------------- sets that cannot meet

def test_different_image_sizes_are_one_line_error(sets):
    with pytest.raises(mix.MixError, match=r"different image sizes .*nih-32 32 px, nih-16 16 px"):
        mix.resolve_sets([sets["nih"], sets["small"]], None, load_label_map())
    result = CliRunner().invoke(cli_app(), ["train", "--shards", str(sets["nih"]), "--shards", str(sets["small"]),
                                      "--out", "unused-run", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "nih-16 16 px" in result.output
    assert "Traceback" not in result.output


def test_config_keeps_a_single_set_a_string():
    old = TrainConfig.from_dict({"shards": "nih-224", "out": "r"})
    assert old.shards == ("nih-224",) and old.to_dict()["shards"] == "nih-224"
    two = TrainConfig.from_dict({"shards": "nih-224,mimic-224", "out": "r", "mix": "2,1"})
    assert two.shards == ("nih-224", "mimic-224") and two.to_dict()["shards"] == ["nih-224", "mimic-224"]
    with pytest.raises(Exception, match="1 weight"):
        TrainConfig.from_dict({"shards": ["a", "b"], "mix": "2"})


# --------------------------------------------------------------------------- normalisation

def test_pooled_normalisation_is_the_std_of_all_pixels_together():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 0.9, 300), rng.uniform(0.0, 0.4, 100)
    cards = [mix.MixSet(n, Path(n), {"pixel_mean": float(x.mean()), "pixel_std": float(x.std()),
                                     "splits": {"train": {"count": len(x)}}}, ())
             for n, x in (("a", a), ("b", b))]
    mean, std = mix.pooled_normalisation(cards)
    both = np.concatenate([a, b])
    assert mean == pytest.approx(both.mean(), abs=1e-12) and std == pytest.approx(both.std(), abs=1e-12)


# --------------------------------------------------------------------------- training runs

def test_two_set_run_is_deterministic_and_resumes_bit_exactly(sets, tmp_path):
    straight = fit(small(sets, tmp_path / "a"))
    again = fit(small(sets, tmp_path / "b"))
    fit(small(sets, tmp_path / "c", epochs=1))
    resumed = fit(small(sets, tmp_path / "c", epochs=2, resume="last"))
    a, b, c = (load_checkpoint(r / "last.pt") for r in (straight, again, resumed))
    for other in (b, c):
        assert (other["epoch"], other["step"]) == (a["epoch"], a["step"]) == (2, 6)   # 24 samples a epoch / 8
        for k, t in a["model"].items():
            assert torch.equal(t, other["model"][k]), k
    assert a["labels"] == a["shared_labels"] == UNION
    assert [s["name"] for s in a["sets"]] == ["nih-32", "mimic-32"]
    assert {(r["source"], r["label"], r["shared"]) for r in a["label_map"]} >= {("mimic", "Pleural Effusion", "Effusion")}
    n_nih, n_mimic = 24, 12   # the cards' train stats pooled (0.5/0.25 and 0.3/0.2)
    mean = (n_nih * 0.5 + n_mimic * 0.3) / 36
    var = (n_nih * (0.25 ** 2 + (0.5 - mean) ** 2) + n_mimic * (0.2 ** 2 + (0.3 - mean) ** 2)) / 36
    assert a["normalize"] == pytest.approx([mean, math.sqrt(var)])
    assert sorted(p.name for p in (straight / "cards").iterdir()) == ["mimic-32.json", "nih-32.json"]
    assert not (straight / "card.json").exists()


@pytest.fixture(scope="module")
def selected_run(sets, tmp_path_factory) -> Path:
    return fit(small(sets, tmp_path_factory.mktemp("sel") / "run", epochs=3, select_on="mimic-32"))


def _valid_macro(run: Path, ms, name: str) -> float:
    from trainer.loop import predict
    from trainer.predict import load_run

    loaded = load_run(run, "last", "cpu")
    inf = loaded.inference
    stream = mix.open_mix(ms, "valid", UNION, shuffle=False, batch_size=8, rank=0, world_size=1)
    probs, y, keys = predict(inf.model, stream, loaded.device, mean=inf.mean, std=inf.std, gather=False)
    rows = np.array([k.startswith(name + "/") for k in keys]) if name else np.ones(len(keys), bool)
    aurocs = []
    for j in range(y.shape[1]):
        yy, pp = y[rows, j], probs[rows, j]
        keep = ~np.isnan(yy)
        if len(set(yy[keep].tolist())) == 2:
            aurocs.append(roc_auc_score(yy[keep], pp[keep]))
    return float(np.mean(aurocs))


def test_metrics_csv_has_a_column_per_set_and_select_on_picks_best(sets, selected_run):
    rows = metrics(selected_run)
    assert {"val_auroc_macro", "val_auroc_macro_nih-32", "val_auroc_macro_mimic-32"} <= set(rows[0])
    ms = resolved(sets)
    for name, column in (("nih-32", "val_auroc_macro_nih-32"), ("mimic-32", "val_auroc_macro_mimic-32"),
                         ("", "val_auroc_macro")):
        assert float(rows[-1][column]) == pytest.approx(_valid_macro(selected_run, ms, name), abs=1e-5)
    best = load_checkpoint(selected_run / "best.pt")
    by_mimic = [float(r["val_auroc_macro_mimic-32"]) for r in rows]
    assert best["best_epoch"] == int(np.argmax(by_mimic)) + 1
    assert best["best_metric"] == pytest.approx(max(by_mimic), abs=1e-5)


def test_eval_of_a_multiset_run_per_set_and_pooled_equal_sklearn(sets, selected_run, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli_app(), ["eval", "--run", str(selected_run), "--out", str(out), "--device", "cpu",
                                      "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    assert "nih-32" in result.output and "mimic-32" in result.output and "pooled" in result.output
    report = json.loads((out / "report.json").read_text())
    df, labels = read_predictions(out / "predictions.parquet")
    assert labels == UNION and len(df) == 8 + 6
    parts = {"nih-32": df[df["set"] == "nih-32"], "mimic-32": df[df["set"] == "mimic-32"]}
    assert {n: len(p) for n, p in parts.items()} == {"nih-32": 8, "mimic-32": 6}
    assert parts["mimic-32"]["No Finding"].isna().all()
    for name, part, m in [(n, p, report["per_set"][n]["metrics"]) for n, p in parts.items()] + \
            [("pooled", df, report["metrics"])]:
        assert m["n_samples"] == len(part), name
        defined = []
        for label in UNION:
            y, p = part[label].to_numpy(), part["prob_" + label].to_numpy()
            keep = ~np.isnan(y)
            if len(set(y[keep].tolist())) < 2:
                assert m["per_label"][label]["auroc"] is None, (name, label)
                continue
            want = roc_auc_score(y[keep], p[keep])
            defined.append(want)
            assert m["per_label"][label]["auroc"] == pytest.approx(want, abs=1e-12), (name, label)
        assert m["macro_auroc"] == pytest.approx(np.mean(defined), abs=1e-12), name
    assert "## Per shard set" in (out / "report.md").read_text()


def test_external_eval_of_a_multiset_run_compares_with_its_pooled_test(sets, selected_run):
    from trainer.evaluation.pipeline import evaluate_run

    assert not (selected_run / "eval" / "report.json").exists()
    first = evaluate_run(selected_run, shards=str(sets["chex"]), device="cpu", n_boot=20)
    assert not (selected_run / "eval" / "report.json").exists()              # RUN/eval is never written by it
    assert "predicted on the run's own shard sets (nih-32+mimic-32)" == first["external"]["internal"]["source"]
    own = evaluate_run(selected_run, device="cpu", n_boot=20)
    assert sorted(own["per_set"]) == ["mimic-32", "nih-32"]
    again = evaluate_run(selected_run, shards=str(sets["chex"]), device="cpu", n_boot=20)
    assert "reused" in again["external"]["internal"]["source"]
    assert again["external"]["comparison"] == first["external"]["comparison"]
    for report in (first, again):
        ext = report["external"]
        assert [(m["shared"], m["set"]) for m in ext["labels"]["matched"]] == [("Effusion", "Pleural Effusion")]
        assert ext["run_shard_set"]["name"] == "nih-32+mimic-32"
        assert ext["internal"]["metrics"]["per_label"]["Effusion"]["auroc"] == \
            pytest.approx(own["metrics"]["per_label"]["Effusion"]["auroc"], abs=1e-12)
        df, _ = read_predictions(selected_run / "eval" / "chex-32" / "predictions.parquet")
        keep = ~df["Effusion"].isna()
        assert report["metrics"]["per_label"]["Effusion"]["auroc"] == pytest.approx(
            roc_auc_score(df.loc[keep, "Effusion"], df.loc[keep, "prob_Effusion"]), abs=1e-12)
