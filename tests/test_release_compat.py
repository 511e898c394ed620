"""Runs, checkpoints and reports of release 0.1 (commit RELEASE, before "one set is a mix of one") keep working.

The old side is made here, by the release's own code: `git archive RELEASE` into a temp folder, then a
subprocess that imports from there trains a one-set and a two-set resnet18 at 32 px on tiny hand-written sets,
evaluates each on its own test split and on another set (the four kinds of report), and predicts one PNG.
The new code then evaluates the same runs: every number of the old reports must come out the same; a one-set
run trained anew must end with identical weights; old runs must predict the same probabilities and resume.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.shardset_fixture import make_shard_set

# its module fixtures are costly: every test of this module runs on one xdist worker (`--dist loadgroup`)
pytestmark = pytest.mark.xdist_group("test_release_compat")

RELEASE = "52900492df3ba1fe466f0d2635181d29ea335b7f"
REPO = Path(__file__).resolve().parents[1]
RUN = dict(model="resnet18", epochs=2, batch_size=8, workers=0, lr=1e-3, device="cpu", format="wds")

OLD_SIDE = r"""
import json, sys
from pathlib import Path
from trainer.config import TrainConfig
from trainer.fitting import fit
from trainer.evaluate import evaluate_run
from trainer.predict import predict_images
nih, mimic, chex, png, out = sys.argv[1:6]
kw = json.loads(sys.argv[6])
one = fit(TrainConfig(shards=(nih,), out=out + "/one", **kw))
two = fit(TrainConfig(shards=(nih, mimic), out=out + "/two", mix="equal", **kw))
for run in (one, two):
    evaluate_run(run, device="cpu", n_boot=20, out=f"{out}/reports/{run.name}")
    evaluate_run(run, shards=chex, device="cpu", n_boot=20, out=f"{out}/reports/{run.name}-chex")
    Path(f"{out}/reports/{run.name}-predict.json").write_text(json.dumps(predict_images([png], run, device="cpu")))
"""


def _restamp(shard_dir: Path, **card) -> Path:
    path = shard_dir / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **card}, indent=2))
    return shard_dir


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", RELEASE + "^{commit}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"the release commit {RELEASE[:7]} is not in this clone's history (a shallow clone?)")
    tmp = tmp_path_factory.mktemp("release")
    old = tmp / "old"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", RELEASE], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    root = tmp / "shards"
    labels = ("Atelectasis", "Effusion", "No Finding")
    nih = _restamp(make_shard_set(root, "nih-32", size=32, labels=labels, counts={"train": 24, "valid": 10, "test": 8}),
                   source="nih", pixel_mean=0.5, pixel_std=0.25)
    mimic = _restamp(make_shard_set(root, "mimic-32", size=32, labels=("Atelectasis", "Pleural Effusion", "Edema"),
                                    formats=("wds",), counts={"train": 12, "valid": 8, "test": 6}),
                     source="mimic", pixel_mean=0.3, pixel_std=0.2)
    chex = _restamp(make_shard_set(root, "chex-32", size=32, labels=("Pleural Effusion", "Cardiomegaly"),
                                   counts={"train": 2, "valid": 2, "test": 12}), source="chexpert")
    png = tmp / "scan.png"
    cv2.imwrite(str(png), (np.arange(40 * 52).reshape(40, 52) % 251).astype(np.uint8))
    made = tmp / "made"
    subprocess.run([sys.executable, "-c", OLD_SIDE, str(nih), str(mimic), str(chex), str(png), str(made),
                    json.dumps(RUN)], cwd=old, check=True, capture_output=True, env={"PATH": "/usr/bin:/bin",
                                                                                      "OMP_NUM_THREADS": "1"})
    return {"nih": nih, "mimic": mimic, "chex": chex, "png": png, "made": made, "tmp": tmp}


def _copy_run(release, name: str, to: Path) -> Path:
    dest = to / name
    shutil.copytree(release["made"] / name, dest, ignore=shutil.ignore_patterns("eval"))
    return dest


def _numbers(tree, path=""):
    """Every number (and flag) of a JSON tree with its path."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool) or isinstance(tree, bool):
        yield path, tree


def _at(tree, path: str):
    import re

    for part in re.findall(r"/([^/\[]+)|\[(\d+)\]", path):
        key, index = part
        tree = tree[key] if key else tree[int(index)]
    return tree


@pytest.mark.parametrize("run,other", [("one", None), ("one", "chex"), ("two", None), ("two", "chex")])
def test_every_number_of_a_release_report_comes_out_the_same(release, tmp_path, run, other):
    from trainer.evaluation.pipeline import evaluate_run

    old = json.loads((release["made"] / "reports" / (run + (f"-{other}" if other else "")) / "report.json").read_text())
    new = evaluate_run(_copy_run(release, run, tmp_path), shards=release[other] if other else None, device="cpu",
                       n_boot=20, out=tmp_path / "new")
    new = json.loads(json.dumps(new))
    checked = 0
    for path, value in _numbers(old):
        if path.endswith("/seconds"):
            continue
        try:
            got = _at(new, path)
        except (KeyError, IndexError, TypeError):
            pytest.fail(f"{run} {other}: the new report has no {path} (release: {value!r})")
        assert got == value, f"{run} {other}: {path}: release {value!r}, now {got!r}"
        checked += 1
    assert checked > 50


def test_a_one_set_run_trains_to_the_release_weights_and_old_runs_resume(release, tmp_path):
    from trainer.checkpoint import load_checkpoint
    from trainer.config import TrainConfig
    from trainer.fitting import fit

    torch.set_num_threads(1)
    old = load_checkpoint(release["made"] / "one" / "last.pt")
    new_run = fit(TrainConfig(shards=(str(release["nih"]),), out=str(tmp_path / "new"), **RUN))
    new = load_checkpoint(new_run / "last.pt")
    assert (new["epoch"], new["step"]) == (old["epoch"], old["step"]) == (2, 6)
    assert new["normalize"] == old["normalize"] == [0.5, 0.25] and new["labels"] == old["labels"]
    for k, t in old["model"].items():
        assert torch.equal(t, new["model"][k]), k
    assert (new_run / "cards" / "nih-32.json").read_bytes() == (release["nih"] / "dataset.json").read_bytes()
    # the release's one-set run (card.json, no `sets`) and two-set run continue here, one more epoch each
    for name, shards in (("one", (str(release["nih"]),)), ("two", (str(release["nih"]), str(release["mimic"])))):
        run = _copy_run(release, name, tmp_path / "resumed")
        extra = {"mix": "equal"} if name == "two" else {}
        fit(TrainConfig(shards=shards, out=str(run), resume="last", **{**RUN, "epochs": 3}, **extra))
        rows = (run / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
        state = load_checkpoint(run / "last.pt")
        assert state["epoch"] == 3 and [s["name"] for s in state["sets"]] == [Path(s).name for s in shards]
    # resumed from the release's epoch 2 == trained here straight to epoch 3
    straight = fit(TrainConfig(shards=(str(release["nih"]),), out=str(tmp_path / "new"), resume="last",
                               **{**RUN, "epochs": 3}))
    a = load_checkpoint(straight / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "one" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("run", ["one", "two"])
def test_release_runs_predict_the_same_probabilities(release, tmp_path, run):
    from trainer.predict import predict_images

    old = json.loads((release["made"] / "reports" / f"{run}-predict.json").read_text())
    new = predict_images([release["png"]], _copy_run(release, run, tmp_path), device="cpu")
    assert new["labels"] == old["labels"]
    assert new["predictions"][0]["probabilities"] == old["predictions"][0]["probabilities"]
