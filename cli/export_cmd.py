"""`cxr export`: a run's checkpoint -> ONNX and/or TorchScript, with model.json and README.md beside it."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.app import app, console


@app.command("export")
def export_command(
    run: str = typer.Option(..., "--run", help="Run folder written by `cxr train --out RUN`."),
    out: Path = typer.Option(..., "--out", metavar="DIR", show_default=False,
                             help="Folder to write model.onnx / model.ts, model.json and README.md into."),
    ckpt: str = typer.Option("best", "--ckpt", help="best | last | PATH of a checkpoint file."),
    fmt: str = typer.Option("both", "--format", metavar="onnx|torchscript|both",
                            help="onnx (model.onnx, for onnxruntime), torchscript (model.ts, for torch.jit.load) "
                                 "or both."),
) -> None:
    """Export a run for deployment: probabilities inside the graph, preprocessing and thresholds in model.json.

    `cxr predict IMAGE --model DIR` then scores images with onnxruntime, without PyTorch."""
    from trainer.export import export_run

    meta = export_run(run, out, ckpt, fmt, log=lambda msg: console.print(f"[dim]{msg}[/]", highlight=False))
    pre, th = meta["preprocessing"], meta["thresholds"]
    diffs = ", ".join(f"{name} {diff:.1e}" for name, diff in meta["parity"]["max_abs_diff"].items())
    console.print(f"[bold]wrote {out}/[/]: {', '.join(meta['files'])}, model.json, README.md "
                  f"({meta['model']}, {len(meta['labels'])} labels, input [N, 1, {pre['size']}, {pre['size']}], "
                  f"fit {pre['fit']}, codec {pre['codec']})", highlight=False, soft_wrap=True)
    console.print(f"parity with PyTorch on {meta['parity']['images']} images (max |diff|): {diffs}", highlight=False)
    console.print("thresholds: " + (f"Youden on the valid split, from {th['report']}" if th.get("per_label")
                                    else f"none ({th['note']})"), highlight=False, soft_wrap=True)
    console.print(f"Next: `cxr predict IMAGE --model {out}` (onnxruntime, no PyTorch)", highlight=False)
