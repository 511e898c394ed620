"""`cxr demo-data`: phantom raw trees in the real NIH, MIMIC-CXR-JPG and folder layouts."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cli.app import app, console
from phantom import DEFAULT_SIZES, SOURCES


@app.command("demo-data")
def demo_data(
    source: Annotated[str, typer.Option(
        "--source", metavar="|".join(SOURCES), show_default=False,
        help="Layout to write: nih (ChestX-ray14, Kaggle folders), mimic (MIMIC-CXR-JPG) or cardiomegaly "
             "(normal/ and abnormal/ folders).")],
    out: Annotated[Path, typer.Option(
        "--out", metavar="DIR", show_default=False,
        help="Folder to write the raw tree into: missing, empty, or an earlier phantom tree (replaced).")],
    n: Annotated[int, typer.Option("--n", metavar="N", show_default=False, help="Number of images.")],
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", metavar="PX",
        help="Image size in pixels (MIMIC: the long side). Default: the real size, "
             + ", ".join(f"{k} {v}" for k, v in DEFAULT_SIZES.items()) + ".")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same arguments write byte-identical trees.")] = 0,
) -> None:
    """Write a phantom (synthetic) raw dataset with tables and findings drawn into the pixels."""
    start = time.perf_counter()
    from phantom import make_demo_data

    card = make_demo_data(source, out, n, image_size, seed)
    seconds = time.perf_counter() - start
    console.print(f"[bold]wrote {out}[/]: {card['n']:,} phantom {card['source']} images of "
                  f"{card['image_size']} px in {seconds:.1f} s (seed {card['seed']}; see phantom.json)",
                  highlight=False, soft_wrap=True)
    table = Table()
    table.add_column("label drawn")
    table.add_column("prevalence", justify="right")
    for label, share in card["prevalence"].items():
        table.add_row(label, f"{share:.0%}")
    console.print(table)
    console.print("every other label of the source is always negative", highlight=False)
