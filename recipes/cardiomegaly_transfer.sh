#!/usr/bin/env bash
# Seed 000's cardiomegaly transfer table: the binary cardiomegaly model trained four ways
#   scratch | imagenet | NIH-pretrained (NIH model from scratch) | NIH-pretrained (NIH model from ImageNet)
# The two NIH source models are trained first with recipes/nih_focal.toml (skipped when already done).
#
#   NIH_SHARDS=nih-224 CARDIO_SHARDS=cardiomegaly-224 RUNS=runs bash recipes/cardiomegaly_transfer.sh [flags...]
#
# Extra flags go to every `cxr train`. SKIP_IMAGENET=1 leaves out the two ImageNet rows (no weights here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
CXR=${CXR:-"$PY -m cli"}
NIH=${NIH_SHARDS:-nih-224}
CARDIO=${CARDIO_SHARDS:-cardiomegaly-224}
RUNS=${RUNS:-runs}
SKIP_IMAGENET=${SKIP_IMAGENET:-0}

train() {  # train OUT [cxr train flags...]: resume when OUT already holds a run
    local out=$1; shift
    local resume=()
    [ -f "$out/last.pt" ] && resume=(--resume)
    echo "== $out"
    $CXR train --out "$out" "$@" "${resume[@]}" "${EXTRA[@]}"
}
EXTRA=("$@")

inits=(scratch)
[ "$SKIP_IMAGENET" = 1 ] && echo "SKIP_IMAGENET=1: leaving out the ImageNet rows of the table" || inits+=(imagenet)

for init in "${inits[@]}"; do
    train "$RUNS/nih-focal-$init" --config recipes/nih_focal.toml --shards "$NIH" --init "$init"
done
rows=()
for init in "${inits[@]}"; do
    train "$RUNS/cardio-$init" --config recipes/cardiomegaly.toml --shards "$CARDIO" --init "$init"
    rows+=("cardio-$init")
done
for init in "${inits[@]}"; do
    train "$RUNS/cardio-nih-$init" --config recipes/cardiomegaly.toml --shards "$CARDIO" \
        --init "$RUNS/nih-focal-$init/best.pt"
    rows+=("cardio-nih-$init")
done

"$PY" - "$RUNS" "${rows[@]}" <<'PYEOF'
import csv, math, sys
from pathlib import Path
runs, names = Path(sys.argv[1]), sys.argv[2:]
what = {"cardio-scratch": "scratch", "cardio-imagenet": "ImageNet",
        "cardio-nih-scratch": "NIH-pretrained (from scratch)", "cardio-nih-imagenet": "NIH-pretrained (from ImageNet)"}
print("\n| cardiomegaly init | best val AUROC | epoch |\n|---|---|---|")
for name in names:
    with open(runs / name / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = max(rows, key=lambda r: -math.inf if r["val_auroc_macro"] == "nan" else float(r["val_auroc_macro"]))
    print(f"| {what[name]} | {best['val_auroc_macro']} | {best['epoch']} |")
PYEOF
