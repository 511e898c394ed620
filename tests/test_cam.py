"""Grad-CAM heatmaps: equal to a hand computation on the exact model input, and `cxr predict --cam`."""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tests.test_predict import NAMES, real_run  # noqa: F401 - the module fixture (a tiny real-NIH run)
from trainer.cam import choose_labels, gradcam, label_heatmaps, output_index
from trainer.models import build_model
from trainer.predict import load_run, predict_tensor


def hand_gradcam(model, x, out_index, layer=None):
    """Grad-CAM by hand: ReLU(sum_k mean(dY/dA_k) A_k) at `layer` (layer4[-1]), bilinear to the input, min-max."""
    store = {}
    layer = layer or model.layer4[-1]
    h1 = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    model.eval()
    x = x.clone().requires_grad_(True)
    y = model(x)[0, out_index]
    h1.remove()
    grad = torch.autograd.grad(y, store["a"])[0]
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * store["a"]).sum(1))[0].detach().numpy()
    cam = cv2.resize(cam, x.shape[-2:][::-1])   # what the package does: cv2 bilinear to the input size
    cam = cam - cam.min()
    return cam / (cam.max() + 1e-7)


def test_gradcam_equals_a_hand_computation():
    model = build_model("resnet18", 3, seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 64, 64, generator=gen)
    x[..., :, :32] += 2.0                     # left-right asymmetric
    for j in range(3):
        np.testing.assert_allclose(gradcam(model, x, [j])[0], hand_gradcam(model, x, j), atol=1e-4)
    both = label_heatmaps(model, x, "sigmoid", [2, 0])
    np.testing.assert_allclose(both[0], hand_gradcam(model, x, 2), atol=1e-4)
    np.testing.assert_allclose(both[1], hand_gradcam(model, x, 0), atol=1e-4)
    np.testing.assert_allclose(gradcam(model, x, [1], model.layer3[-1])[0], hand_gradcam(model, x, 1, model.layer3[-1]),
                               atol=1e-4)


def test_targets_and_label_choice():
    assert [output_index("sigmoid", 4), output_index("softmax", 0), output_index("single", 0)] == [4, 1, 0]
    assert choose_labels(["a", "b", "c", "d"], np.array([0.1, 0.9, 0.5, 0.7]), top=2) == [1, 3]
    assert choose_labels(["a", "b"], np.array([0.1, 0.9]), ["a"]) == [0]


def test_predict_cam_writes_a_figure_per_image_from_the_predicted_input(real_run, tmp_path):  # noqa: F811
    from cli.app import _register, app

    _register()
    _tmp, raw, _shard_dir, run = real_run
    paths = [str(raw / "images_001" / "images" / n) for n in NAMES[:2]]
    result = CliRunner().invoke(app, ["predict", *paths, "--run", str(run), "--device", "cpu", "--json",
                                      "--cam", str(tmp_path / "cam"), "--labels", "Effusion,Mass"])
    assert result.exit_code == 0, result.output
    import json

    data = json.loads(result.output[result.output.index("{"):])
    figures = [p["cam"] for p in data["predictions"]]
    assert [f.split("/")[-1] for f in figures] == ["000-00000001_000.png", "001-00000002_000.png"]
    img = cv2.imread(figures[0])
    assert img is not None and img.shape[1] > 2.5 * img.shape[0]     # image + 2 heatmap panels side by side
    loaded = load_run(run, device="cpu")
    x = predict_tensor(paths[0], loaded)
    labels = list(loaded.inference.labels)
    expected = hand_gradcam(loaded.inference.model, x, labels.index("Effusion"))
    got = label_heatmaps(loaded.inference.model, x, loaded.inference.head, [labels.index("Effusion")])[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    bad = CliRunner().invoke(app, ["predict", paths[0], "--run", str(run), "--cam", str(tmp_path / "c"),
                                   "--labels", "Nope"])
    assert bad.exit_code == 1 and "Nope" in bad.output and "Traceback" not in bad.output


def test_gallery_picks_the_highest_scored_true_and_false_positives():
    from trainer.cam import gallery_picks

    y = np.array([[1, 0], [0, 1], [1, 1], [0, np.nan], [1, 0], [0, 0]], dtype=np.float32)
    p = np.array([[0.2, 0.9], [0.8, 0.1], [0.9, 0.5], [0.7, 0.3], [0.4, 0.2], [0.1, 0.6]], dtype=np.float32)
    picks = gallery_picks(y, p, ["A", "B"], {"A": 0.3, "B": 0.45}, n_labels=2, per_kind=2)
    # A has 3 positives, B 2: A first. TP = y 1 at or above the threshold, by p desc; FP = y 0 at or above it
    # (NaN is neither); the count of all of them comes along
    assert picks == [(0, "TP", [2, 4], 2), (0, "FP", [1, 3], 2), (1, "TP", [2], 1), (1, "FP", [0, 5], 2)]
    # no threshold chosen on valid: 0.5; a negative scored below it is no false positive (the demo's p = 0.05)
    assert gallery_picks(y, p, ["A", "B"], None, n_labels=1, per_kind=3) == [(0, "TP", [2], 1), (0, "FP", [1, 3], 2)]
    assert gallery_picks(np.zeros((3, 1), np.float32), np.zeros((3, 1), np.float32), ["A"]) == []


def test_eval_gallery_explains_the_shard_pixels_the_model_saw(tmp_path, monkeypatch):
    import trainer.cam as cam
    from cxrshards import H5Split
    from trainer.evaluation.pipeline import evaluate_run
    from trainer.predict import model_input

    from tests.shardset_fixture import make_shard_set
    from trainer.config import TrainConfig
    from trainer.fitting import fit

    shard_dir = make_shard_set(tmp_path / "shards", "fx-32", size=32, counts={"train": 16, "valid": 8, "test": 12})
    run = tmp_path / "run"
    fit(TrainConfig(shards=str(shard_dir), out=str(run), model="resnet18", epochs=1, batch_size=8, workers=0,
                    device="cpu", quiet=True))
    seen = []
    real = cam.gradcam
    monkeypatch.setattr(cam, "gradcam", lambda model, x, outputs: seen.append(x.clone()) or real(model, x, outputs))
    report = evaluate_run(run, n_boot=0, device="cpu")
    assert report["gallery"].endswith("eval/gallery.png")
    assert cv2.imread(report["gallery"]) is not None
    h5 = H5Split(shard_dir, "test")
    stored = {h5[i][2]: h5[i][0] for i in range(len(h5))}
    loaded = load_run(run, device="cpu")
    inputs = {tuple(model_input(img, loaded.inference.mean, loaded.inference.std).flatten()[:64].tolist())
              for img in stored.values()}
    assert seen and all(tuple(x.flatten()[:64].tolist()) in inputs for x in seen)
