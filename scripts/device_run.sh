#!/usr/bin/env bash
# Runs a binary packed by scripts/device_pack.sh, on the GPU machine, from the repository root:
#   scripts/device_run.sh BINARY [ARGS...]
# (BINARY is a name in .device/bin, or in $DEVICE_DIR/bin when DEVICE_DIR is set). The packed
# non-system libraries come first on the loader path. Carry that folder in the `run` tool call.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE_DIR=${DEVICE_DIR:-.device}
bin=${1:?usage: scripts/device_run.sh BINARY [ARGS...]}
shift
[ -x "$DEVICE_DIR/bin/$bin" ] || { echo "device_run: $DEVICE_DIR/bin/$bin not found (run scripts/device_pack.sh here first and carry .device)" >&2; exit 127; }
export LD_LIBRARY_PATH="$PWD/$DEVICE_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$DEVICE_DIR/bin/$bin" "$@"
