#!/usr/bin/env bash
# `make recipes`: every seed recipe end to end on phantom (synthetic) data, at a tiny size and few epochs,
# in a few minutes on a CPU. Nothing here measures anything: it shows each setup runs as written.
#
#   bash recipes/phantom.sh                 # writes runs/recipes-phantom/{raw,shards,runs}
#   OUT=/tmp/rp EPOCHS=1 bash recipes/phantom.sh
#
# ImageNet rows: real torchvision weights in $TORCH_HOME/hub/checkpoints are used when present. Missing ones
# are replaced by a RANDOM-INIT STAND-IN file (a loud banner says so) unless IMAGENET_STANDIN=0, which
# skips the ImageNet runs instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
export PY CXR="$PY -m cli"
OUT=${OUT:-runs/recipes-phantom}
SIZE=${SIZE:-64}
EPOCHS=${EPOCHS:-2}
IMAGENET_STANDIN=${IMAGENET_STANDIN:-1}
# Tiny-run overrides for every `cxr train`: the recipes' own values (lr 1e-5, batch 64, 50 epochs, cap 10,000)
# are meant for the real data sets.
TINY=(--epochs "$EPOCHS" --batch-size 16 --lr 1e-3 --workers 0 --max-per-label 60)
start=$(date +%s)

echo "== phantom raw data and shard sets in $OUT (size $SIZE)"
rm -rf "$OUT/runs"
$CXR demo-data --source nih --out "$OUT/raw/nih" --n 500 --image-size "$SIZE"
$CXR demo-data --source cardiomegaly --out "$OUT/raw/cardiomegaly" --n 300 --image-size "$SIZE" --seed 1
$CXR demo-data --source mimic --out "$OUT/raw/mimic" --n 600 --image-size "$SIZE" --seed 2
$CXR shard build --source nih --raw "$OUT/raw/nih" --size "$SIZE" --out "$OUT/shards" --name nih --quiet
$CXR shard build --source cardiomegaly --raw "$OUT/raw/cardiomegaly" --patient-pattern 'person(\d+)_' \
    --size "$SIZE" --out "$OUT/shards" --name cardiomegaly --quiet
$CXR shard build --source mimic --raw "$OUT/raw/mimic" --size "$SIZE" --out "$OUT/shards" --name mimic --quiet

# ImageNet weights: real ones if present, else a random-init stand-in under a private TORCH_HOME.
skip_imagenet=0
real_home=$("$PY" -c 'import torch; print(torch.hub.get_dir())')
standin_home="$OUT/torch-home"
status=$("$PY" - "$real_home" "$standin_home" "$IMAGENET_STANDIN" <<'PYEOF'
import os, sys
from pathlib import Path
import torch, torchvision
from trainer.models import imagenet_file_names
real, standin, allow = Path(sys.argv[1]) / "checkpoints", Path(sys.argv[2]) / "hub" / "checkpoints", sys.argv[3] == "1"
missing = []
for model in ("resnet50", "resnet101"):
    names = imagenet_file_names(model)
    found = next((real / n for n in names if (real / n).is_file()), None)
    target = standin / names[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    if found is not None:
        target.symlink_to(found.resolve())
    elif allow:
        torch.save(getattr(torchvision.models, model)(weights=None).state_dict(), target)
        missing.append(model)
    else:
        missing.append(model)
print(("standin " if allow else "skip ") + ",".join(missing) if missing else "real")
PYEOF
)
case "$status" in
    real) echo "== ImageNet: using your torchvision weights from $real_home/checkpoints" ;;
    standin*)
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        echo "!! NO REAL IMAGENET WEIGHTS for ${status#standin }: the 'imagenet' runs below load a RANDOM-INIT"
        echo "!! STAND-IN saved under torchvision's file name in $standin_home. They only show the code path."
        echo "!! Put torchvision's .pth files in $real_home/checkpoints for real ones (IMAGENET_STANDIN=0: skip)."
        echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" ;;
    skip*) skip_imagenet=1
        echo "== ImageNet: no weights for ${status#skip } and IMAGENET_STANDIN=0: skipping the ImageNet runs" ;;
esac
export TORCH_HOME="$standin_home"

echo "== recipe 1/3: NIH multi-label, focal loss, per-label cap, staged fine-tuning (4 -> 1)"
NIH_SHARDS="$OUT/shards/nih" RUNS="$OUT/runs" NIH_INIT=$([ $skip_imagenet = 1 ] && echo scratch || echo imagenet) \
    bash recipes/nih_stages.sh "${TINY[@]}"

echo "== recipe 2/3: cardiomegaly transfer table"
NIH_SHARDS="$OUT/shards/nih" CARDIO_SHARDS="$OUT/shards/cardiomegaly" RUNS="$OUT/runs" SKIP_IMAGENET=$skip_imagenet \
    bash recipes/cardiomegaly_transfer.sh "${TINY[@]}"

echo "== recipe 3/3: MIMIC AP multi-label ResNet101 with pos_weight"
init=()
[ $skip_imagenet = 1 ] && init=(--init scratch)
$CXR train --config recipes/mimic_ap_pos_weight.toml --shards "$OUT/shards/mimic" --out "$OUT/runs/mimic-ap" \
    "${init[@]}" "${TINY[@]}"

"$PY" - "$OUT/runs" <<'PYEOF'
import csv, math, sys
from pathlib import Path
print("\n| run | epochs | best val macro AUROC |\n|---|---|---|")
for run in sorted(Path(sys.argv[1]).iterdir()):
    if (run / "metrics.csv").is_file():
        rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
        best = max(rows, key=lambda r: -math.inf if r["val_auroc_macro"] == "nan" else float(r["val_auroc_macro"]))
        print(f"| {run.name} | {len(rows)} | {best['val_auroc_macro']} |")
PYEOF
echo "== phantom recipes done in $(( $(date +%s) - start )) s (runs in $OUT/runs)"
[ "$status" = real ] || [ $skip_imagenet = 1 ] || echo "!! reminder: the imagenet runs used RANDOM-INIT STAND-IN weights"
