"""`cxr demo` at toy size: every step runs, the layout a newcomer is told about exists, reports are written.
(The full-size demo, ~5 minutes, is `make demo`; not run here.)"""
from __future__ import annotations

import json

import pytest
import torch

from manifests.errors import CxrError
from trainer.demo import DemoConfig, run_demo


def test_tiny_demo_end_to_end(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "demo"
    lines: list[str] = []
    summary = run_demo(DemoConfig(out=str(out), n_nih=60, n_cardiomegaly=30, n_mimic=80, image_size=48, size=32, epochs=1,
                                  finetune_epochs=1, batch_size=16, n_boot=10, device="cpu"), echo=lines.append)
    text = "\n".join(lines)
    for i in range(1, 7):
        assert f"[{i}/6]" in text
    for path in ("raw/nih/Data_Entry_2017_v2020.csv", "raw/cardiomegaly/normal", "shards/nih-32/dataset.json",
                 "shards/cardiomegaly-32/train.h5", "runs/nih/best.pt", "runs/cardiomegaly/metrics.csv",
                 "runs/nih/eval/report.md", "runs/cardiomegaly/eval/roc.png", "demo.json",
                 "raw/mimic/mimic-cxr-2.0.0-metadata.csv.gz", "shards/mimic-32/dataset.json",
                 "runs/nih/eval/mimic-32/report.md", "runs/nih/eval/mimic-32/predictions.parquet",
                 "sheet-nih.png", "runs/nih/curves.png", "runs/nih/tb", "runs/nih/eval/gallery.png",
                 "runs/cardiomegaly/eval/gallery.png"):
        assert (out / path).exists(), path
    ft = json.loads((out / "runs/cardiomegaly/config.json").read_text())
    assert ft["init"].endswith("runs/nih/best.pt")
    assert summary["reports"]["nih"]["shard_set"]["phantom"] is True
    assert summary["reports"]["nih"]["phantom_findings"]["labels"]
    assert summary["reports"]["cardiomegaly"]["metrics"]["labels"] == ["Cardiomegaly"]
    assert json.loads((out / "demo.json").read_text())["macro_auroc"] == summary["macro_auroc"]
    # Step 6: the NIH run on the MIMIC phantoms, Effusion matched to MIMIC's Pleural Effusion, the
    # internal column reused from runs/nih/eval (same checkpoint).
    ext = summary["reports"]["nih_on_mimic"]["external"]
    assert {"shared": "Effusion", "run": "Effusion", "set": "Pleural Effusion"} in ext["labels"]["matched"]
    assert ext["internal"]["source"].startswith("reused")
    assert [r["label"] for r in ext["comparison"]] == [m["shared"] for m in ext["labels"]["matched"]]
    assert "## Internal vs external" in (out / "runs/nih/eval/mimic-32/report.md").read_text()


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(CxrError, match="not a cxr demo folder"):
        run_demo(DemoConfig(out=str(tmp_path)), echo=lambda _m: None)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
