#!/usr/bin/env bash
# The main job for a newcomer: install dependencies, build prehoc, and generate text from the
# shipped small code model with the embedded engine (CPU when there is no GPU), printing the
# text, tokens/s and the sparsity report.
#
# The default prompt is a 4K-token held-out Python file with a planted line
# `KEY_eab7 = "jo9360"` at 39 % depth that ends by asking for KEY_eab7 again; decoding runs
# with pre-hoc sparse attention (PrHS at a 1/8 budget), so the continuation shows whether the
# selected 1/8 of the KV cache still held the answer. Arguments replace the defaults, e.g.
#   scripts/run_main.sh --prompt "def quicksort(xs):" --max-tokens 200
# Environment: JOBS (default 2), BUILD_DIR (default ./build).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
BUILD_DIR=${BUILD_DIR:-build}

bash scripts/install_deps.sh
mkdir -p "$BUILD_DIR"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release >"$BUILD_DIR/configure.log" 2>&1 ||
  { cat "$BUILD_DIR/configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "$JOBS" --target prehoc
if [ $# -eq 0 ]; then
  set -- --prompt-file tests/data/examples/needle_4k.py --policy prhs --budget 0.125 --max-tokens 48
fi
exec "$BUILD_DIR/bin/prehoc" generate --model models/prehoc-code-ar "$@"
