"""`cxr demo`: phantom data -> shards -> train -> fine-tune -> eval, in one command (`make demo`)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from cli.app import app, console
from trainer.demo import DemoConfig

D = DemoConfig()


@app.command("demo")
def demo(
    out: Path = typer.Option(Path(D.out), "--out", help="Demo folder (replaced if it holds an earlier demo)."),
    n_nih: int = typer.Option(D.n_nih, "--n-nih", help="Phantom NIH images."),
    n_cardiomegaly: int = typer.Option(D.n_cardiomegaly, "--n-cardiomegaly", help="Phantom cardiomegaly images."),
    n_mimic: int = typer.Option(D.n_mimic, "--n-mimic", help="Phantom MIMIC images (the external validation set)."),
    size: int = typer.Option(D.size, "--size", help="Shard image side, pixels."),
    epochs: int = typer.Option(D.epochs, "--epochs", help="NIH training epochs."),
    finetune_epochs: int = typer.Option(D.finetune_epochs, "--finetune-epochs", help="Cardiomegaly fine-tuning epochs."),
    lr: float = typer.Option(D.lr, "--lr", help="Learning rate of both trainings."),
    device: str = typer.Option(D.device, "--device", help="auto | cpu | cuda."),
    seed: int = typer.Option(D.seed, "--seed", help="Seed of data, splits, init and order."),
) -> None:
    """Show the whole tool working on phantom X-rays in a few minutes: data, shards, training, evaluation."""
    from cli.eval_cmd import external_table, print_report, print_subgroups
    from trainer.demo import run_demo

    def echo(message: str) -> None:
        style = "bold cyan" if message.lstrip("\n").startswith("[") else None
        console.print(Text(message, style=style) if style else Text(message), highlight=False)

    cfg = DemoConfig(out=str(out), n_nih=n_nih, n_cardiomegaly=n_cardiomegaly, n_mimic=n_mimic, size=size, epochs=epochs,
                     finetune_epochs=finetune_epochs, lr=lr, device=device, seed=seed)
    summary = run_demo(cfg, echo=echo)
    for name, title in (("nih", "NIH phantoms, resnet18 from scratch"),
                        ("cardiomegaly", "cardiomegaly phantoms, fine-tuned from the NIH run")):
        console.print()
        print_report(summary["reports"][name], title=f"{title}: test split ({summary['paths']['runs'][name]}/eval)")
    console.print()
    print_subgroups(summary["reports"]["nih"]["subgroups"])
    console.print()
    console.print(external_table(summary["reports"]["nih_on_mimic"]))
    console.print(Text(f"external validation of the NIH run on the MIMIC phantoms: {summary['paths']['external']}/report.md "
                       "(thresholds from the NIH valid split)", style="dim"), highlight=False)
    p = summary["paths"]
    console.print(Text(f"\nDemo finished in {summary['seconds'] / 60:.1f} min. Where everything is:", style="bold"))
    console.print(Text(
        f"  {out}/raw/          phantom raw trees (NIH and MIMIC-CXR-JPG layouts; normal/ + abnormal/ folders)\n"
        f"  {out}/shards/       shard sets: dataset.json card, manifest.parquet, *.tar, *.h5\n"
        f"  {p['runs']['nih']}/     the NIH run: metrics.csv, best.pt, eval/report.html (open it in a browser)\n"
        f"  {p['external']}/  the NIH run on the MIMIC phantoms: internal vs external\n"
        f"  {p['runs']['cardiomegaly']}/  the fine-tuned run, same layout\n"
        f"Next: `make eval` re-evaluates the newest run; `cxr predict IMAGE --run {p['runs']['nih']}` scores one image;\n"
        f"the README explains the same steps on real NIH, MIMIC-CXR-JPG and cardiomegaly data."), highlight=False)
