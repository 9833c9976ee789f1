#!/usr/bin/env bash
# One full training command on the GPU machine (run from the repo root; $OUT set by the
# device tool):  bash tools/train/run_model.sh ar|dlm TRAIN_SECONDS [extra train.py args]
# Trains, exports, checks against transformers, evaluates on tests/data and writes fixtures;
# packs the result as $OUT/KIND.tar.part-* (<= 15 MB each) plus the log and summary.
set -uo pipefail
KIND=$1; SECS=$2; shift 2
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=/tmp/prehoc_$KIND
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
timeout 575 python3 tools/train/train.py --kind "$KIND" --out "$W" --train-seconds "$SECS" "$@" 2>&1 \
  | grep --line-buffered -v "Loading weights\|Writing model shards" | tee "$OUT/train_$KIND.log"
cp "$W/summary.json" "$OUT/summary_$KIND.json" 2>/dev/null
(cd "$W" && tar -cf - model fixtures summary.json 2>/dev/null) | split -b 15000000 - "$OUT/$KIND.tar.part-"
ls -la "$OUT"
