"""Seeing a shard set: a contact sheet of its samples, and the card for people (`README.md`).

Contact sheet (`cxr shard show`): the first N samples of a split in shard order (no shuffle, so the same
set gives the same sheet), optionally only those positive for one label. Each tile is the stored 8-bit
pixels exactly as the reader yields them, titled with its key and its positive labels. Samples are
chosen from manifest.parquet and read with `open_shards(keys=...)`, so nothing else is decoded.

README.md (written by every build, before the card): source, the build command that repeats it, counts
and prevalence per split, and a few lines that read the set with stock webdataset and h5py.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from manifests.errors import CxrError

README_NAME = "README.md"
_NOT_FLAGS = ("source", "fetch_list")   # given otherwise, or not part of what the shards hold


def _option_defaults() -> dict:
    """Each manifest option's default in the card's JSON form (tuples as lists)."""
    from dataclasses import MISSING, fields

    from manifests.options import ManifestOptions

    return {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in fields(ManifestOptions) if f.name not in _NOT_FLAGS and f.default is not MISSING}


def pick_samples(shard_dir: Path, split: str, n: int, label: str | None = None) -> pd.DataFrame:
    """The first `n` rows of `split` in shard order (key + label columns), positive for `label` if given."""
    import pyarrow.parquet as pq

    from cxrshards.reader import read_card

    card = read_card(shard_dir)
    labels = list(card.get("labels", []))
    if label is not None and label not in labels:
        raise CxrError(f"{shard_dir}: no label {label!r} (it has: {', '.join(labels)})")
    if n < 1:
        raise CxrError(f"--n must be at least 1, not {n}")
    table = pq.read_table(shard_dir / "manifest.parquet").to_pandas()
    rows = table[table["split"] == split]
    if rows.empty:
        raise CxrError(f"{shard_dir}: the {split!r} split is empty")
    if label is not None:
        rows = rows[rows[label] == 1.0]
        if rows.empty:
            raise CxrError(f"{shard_dir}: no {split} sample is positive for {label!r}")
    order = ["shard", "shard_index"] if rows["shard"].notna().all() else ["h5_index"]
    return rows.sort_values(order, kind="stable").head(n)[["key", *labels]].reset_index(drop=True)


def contact_sheet(shard_dir: str | os.PathLike, out: str | os.PathLike, *, split: str = "train",
                  label: str | None = None, n: int = 36, root: str | os.PathLike | None = None) -> Path:
    """Draw `n` samples of `split` (positive for `label`, if given) into the PNG `out`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrshards.reader import open_shards, read_card, resolve_shard_dir
    from manifests.atomic import atomic_path

    shard_dir = resolve_shard_dir(shard_dir, root)
    labels = list(read_card(shard_dir).get("labels", []))
    rows = pick_samples(shard_dir, split, n, label)
    images = {key: img[0].numpy() for img, _, key in open_shards(shard_dir, split, shuffle=False,
                                                                   keys=list(rows["key"]))}
    cols = max(1, math.ceil(math.sqrt(len(rows))))
    lines = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(2.2 * cols, 2.5 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows.itertuples(index=False)):
        values = dict(zip(["key", *labels], row))
        positive = [name for name in labels if values[name] == 1.0]
        ax.imshow(images[values["key"]], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{values['key']}\n{', '.join(positive) or 'no positive label'}", fontsize=6)
    fig.suptitle(f"{shard_dir.name}: {split}" + (f", positive for {label}" if label else ""), fontsize=9)
    fig.tight_layout()
    final = Path(out)
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(final) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return final


def build_command(card: dict, raw: str | None) -> str:
    """The `cxr shard build` command that repeats this build (manifest options not at their default)."""
    build = card.get("build", {})
    manifest_options = build.get("manifest options", {}) or {}
    shard_options = build.get("shard options", {}) or {}
    parts = ["cxr shard build", f"--source {card.get('source')}", f"--raw {raw or 'RAW'}",
             f"--size {card.get('size')}", f"--fit {card.get('fit')}", f"--codec {card.get('codec')}",
             f"--format {_formats(card.get('formats', []))}", f"--name {card.get('name')}"]
    if card.get("codec") == "jpeg":
        parts.append(f"--jpeg-quality {card.get('jpeg_quality')}")
    for key, default in _option_defaults().items():
        value = manifest_options.get(key, default)
        if value == default or value is None:
            continue
        if isinstance(value, list):
            value = ":".join(f"{v:g}" for v in value) if key == "ratios" else ",".join(map(str, value))
        text = str(value)
        parts.append(f"--{key.replace('_', '-')} " + (f"'{text}'" if any(c in text for c in " {}()*\\") else text))
    if shard_options.get("shard_size"):
        parts.append(f"--shard-size {shard_options['shard_size']}")
    return " \\\n    ".join(parts)


def render_readme(card: dict, raw: str | None = None) -> str:
    """README.md for people, made from the card alone (the same card gives the same bytes)."""
    name, labels, size = card.get("name"), list(card.get("labels", [])), card.get("size")
    splits = card.get("splits", {})
    ext = {"png": "png", "jpeg": "jpg", "raw": "npy"}.get(card.get("codec"), "png")
    out = [f"# Shard set `{name}`", "",
           f"Source **{card.get('source')}**, {size} x {size} px 8-bit gray, fit `{card.get('fit')}`, "
           f"codec `{card.get('codec')}`, formats {', '.join(card.get('formats', []))}; "
           f"built by cxr {card.get('tool_version')}. Every file's sha256 is in `dataset.json`; "
           f"`cxr shard verify` checks them.", "",
           "Built with:", "", "```bash", build_command(card, raw), "```", "",
           "## Splits", "", "| split | images | patients |", "|---|---:|---:|"]
    for split, info in splits.items():
        out.append(f"| {split} | {int((info or {}).get('count', 0)):,} | {int((info or {}).get('patients', 0)):,} |")
    out += ["", "## Labels: positives (prevalence) per split", "",
            "| label | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for label in labels:
        cells = []
        for split in splits:
            info = splits[split] or {}
            pos = (info.get("positives") or {}).get(label, 0)
            prev = (info.get("prevalence") or {}).get(label)
            cells.append(f"{int(pos):,} ({prev:.1%})" if prev is not None else f"{int(pos):,}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    rejects = card.get("rejects", 0)
    out += ["", f"Left out: {rejects:,} image(s), each with its reason in `rejects.parquet`.", "",
            "## Reading it without cxr", ""]
    first = next((s for s in splits if (splits[s] or {}).get("count")), "train")
    tars = sorted(f["file"] for f in card.get("files", []) if f.get("split") == first
                  and str(f.get("file", "")).endswith(".tar"))
    if tars:
        urls = tars[0] if len(tars) == 1 else f"{first}-{{{tars[0][-10:-4]}..{tars[-1][-10:-4]}}}.tar"
        out += ["```python", "import webdataset as wds",
                f'ds = wds.WebDataset("{urls}", shardshuffle=False).decode("l")',
                f'for sample in ds:            # sample["{ext}"]: {size}x{size} image, sample["json"]["labels"]: '
                "{name: 1.0 | 0.0 | None}", "    break", "```", ""]
    if "hdf5" in card.get("formats", []):
        out += ["```python", "import h5py",
                f'with h5py.File("{first}.h5") as f:   # images uint8 [N,{size},{size}], labels float32 [N,L], keys',
                '    image, labels, key = f["images"][0], f["labels"][0], f["keys"][0].decode()',
                '    names = f.attrs["labels"]   # JSON list of the label names, in column order', "```", ""]
    out += ["With cxr: `cxrshards.open_shards(PATH, \"train\", seed=0, epoch=0, batch_size=64)`.", ""]
    return "\n".join(out)


def _formats(formats: list[str]) -> str:
    return "both" if set(formats) == {"wds", "hdf5"} else (formats[0] if formats else "wds")
