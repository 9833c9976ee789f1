#!/usr/bin/env bash
# Installs dependencies, builds prehoc with tests, and runs the whole test suite:
#   1. Release build (CUDA backend too when nvcc is present; GPU tests skip without a device)
#   2. ASan+UBSan build of the CPU code, same tests
#   3. TSan build of the CPU code, same tests
# Usage: scripts/run_tests.sh [--no-sanitizers]
# Environment: JOBS (default 2), BUILD_ROOT (default ./build).
set -euo pipefail
cd "$(dirname "$0")/.."

sanitizers=1
for arg in "$@"; do
  case "$arg" in
    --no-sanitizers) sanitizers=0 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "run_tests.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

JOBS=${JOBS:-2}
BUILD_ROOT=${BUILD_ROOT:-build}

bash scripts/install_deps.sh

run_suite() {  # name, build dir, extra cmake args...
  local name=$1 dir=$2
  shift 2
  echo "=== [$name] configure + build in $dir"
  mkdir -p "$dir"
  cmake -S . -B "$dir" -G Ninja -DPREHOC_BUILD_TESTS=ON "$@" >"$dir/configure.log" 2>&1 ||
    { cat "$dir/configure.log"; return 1; }
  cmake --build "$dir" -j "$JOBS"
  echo "=== [$name] test"
  (cd "$dir" && ctest -j "$JOBS" --output-on-failure --timeout 600)
}


run_suite release "$BUILD_ROOT" -DCMAKE_BUILD_TYPE=Release
if [ "$sanitizers" = 1 ]; then
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_suite asan "$BUILD_ROOT-asan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPREHOC_SANITIZE=address \
    -DPREHOC_ENABLE_CUDA=OFF
  TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/common/tsan/suppressions.txt" \
    run_suite tsan "$BUILD_ROOT-tsan" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPREHOC_SANITIZE=thread \
    -DPREHOC_ENABLE_CUDA=OFF
fi
echo "=== all test suites passed"
