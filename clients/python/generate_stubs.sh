#!/usr/bin/env bash
# Generates the Python message and gRPC stubs for prehoc's protos into OUT_DIR (default
# clients/python/gen), using protoc and grpc_python_plugin from Debian's protobuf-compiler and
# protobuf-compiler-grpc. Import them with OUT_DIR on sys.path: `from prehoc.v1 import ...`.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-clients/python/gen}
PLUGIN=$(command -v grpc_python_plugin || true)
if [ -z "$PLUGIN" ]; then
  echo "generate_stubs.sh: grpc_python_plugin not found (apt-get install protobuf-compiler-grpc)" >&2
  exit 1
fi
mkdir -p "$OUT"
protoc -I proto --python_out="$OUT" --grpc_python_out="$OUT" \
  --plugin=protoc-gen-grpc_python="$PLUGIN" \
  proto/prehoc/v1/common.proto proto/prehoc/v1/inference.proto proto/prehoc/v1/cachemgr.proto
echo "generate_stubs.sh: stubs in $OUT"
