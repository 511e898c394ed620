#!/usr/bin/env bash
# Seed 000's staged fine-tuning on NIH: stage 4 (head only) -> 3 (layer4 + head) -> 2 (layer3-4 + head)
# -> 1 (layer2-4 + head), each stage initialised from the previous stage's best.pt (the first from
# $NIH_INIT, default imagenet), every stage with recipes/nih_focal.toml.
#
#   NIH_SHARDS=nih-224 RUNS=runs bash recipes/nih_stages.sh [extra cxr train flags...]
#
# A stage whose run folder already holds last.pt is continued with --resume (a finished one is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
CXR=${CXR:-"$(test -x .venv/bin/python && echo .venv/bin/python || echo python3) -m cli"}
SHARDS=${NIH_SHARDS:-nih-224}
RUNS=${RUNS:-runs}
prev=${NIH_INIT:-imagenet}

for stage in 4 3 2 1; do
    out="$RUNS/nih-focal-stage$stage"
    resume=()
    [ -f "$out/last.pt" ] && resume=(--resume)
    echo "== NIH focal, stage $stage (init $prev) -> $out"
    $CXR train --config recipes/nih_focal.toml --shards "$SHARDS" --out "$out" --stage "$stage" --init "$prev" \
        "${resume[@]}" "$@"
    prev="$out/best.pt"
done
