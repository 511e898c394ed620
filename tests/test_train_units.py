"""Trainer pieces without a training run: config, losses, metrics, schedule, augmentation, models."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from manifests.errors import CxrError
from trainer.augment import AugmentSpec, augment_batch, batch_generator
from trainer.config import TrainConfig, resolve_config
from trainer.losses import make_loss, masked_bce, masked_ce, masked_focal, pos_weight_from_table
from trainer.metrics import auroc_per_label, macro_auroc, micro_auroc
from trainer.models import (apply_stage, build_model, imagenet_file_names, imagenet_weights_path, load_imagenet,
                            load_transfer, set_train_mode)
from trainer.schedule import get_lr


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- config

def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('shards = "nih-64"\nout = "runs/a"\nloss = "focal"\nlr = 1e-4\nlabels = ["Mass", "Nodule"]\n'
                    'flip = false\nnormalize = [0.5, 0.5]\n')
    cfg = resolve_config(toml, {"lr": 3e-4, "epochs": 2, "model": None})
    assert (cfg.loss, cfg.lr, cfg.epochs, cfg.labels, cfg.flip, cfg.normalize) == \
        ("focal", 3e-4, 2, ("Mass", "Nodule"), False, (0.5, 0.5))
    assert cfg.model == TrainConfig.model
    yaml = tmp_path / "r.yaml"
    yaml.write_text("shards: x\nout: y\nmax-per-label: 10000\nbatch_size: 64\n")
    cfg = resolve_config(yaml, {"labels": "A,B", "normalize": "0.4,0.2"})
    assert (cfg.max_per_label, cfg.batch_size, cfg.labels, cfg.normalize) == (10000, 64, ("A", "B"), (0.4, 0.2))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg          # config.json round trip


@pytest.mark.parametrize("values, needle", [
    ({"modle": "resnet18"}, "unknown option 'modle'"),
    ({"model": "resnet999"}, "--model 'resnet999'"),
    ({"lr": -1}, "--lr -1"),
    ({"epochs": 1.5}, "bad value 1.5"),
    ({"stage": 5}, "--stage 5"),
    ({"loss": "ce", "task": "multilabel"}, "--loss ce"),
    ({"normalize": "0.5"}, "--normalize"),
])
def test_config_rejects_bad_values(values, needle):
    with pytest.raises(CxrError, match=None) as exc:
        resolve_config(None, {"shards": "s", "out": "o", **values})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- losses

def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_focal_loss_equals_hand_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])
    terms = []
    for (z, y) in [(2.0, 1), (-1.0, 0), (0.3, 1)]:           # the NaN entry is left out
        p = _sig(z)
        pt = p if y == 1 else 1 - p
        terms.append(-((1 - pt) ** 2) * math.log(pt))
    assert masked_focal(logits, labels, gamma=2.0).item() == pytest.approx(sum(terms) / 3, rel=1e-6)
    alpha = 0.25
    weighted = [t * (alpha if y == 1 else 1 - alpha) for t, y in zip(terms, [1, 0, 1])]
    assert masked_focal(logits, labels, gamma=2.0, alpha=alpha).item() == pytest.approx(sum(weighted) / 3, rel=1e-6)


def test_pos_weight_loss_equals_hand_computation():
    table = pd.DataFrame({"key": list("abcdefg"), "split": ["train"] * 6 + ["valid"],
                          "A": np.array([1, 0, 0, 0, np.nan, 1, 1], np.float32),
                          "B": np.array([1, 1, 1, 0, 0, np.nan, 0], np.float32)})
    w = pos_weight_from_table(table, ["A", "B"])
    assert w.tolist() == pytest.approx([3 / 2, 2 / 3])       # negatives / positives on train only
    logits = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, float("nan")]])
    expected = (-w[0] * math.log(_sig(1.0)) - math.log(1 - _sig(-2.0)) - math.log(1 - _sig(0.0))) / 3
    loss = make_loss("bce-pos-weight", pos_weight=torch.from_numpy(w))(logits, labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert masked_bce(logits, labels).item() == pytest.approx(
        (-math.log(_sig(1.0)) - math.log(1 - _sig(-2.0)) - math.log(1 - _sig(0.0))) / 3, rel=1e-6)


def test_ce_loss_two_logits_masks_nan():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]])
    labels = torch.tensor([[1.0], [0.0], [float("nan")]])
    expected = (-math.log(math.exp(1) / (1 + math.exp(1))) - math.log(math.exp(2) / (math.exp(2) + 1))) / 2
    assert masked_ce(logits, labels).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- metrics

def test_auroc_matches_sklearn_and_skips_single_class_labels():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (50, 3)).astype(np.float64)
    p = np.clip(y * 0.3 + rng.random((50, 3)), 0, 1)
    y[:, 2] = 0.0                                           # one class: undefined
    y[rng.random(50) < 0.2, 0] = np.nan                     # not labelled: masked
    per = auroc_per_label(y, p)
    keep = ~np.isnan(y[:, 0])
    assert per[0] == pytest.approx(roc_auc_score(y[keep, 0], p[keep, 0]))
    assert per[1] == pytest.approx(roc_auc_score(y[:, 1], p[:, 1]))
    assert math.isnan(per[2])
    assert macro_auroc(y, p) == pytest.approx((per[0] + per[1]) / 2)
    full = rng.integers(0, 2, (40, 4)).astype(np.float64)
    q = rng.random((40, 4))
    assert micro_auroc(full, q) == pytest.approx(roc_auc_score(full, q, average="micro"))
    assert macro_auroc(full, q) == pytest.approx(roc_auc_score(full, q, average="macro"))


# --------------------------------------------------------------------------- schedule

def test_lr_is_a_pure_function_of_position():
    cfg = TrainConfig(lr=1.0, warmup=4, scheduler="step", step_size=2, gamma=0.5, epochs=6)
    assert [get_lr(s, 0.0, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [get_lr(100, e + 0.5, cfg) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    cos = TrainConfig(lr=1.0, scheduler="cosine", epochs=4, min_lr=0.1)
    assert get_lr(0, 0.0, cos) == pytest.approx(1.0)
    assert get_lr(0, 2.0, cos) == pytest.approx(0.55)
    assert get_lr(0, 4.0, cos) == pytest.approx(0.1)
    assert get_lr(7, 0.3, TrainConfig(lr=2e-5)) == 2e-5


# --------------------------------------------------------------------------- augmentation

def test_augmentation_is_seeded_and_leaves_global_rng_alone():
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    spec = AugmentSpec(mean=0.4, std=0.2)
    before = torch.get_rng_state()
    a = augment_batch(images, spec, batch_generator(1, 2, 3))
    b = augment_batch(images, spec, batch_generator(1, 2, 3))
    c = augment_batch(images, spec, batch_generator(1, 2, 4))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (6, 1, 32, 32) and a.dtype == torch.float32
    plain = augment_batch(images, AugmentSpec(flip=False, light=False, mean=0.4, std=0.2), None)
    assert torch.allclose(plain, (images.float() / 255 - 0.4) / 0.2)
    flips = augment_batch(images, AugmentSpec(flip=True, light=False, mean=0.4, std=0.2), batch_generator(0, 0, 0))
    for i in range(6):                                      # flip only: each image as is or mirrored, exactly
        assert torch.equal(flips[i], plain[i]) or torch.equal(flips[i], plain[i].flip(-1))


# --------------------------------------------------------------------------- models

@pytest.mark.parametrize("name, stage, trained", [
    ("resnet18", 1, ("layer2", "layer3", "layer4", "fc")),
    ("resnet18", 3, ("layer4", "fc")),
    ("resnet18", 4, ("fc",)),
    ("densenet121", 2, ("features.transition2", "features.denseblock3", "features.transition3",
                        "features.denseblock4", "features.norm5", "classifier")),
    ("densenet121", 4, ("classifier",)),
])
def test_stage_freezes_exactly_the_named_parameters(name, stage, trained):
    model = build_model(name, 3, seed=0)
    names = apply_stage(model, name, stage)
    expect = [n for n, _ in model.named_parameters() if n.split(".")[0] in trained
              or ".".join(n.split(".")[:2]) in trained]
    assert names == expect and names
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expect)
    set_train_mode(model, name, stage)
    for mname, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            inside = any(mname == t or mname.startswith(t + ".") for t in trained)
            assert m.training == inside, mname


def test_one_channel_stem_and_seeded_init():
    a, b = build_model("resnet34", 5, seed=3), build_model("resnet34", 5, seed=3)
    assert a.conv1.weight.shape == (64, 1, 7, 7) and a.fc.out_features == 5
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    d = build_model("densenet169", 2, seed=0)
    assert d.features.conv0.in_channels == 1 and d.classifier.out_features == 2
    assert d.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 2)


def test_imagenet_weights_from_hub_cache_sum_rgb_filters(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CxrError) as exc:
        imagenet_weights_path("resnet18")
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(exc.value) and "\n" not in str(exc.value)
    import torchvision

    rgb = torchvision.models.resnet18()                    # a random stand-in saved under torchvision's name
    expected.parent.mkdir(parents=True)
    torch.save(rgb.state_dict(), expected)
    assert imagenet_weights_path("resnet18") == expected
    model = build_model("resnet18", 4, seed=0)
    head_before = model.fc.weight.clone()
    load_imagenet(model, "resnet18", expected)
    assert torch.equal(model.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer3[0].conv1.weight, rgb.layer3[0].conv1.weight)
    assert torch.equal(model.fc.weight, head_before)        # head stays fresh (4 outputs, not 1000)


def test_densenet_imagenet_old_style_keys(tmp_path):
    import torchvision

    rgb = torchvision.models.densenet121()
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in rgb.state_dict().items()}
    path = tmp_path / imagenet_file_names("densenet121")[0]
    torch.save(old, path)
    model = build_model("densenet121", 1, seed=0)
    load_imagenet(model, "densenet121", path)
    assert torch.equal(model.features.denseblock1.denselayer1.norm1.weight,
                       rgb.features.denseblock1.denselayer1.norm1.weight)
    assert torch.equal(model.features.conv0.weight, rgb.features.conv0.weight.sum(1, keepdim=True))


def test_transfer_keeps_or_replaces_head():
    src = build_model("resnet18", 15, seed=1)
    dst = build_model("resnet18", 1, seed=2)
    fresh_head = dst.fc.weight.clone()
    load_transfer(dst, "resnet18", src.state_dict(), keep_head=False, source="src")
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert torch.equal(dst.fc.weight, fresh_head)
    same = build_model("resnet18", 15, seed=2)
    load_transfer(same, "resnet18", src.state_dict(), keep_head=True, source="src")
    assert torch.equal(same.fc.weight, src.fc.weight)
    with pytest.raises(CxrError):
        load_transfer(build_model("resnet34", 1), "resnet34", src.state_dict(), keep_head=False, source="src")


def test_views_filter_train_and_valid(tmp_path):
    from trainer.fitting import _select_views

    table = pd.DataFrame({"key": list("abcdef"), "split": ["train", "train", "valid", "valid", "test", "train"],
                          "view": ["AP", "PA", "AP", "PA", "AP", None]})
    kept = _select_views(table, ("AP",), tmp_path)
    assert kept["key"].tolist() == ["a", "c", "e"]
    assert _select_views(table, (), tmp_path) is table
    with pytest.raises(CxrError, match=r"no train rows .* \(views present: AP, PA\)"):
        _select_views(table, ("LATERAL",), tmp_path)
