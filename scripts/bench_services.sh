#!/usr/bin/env bash
# Split (prehoc-cachemgr + prehoc-worker processes) vs embedded serving throughput, same run.
# For each concurrency in $STREAMS, runs `prehoc loadgen` (closed loop) against:
#   in-process  the embedded backend inside loadgen (Router + Scheduler, no gRPC)
#   serve       `prehoc serve` (embedded mode behind gRPC: one process, one hop)
#   split       prehoc-cachemgr -> prehoc-worker (two processes, two hops)
# and prints one result line per (mode, streams) plus a markdown table.
# Each (streams, mode) is measured REPEATS times, modes interleaved; the table shows the run with
# the median tokens/s.
# Environment: BIN (build/bin), MODEL (models/prehoc-code-ar), THREADS (engine threads, 0 = all),
# STREAMS ("1 4 16"), PROMPT_LEN (128), MAX_TOKENS (128), REQS_PER_STREAM (4), MAX_RUNNING (32),
# REPEATS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-build/bin}
MODEL=${MODEL:-models/prehoc-code-ar}
THREADS=${THREADS:-0}
STREAMS=${STREAMS:-"1 4 16"}
PROMPT_LEN=${PROMPT_LEN:-128}
MAX_TOKENS=${MAX_TOKENS:-128}
REQS_PER_STREAM=${REQS_PER_STREAM:-4}
MAX_RUNNING=${MAX_RUNNING:-32}
REPEATS=${REPEATS:-3}
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

start() {  # name, ready-pattern, command...: starts a server, waits for its ready line on stdout
  local name=$1 pattern=$2
  shift 2
  mkfifo "$TMP/$name.out"
  "$@" >"$TMP/$name.out" 2>"$TMP/$name.log" &
  PIDS+=($!)
  exec {fd}<"$TMP/$name.out"
  local line=""
  while read -r -t 120 line <&"$fd"; do
    [[ "$line" == *"$pattern"* ]] && { echo "$line"; return 0; }
  done
  echo "$name did not start" >&2; cat "$TMP/$name.log" >&2; return 1
}

COMMON=(--model "$MODEL" --threads "$THREADS" --max-running "$MAX_RUNNING" --metrics-listen= \
        --log-level warning)
SERVE=$(start serve "ready" "$BIN/prehoc" serve --listen 127.0.0.1:0 "${COMMON[@]}")
SERVE_PORT=$(sed -n 's/.*grpc_port=\([0-9]*\).*/\1/p' <<<"$SERVE")
CM=$(start cachemgr "ready" "$BIN/prehoc-cachemgr" --listen 127.0.0.1:0 --metrics-listen= \
       --log-level warning)
CM_PORT=$(sed -n 's/.*grpc_port=\([0-9]*\).*/\1/p' <<<"$CM")
start worker "ready" "$BIN/prehoc-worker" --listen 127.0.0.1:0 --cachemgr "127.0.0.1:$CM_PORT" \
  "${COMMON[@]}" >/dev/null
# Wait until the worker is registered: a tiny request succeeds through the cache manager.
for _ in $(seq 1 100); do
  "$BIN/prehoc" loadgen --target "127.0.0.1:$CM_PORT" --streams 1 --requests 1 --warmup 0 \
    --prompt-len 4 --max-tokens 1 >/dev/null 2>&1 && break
done

echo "device: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "model: $MODEL threads=$THREADS prompt_len=$PROMPT_LEN max_tokens=$MAX_TOKENS"
RESULTS=()
for s in $STREAMS; do
  n=$((s * REQS_PER_STREAM))
  LG=(--streams "$s" --requests "$n" --warmup "$s" --prompt-len "$PROMPT_LEN" \
      --max-tokens "$MAX_TOKENS")
  for _ in $(seq 1 "$REPEATS"); do
    RESULTS+=("$("$BIN/prehoc" loadgen --label in-process --model "$MODEL" --threads "$THREADS" \
                   --max-running "$MAX_RUNNING" "${LG[@]}")")
    RESULTS+=("$("$BIN/prehoc" loadgen --label serve --target "127.0.0.1:$SERVE_PORT" "${LG[@]}")")
    RESULTS+=("$("$BIN/prehoc" loadgen --label split --target "127.0.0.1:$CM_PORT" "${LG[@]}")")
    printf '%s\n' "${RESULTS[@]: -3}"
  done
done

echo
echo "| streams | mode | tokens/s (median of $REPEATS) | vs in-process | ITL p50 ms | ITL p99 ms | TTFT p50 ms |"
echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${RESULTS[@]}" | awk '
  function get(k,   i, a) { for (i = 1; i <= NF; ++i) { split($i, a, "="); if (a[1] == k) return a[2] } return "" }
  { key = get("streams") " " $2; runs[key] = runs[key] "\n" get("tokens_per_s") " " get("itl_p50_ms") " " get("itl_p99_ms") " " get("ttft_p50_ms");
    if (!(get("streams") in seen)) { seen[get("streams")] = 1; order[++n] = get("streams") } }
  END {
    split("in-process serve split", modes, " ")
    for (i = 1; i <= n; ++i) {
      base = 0
      for (m = 1; m <= 3; ++m) {
        key = order[i] " " modes[m]
        cnt = split(substr(runs[key], 2), lines, "\n")
        for (a = 1; a <= cnt; ++a) for (b = a + 1; b <= cnt; ++b) {
          split(lines[a], x, " "); split(lines[b], y, " ")
          if (y[1] + 0 < x[1] + 0) { t = lines[a]; lines[a] = lines[b]; lines[b] = t }
        }
        split(lines[int((cnt + 1) / 2)], med, " ")
        if (m == 1) base = med[1]
        printf "| %s | %s | %.1f | %.3f | %s | %s | %s |\n", order[i], modes[m], med[1], med[1] / base, med[2], med[3], med[4]
      }
    }
  }'
