#!/usr/bin/env bash
# Builds prehoc here for the GPU machine (sm_90a, Release, tests + benchmarks, in build-cuda/) and
# packs the requested binaries, stripped, with the non-system shared libraries they need into the
# git-ignored folder .device/ (bin/ and lib/). Pass `.device` in the `run` tool's `carry` list and
# start programs there with scripts/device_run.sh. See docs/kernels.md.
#
# Usage: scripts/device_pack.sh [TARGET...]
#   TARGET: a CMake target whose executable lands in build-cuda/bin or build-cuda/tests.
#   Default: worker_kernels_paged_decode_test attention_bench.
# Environment: JOBS (default 2), BUILD_DIR (default build-cuda), CUDA_ARCH (default 90a),
#   MAX_MB (default 40: fail if .device/ grows past it; the carried tree must stay under 64 MiB),
#   DEVICE_DIR (default .device; a git-ignored folder, e.g. build-cuda-model/device, so that
#   sessions packing different binaries do not overwrite each other's; carry that folder and
#   set the same DEVICE_DIR for scripts/device_run.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS=${JOBS:-2}
BUILD_DIR=${BUILD_DIR:-build-cuda}
CUDA_ARCH=${CUDA_ARCH:-90a}
MAX_MB=${MAX_MB:-40}
DEVICE_DIR=${DEVICE_DIR:-.device}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(worker_kernels_paged_decode_test attention_bench)
fi
export PATH="$PATH:/usr/local/cuda/bin"

if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPREHOC_BUILD_TESTS=ON \
    -DPREHOC_BUILD_BENCHMARKS=ON -DPREHOC_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
    >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
fi
cmake --build "$BUILD_DIR" -j "$JOBS" --target "${targets[@]}"

rm -rf "$DEVICE_DIR/bin" "$DEVICE_DIR/lib"
mkdir -p "$DEVICE_DIR/bin" "$DEVICE_DIR/lib"
# Libraries the GPU machine provides itself (glibc, the C++ runtime, the CUDA driver/toolkit).
system_lib='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+\.|libgcc_s\.|libcuda\.|libcudart\.|libcublas|libcublasLt|libnv|libcudnn|libcurand|libcufft|libcusparse|libcusolver|libnccl)'
for t in "${targets[@]}"; do
  exe=""
  for d in "$BUILD_DIR/bin" "$BUILD_DIR/tests"; do
    if [ -x "$d/$t" ]; then exe="$d/$t"; break; fi
  done
  [ -n "$exe" ] || { echo "device_pack: no executable for target '$t'" >&2; exit 1; }
  cp "$exe" "$DEVICE_DIR/bin/$t"
  strip --strip-unneeded "$DEVICE_DIR/bin/$t"
  ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | while read -r name path; do
    if [[ ! "$name" =~ $system_lib ]] && [ ! -f "$DEVICE_DIR/lib/$name" ]; then
      cp -L "$path" "$DEVICE_DIR/lib/$name"
      strip --strip-unneeded "$DEVICE_DIR/lib/$name" 2>/dev/null || true
    fi
  done
done
# GoogleTest's ctest files are not needed there: the runner calls the test binaries directly.
git rev-parse HEAD >"$DEVICE_DIR/COMMIT" 2>/dev/null || true
size_kb=$(du -sk "$DEVICE_DIR" | cut -f1)
echo "device_pack: $DEVICE_DIR/ is $((size_kb / 1024)) MiB:"
ls -la "$DEVICE_DIR/bin" "$DEVICE_DIR/lib"
if [ "$size_kb" -gt $((MAX_MB * 1024)) ]; then
  echo "device_pack: $DEVICE_DIR/ exceeds ${MAX_MB} MiB" >&2
  exit 1
fi
