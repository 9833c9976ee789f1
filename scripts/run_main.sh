#!/usr/bin/env bash
# The main job for a newcomer: install dependencies, build prehoc, and generate text from the
# shipped small model with the embedded engine (CPU when there is no GPU), printing the text,
# tokens/s and the sparsity report. Extra arguments go to `prehoc generate`, e.g.
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
exec "$BUILD_DIR/bin/prehoc" generate --model models/prehoc-code-ar --max-tokens 200 "$@"
