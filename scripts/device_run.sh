#!/usr/bin/env bash
# Runs a binary packed by scripts/device_pack.sh, on the GPU machine, from the repository root:
#   scripts/device_run.sh BINARY [ARGS...]
# (BINARY is a name in .device/bin). The packed non-system libraries come first on the loader
# path. Carry `.device` in the `run` tool call.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: scripts/device_run.sh BINARY [ARGS...]}
shift
[ -x ".device/bin/$bin" ] || { echo "device_run: .device/bin/$bin not found (run scripts/device_pack.sh here first and carry .device)" >&2; exit 127; }
export LD_LIBRARY_PATH="$PWD/.device/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec ".device/bin/$bin" "$@"
