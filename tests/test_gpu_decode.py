"""`--decode gpu`: JPEG tar batches leave the reader encoded and are decoded in one batched
`torchvision.io.decode_jpeg` call on the model's device. The batching and collation run on the CPU here
(torchvision decodes lists on the CPU too); the CUDA test skips without a GPU."""
from __future__ import annotations

import pytest
import torch

import cxrshards
from cxrshards.jpeg_batch import EncodedJpegBatch
from manifests.errors import CxrError
from tests.shardset_fixture import expected_pixels, make_shard_set
from trainer.config import TrainConfig
from trainer.fitting import fit


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    return make_shard_set(tmp_path_factory.mktemp("gpu"), "fx-jpeg", codec="jpeg", formats=("wds", "hdf5"))


def _decoded(stream, device="cpu"):
    out = []
    for images, labels, keys in stream:
        assert isinstance(images, EncodedJpegBatch) and images.shape == (len(keys), 1, 16, 16)
        x = images.to(device)
        assert x.dtype == torch.uint8 and x.shape == (len(keys), 1, 16, 16) and x.device.type == torch.device(device).type
        out.append((keys, x.cpu(), labels))
    return out


@pytest.mark.parametrize("kw", [dict(rank=0, world_size=1), dict(rank=1, world_size=2)])
def test_encoded_batches_hold_the_same_samples_in_the_same_order(jpeg_set, kw):
    cpu = list(cxrshards.open_shards(jpeg_set, "train", format="wds", batch_size=4, seed=3, epoch=1, **kw))
    gpu = cxrshards.open_shards(jpeg_set, "train", batch_size=4, seed=3, epoch=1, decode="gpu", **kw)
    assert gpu.format == "wds" and len(gpu) == len(cpu)
    got = _decoded(gpu)
    assert [k for k, _, _ in got] == [k for _, _, k in cpu]
    for (keys, x, labels), (images, labels_cpu, _) in zip(got, cpu):
        assert torch.equal(labels.nan_to_num(-1), labels_cpu.nan_to_num(-1))
        # libjpeg on both sides: the batched decode gives exactly the CPU path's pixels
        assert torch.equal(x, images)
        for key, img in zip(keys, x):
            assert torch.equal(img[0], torch.from_numpy(expected_pixels(key, 16, "jpeg")))


def test_decode_gpu_refuses_what_it_cannot_do(tmp_path, jpeg_set):
    png = make_shard_set(tmp_path, "fx-png", codec="png", formats=("wds",))
    with pytest.raises(CxrError, match=r"--decode gpu reads JPEG tars in batches; .* png shards.*--codec jpeg"):
        cxrshards.open_shards(png, "train", batch_size=4, decode="gpu")
    with pytest.raises(CxrError, match=r"without a batch size"):
        cxrshards.open_shards(jpeg_set, "train", decode="gpu")
    with pytest.raises(CxrError, match=r"decode must be one of cpu, gpu"):
        cxrshards.open_shards(jpeg_set, "train", batch_size=4, decode="nvjpeg")
    cfg = TrainConfig(shards=str(jpeg_set), out=str(tmp_path / "run"), epochs=1, batch_size=4, workers=0,
                      device="cpu", decode="gpu")
    with pytest.raises(CxrError, match=r"--decode gpu decodes JPEGs on the GPU, but the device is cpu"):
        fit(cfg)
    bad = EncodedJpegBatch([torch.tensor([1, 2, 3], dtype=torch.uint8)], 16, ["k0"], "somewhere")
    with pytest.raises(CxrError, match=r"somewhere: cannot decode a JPEG of this batch on cpu"):
        bad.to("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decode_matches_the_cpu_path_closely(jpeg_set):
    cpu = list(cxrshards.open_shards(jpeg_set, "train", format="wds", batch_size=4, shuffle=False))
    got = _decoded(cxrshards.open_shards(jpeg_set, "train", batch_size=4, shuffle=False, decode="gpu"), "cuda")
    for (_, x, _), (images, _, _) in zip(got, cpu):
        assert (x.int() - images.int()).abs().max() <= 2   # nvJPEG's IDCT may differ from libjpeg by a level


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_with_gpu_decode_runs(jpeg_set, tmp_path):
    cfg = TrainConfig(shards=str(jpeg_set), out=str(tmp_path / "run"), epochs=1, batch_size=4, workers=0,
                      device="cuda", decode="gpu", model="resnet18")
    assert (fit(cfg) / "last.pt").is_file()
