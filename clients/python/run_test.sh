#!/usr/bin/env bash
# Runs test_client.py against a live `prehoc serve` on the tiny fixture model (Generate) and one
# on the shipped diffusion model (Diffuse).
# Usage: clients/python/run_test.sh BIN_DIR   (exit 77 = skipped: Python gRPC not installed)
set -euo pipefail
BIN=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FIXTURE=$ROOT/tests/fixtures/hf/llama_gqa_f32
# Debian's python3-grpcio lives in /usr/bin/python3's dist-packages (a pyenv python3 on PATH
# would not see it).
PY=""
for p in /usr/bin/python3 python3; do
  if "$p" -c "import grpc, google.protobuf" 2>/dev/null; then PY=$p; break; fi
done
if [ -z "$PY" ]; then
  echo "SKIP: python3-grpcio / python3-protobuf are not installed (scripts/install_deps.sh)"
  exit 77
fi
TMP=$(mktemp -d)
PID=""
DLM_PID=""
cleanup() {
  if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  if [ -n "$DLM_PID" ]; then
    kill -TERM "$DLM_PID" 2>/dev/null || true; wait "$DLM_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
bash "$ROOT/clients/python/generate_stubs.sh" "$TMP/gen" >/dev/null

PROMPT=256,10,20,30,40
IDS=$("$BIN/prehoc" generate --model "$FIXTURE" --prompt-ids "$PROMPT" --max-tokens 12 \
        --no-stop-at-eos --print-ids --threads 1 --log-level error | sed -n 's/^ids: //p' | tr ' ' ',')
[ -n "$IDS" ] || { echo "could not get the embedded reference ids"; exit 1; }

mkfifo "$TMP/out"
"$BIN/prehoc" serve --model "$FIXTURE" --model-name tiny --listen 127.0.0.1:0 --metrics-listen= \
  --threads 1 --kv-cache-mb 16 --log-level warning >"$TMP/out" 2>"$TMP/serve.log" &
PID=$!
exec 3<"$TMP/out"
if ! read -r -t 60 LINE <&3; then
  echo "server did not start:"; cat "$TMP/serve.log"; exit 1
fi
PORT=$(echo "$LINE" | sed -n 's/.*grpc_port=\([0-9]*\).*/\1/p')

# Diffuse: `prehoc serve` on the shipped diffusion model, checked against `prehoc diffuse` (the
# decoder in process) with the arguments of test_client.py's DIFFUSE_ARGS.
DLM=$ROOT/models/prehoc-code-dlm
DLM_IDS=$("$BIN/prehoc" diffuse --model "$DLM" --prompt-ids "$PROMPT" --gen-length 8 \
            --block-length 4 --steps 8 --cache spa --temperature 0.5 --seed 3 --threads 1 \
            --print-ids --log-level error | sed -n 's/^ids: //p' | tr ' ' ',')
[ -n "$DLM_IDS" ] || { echo "could not get the diffusion reference ids"; exit 1; }
mkfifo "$TMP/dlm_out"
"$BIN/prehoc" serve --model "$DLM" --model-name code-dlm --listen 127.0.0.1:0 --metrics-listen= \
  --threads 1 --kv-cache-mb 16 --log-level warning >"$TMP/dlm_out" 2>"$TMP/dlm_serve.log" &
DLM_PID=$!
exec 4<"$TMP/dlm_out"
if ! read -r -t 60 LINE <&4; then
  echo "diffusion server did not start:"; cat "$TMP/dlm_serve.log"; exit 1
fi
DLM_PORT=$(echo "$LINE" | sed -n 's/.*grpc_port=\([0-9]*\).*/\1/p')

RC=0
PREHOC_TARGET=127.0.0.1:$PORT PREHOC_PROMPT_IDS=$PROMPT PREHOC_EXPECTED_IDS=$IDS \
  PREHOC_DLM_TARGET=127.0.0.1:$DLM_PORT PREHOC_DLM_EXPECTED_IDS=$DLM_IDS \
  PREHOC_PY_STUBS=$TMP/gen "$PY" "$ROOT/clients/python/test_client.py" || RC=$?
if [ "$RC" != 0 ]; then  # the servers' logs (sanitizer reports land there)
  echo "--- prehoc serve (tiny) log:"; cat "$TMP/serve.log"
  echo "--- prehoc serve (code-dlm) log:"; cat "$TMP/dlm_serve.log"
fi
exit "$RC"
