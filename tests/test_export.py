"""`cxr export` and `cxr predict --model`: onnxruntime and TorchScript give PyTorch's probabilities (two
architectures, both heads), `--model` does not import torch and its --json equals `--run`'s, model.json says
what a deployment needs, and every bad input is one line."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.shardset_fixture import make_shard_set
from trainer.config import TrainConfig

# its module fixtures are costly: every test of this module runs on one xdist worker (`--dist loadgroup`)
pytestmark = pytest.mark.xdist_group("test_export")

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
pytest.importorskip("onnxruntime", reason="the export extra: pip install 'cxr[export]'")
pytest.importorskip("onnxscript", reason="the export extra: pip install 'cxr[export]'")

# resnet18 multilabel (sigmoid head) and densenet121 binary with 2 logits (softmax head)
ARCHS = {"resnet18": dict(model="resnet18"),
         "densenet121": dict(model="densenet121", labels=["Cardiomegaly"], loss="ce")}


def _cli():
    from cli.app import _register, app

    _register()
    return app


def _write_dicom(path: Path, stored: np.ndarray) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.826.0.1.3680043.8.498.7", "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _images(folder: Path) -> list[Path]:
    """Raw files of several kinds and shapes: 8-bit PNGs, a 16-bit PNG, a colour JPEG, a 12-bit DICOM."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([22, 1])
    smooth = lambda h, w: cv2.resize(rng.integers(0, 256, (6, 6)).astype(np.float32), (w, h))  # noqa: E731
    paths = []
    for i, (h, w) in enumerate([(96, 80), (64, 64), (40, 120)]):
        img = np.clip(smooth(h, w) + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)
        paths.append(folder / f"gray{i}.png")
        cv2.imwrite(str(paths[-1]), img)
    paths.append(folder / "deep.png")
    cv2.imwrite(str(paths[-1]), (smooth(70, 50) * 200).astype(np.uint16))
    paths.append(folder / "colour.jpg")
    cv2.imwrite(str(paths[-1]), np.stack([smooth(50, 60)] * 3, -1).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    paths.append(_write_dicom(folder / "film.dcm", (smooth(80, 72) * 16).astype(np.uint16)))
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{arch: (run, export dir)}: a 1-epoch run at 32 px per architecture, exported to both formats."""
    torch.set_num_threads(1)
    from trainer.export import export_run
    from trainer.fitting import fit

    root = tmp_path_factory.mktemp("export")
    shard_dir = make_shard_set(root / "shards", "fx-32", counts={"train": 8, "valid": 6, "test": 4}, size=32)
    out = {}
    for arch, extra in ARCHS.items():
        run = root / "runs" / arch
        fit(TrainConfig(shards=str(shard_dir), out=str(run), epochs=1, batch_size=4, workers=0, device="cpu",
                        lr=1e-3, augment="none", quiet=True, **extra))
        export_run(run, root / "exports" / arch, fmt="both")
        out[arch] = (run, root / "exports" / arch)
    return root, shard_dir, out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_onnx_and_torchscript_give_pytorchs_probabilities(runs, arch):
    from trainer.predict import load_run, predict_tensor
    from trainer.runtime import load_export, normalize, image_pixels

    root, _shards, by_arch = runs
    run, export = by_arch[arch]
    images = _images(root / "images")
    loaded = load_run(run, "best", "cpu")
    x = torch.cat([predict_tensor(p, loaded) for p in images])              # the --run path's model input
    with torch.no_grad():
        logits = loaded.inference.model(x)
    expected = (torch.softmax(logits, 1)[:, 1:] if loaded.inference.head == "softmax" else torch.sigmoid(logits)).numpy()

    exported = load_export(export)
    pre = exported.meta["preprocessing"]
    x_np = normalize(np.stack([image_pixels(p, pre) for p in images]), pre["mean"], pre["std"])
    np.testing.assert_allclose(x_np, x.numpy(), atol=1e-6)                   # the same input, without torch
    onnx_probs = exported.probabilities(x_np)                               # a batch of 6: N is dynamic
    assert onnx_probs.shape == expected.shape
    np.testing.assert_allclose(onnx_probs, expected, atol=TOL, rtol=0)
    with warnings.catch_warnings():    # torch.jit is deprecated in favour of torch.export; it still loads
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(export / "model.ts"))
    with torch.no_grad():
        np.testing.assert_allclose(ts(torch.from_numpy(x_np)).numpy(), expected, atol=TOL, rtol=0)
    assert float(expected.std()) > 0   # the images differ: a constant output would prove nothing


@pytest.mark.parametrize("arch", list(ARCHS))
def test_predict_model_json_equals_predict_run_json(runs, arch):
    root, _shards, by_arch = runs
    run, export = by_arch[arch]
    images = [str(p) for p in _images(root / "images")]
    got = {}
    for flag, value in (("--run", str(run)), ("--model", str(export))):
        result = CliRunner().invoke(_cli(), ["predict", *images, flag, value, "--json"]
                                    + (["--device", "cpu"] if flag == "--run" else []))
        assert result.exit_code == 0, result.output
        got[flag] = json.loads(result.output)
    by_run, by_model = got["--run"], got["--model"]
    assert {k: v for k, v in by_model.items() if k != "predictions"} == \
        {k: v for k, v in by_run.items() if k != "predictions"}
    assert [p["image"] for p in by_model["predictions"]] == images
    for a, b in zip(by_run["predictions"], by_model["predictions"]):
        assert a.keys() == b.keys() and a["probabilities"].keys() == b["probabilities"].keys()
        for name, p in a["probabilities"].items():
            assert b["probabilities"][name] == pytest.approx(p, abs=TOL)


def test_predict_model_does_not_import_torch(runs):
    root, _shards, by_arch = runs
    _run, export = by_arch["resnet18"]
    images = [str(p) for p in _images(root / "images")]
    code = ("import json, sys\nfrom cli.app import main\n"
            f"sys.argv = ['cxr', 'predict', *{images!r}, '--model', {str(export)!r}, '--json']\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'pandas'))\n"
            "print(json.dumps(heavy), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["predictions"]) == len(images)
    assert json.loads(out.stderr.strip().splitlines()[-1]) == [], "imported by cxr predict --model"


def test_model_json_says_what_a_deployment_needs(runs):
    from trainer.evaluation.pipeline import evaluate_run
    from trainer.export import export_run

    root, shard_dir, by_arch = runs
    run, export = by_arch["resnet18"]
    meta = json.loads((export / "model.json").read_text())
    card = json.loads((shard_dir / "dataset.json").read_text())
    assert [e["name"] for e in meta["labels"]] == list(card["labels"]) == meta["output"]["columns"]
    assert [e["shared"] for e in meta["labels"]] == ["Atelectasis", "Cardiomegaly", "No Finding"]
    assert (meta["task"], meta["head"]) == ("multilabel", "sigmoid")
    pre = meta["preprocessing"]
    assert (pre["size"], pre["fit"], pre["codec"], pre["jpeg_quality"]) == (32, card["fit"], card["codec"], 95)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert [pre["mean"], pre["std"]] == list(ckpt["normalize"]) and "MONOCHROME1" in pre["gray"]
    assert meta["input"] == {"name": "image", "dtype": "float32", "shape": ["N", 1, 32, 32], "dynamic": ["N"],
                             "layout": meta["input"]["layout"]}
    assert meta["output"]["shape"] == ["N", 3] and meta["output"]["activation"].startswith("sigmoid")
    assert meta["checkpoint"]["sha256"] == hashlib.sha256((run / "best.pt").read_bytes()).hexdigest()
    for name in ("model.onnx", "model.ts"):
        assert meta["files"][name]["sha256"] == hashlib.sha256((export / name).read_bytes()).hexdigest()
    assert meta["opset"] == meta["files"]["model.onnx"]["opset"] >= 17
    assert {"torch", "onnx", "onnxruntime", "cxr"} <= set(meta["versions"])
    assert meta["thresholds"]["per_label"] is None and "cxr eval" in meta["thresholds"]["note"]
    assert "onnxruntime" in (export / "README.md").read_text()

    report = evaluate_run(run, n_boot=0, device="cpu", gallery=False)      # now the thresholds exist
    again = export_run(run, root / "exports" / "evaluated", fmt="onnx")
    assert again["thresholds"]["source"] == "valid"
    assert again["thresholds"]["per_label"] == report["thresholds"]["per_label"]
    assert list(again["files"]) == ["model.onnx"]
    last = export_run(run, root / "exports" / "evaluated", ckpt="last", fmt="torchscript")   # another checkpoint
    assert sorted(p.name for p in (root / "exports" / "evaluated").iterdir()) == ["README.md", "model.json", "model.ts"]
    assert last["checkpoint"]["sha256"] != again["checkpoint"]["sha256"]
    assert last["thresholds"]["per_label"] is None and "another checkpoint" in last["thresholds"]["note"]


def _error(args) -> str:
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 1, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and len(text.splitlines()) == 1, result.output
    return text


def test_bad_inputs_get_one_line(runs, tmp_path):
    root, _shards, by_arch = runs
    run, export = by_arch["resnet18"]
    image = str(_images(root / "images")[0])
    assert "no export folder" in _error(["predict", image, "--model", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "not an export folder (no model.json)" in _error(["predict", image, "--model", str(tmp_path / "empty")])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.json", "model.onnx"):
        (broken / name).write_bytes((export / name).read_bytes())
    (broken / "model.onnx").write_bytes(by_arch["densenet121"][1].joinpath("model.onnx").read_bytes())
    assert "does not match" in _error(["predict", image, "--model", str(broken)])
    (tmp_path / "scan.png").write_bytes(b"not a png at all")
    assert "scan.png" in _error(["predict", str(tmp_path / "scan.png"), "--model", str(export)])
    assert "--cam needs the run" in _error(["predict", image, "--model", str(export), "--cam", str(tmp_path / "c")])
    assert "no run at" in _error(["export", "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "e")])
    assert "--format" in _error(["export", "--run", str(run), "--out", str(tmp_path / "e"), "--format", "tf"])


def test_a_missing_extra_names_it(monkeypatch, runs):
    from trainer.runtime import ExportError, load_export

    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # what `import onnxruntime` meets when absent
    with pytest.raises(ExportError, match=r"pip install 'cxr\[export\]'"):
        load_export(runs[2]["resnet18"][1])


def test_predict_run_imports_only_what_scoring_needs(runs):
    """No pandas, no torchvision detection ops (and through them torch._dynamo), and a later import of
    torchvision is the complete one."""
    root, _shards, by_arch = runs
    run, _export = by_arch["resnet18"]
    image = str(_images(root / "images")[0])
    code = ("import json, sys\nfrom trainer.predict import predict_images\n"
            f"first = predict_images([{image!r}], {str(run)!r}, device='cpu')\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'torchvision') "
            "or m.startswith('torch._dynamo'))\n"
            "import torchvision\nfrom trainer.predict import predict_images as again\n"
            f"second = again([{image!r}], {str(run)!r}, device='cpu')\n"
            "print(json.dumps([loaded, first == second, torchvision.models.resnet18 is not None, "
            "'torchvision.ops' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], True, True, True]
