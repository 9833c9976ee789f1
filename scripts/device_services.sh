#!/usr/bin/env bash
# GPU serving over gRPC, multi-process vs embedded, in one run (see docs/services.md, "GPU
# serving"). Starts, on loopback ports:
#   split:    prehoc-cachemgr + prehoc-worker --device $DEVICE for models/prehoc-code-ar (Generate)
#             + prehoc-worker --device $DEVICE for models/prehoc-code-dlm (Diffuse), registered
#             with the cache manager;
#   embedded: `prehoc serve --device $DEVICE` for each of the two models;
# waits for readiness through grpc.health.v1 + ListModels (`prehoc loadgen --wait-ready`, no
# sleeps), checks from the servers' logs that every model runs on the backend asked for, then runs
# `prehoc loadgen` (closed loop) for each streams count in $STREAMS: Generate dense and prhs, Diffuse
# spa and none, split and embedded interleaved. Scrapes /metrics of every server, shuts all down
# with SIGTERM (drain) and checks exit statuses. Everything goes to $OUT:
#   results.txt   loadgen result lines, checks, the summary table; services.tgz: logs, metrics.
# Exit status: 0 when every check and every loadgen run passed.
#
# On the GPU machine (run tool, carry ["build-serve/device"]):
#   DEVICE_DIR=build-serve/device scripts/device_services.sh
# Here (CPU, for the script itself): BIN=build-serve/bin DEVICE=cpu OUT=/tmp/svc scripts/device_services.sh
# Environment: DEVICE_DIR (.device; bin/ and lib/ from scripts/device_pack.sh), BIN
# ($DEVICE_DIR/bin), DEVICE (cuda), OUT (/tmp/device_services), BASE_PORT (50150: gRPC ports
# BASE..BASE+4, metrics ports BASE+10..BASE+14), STREAMS ("1 4 16"), PROMPT_LEN (128),
# MAX_TOKENS (128, Generate), GEN_LENGTH (64, Diffuse), BLOCK_LENGTH (32), REQS_PER_STREAM (4),
# MAX_RUNNING (32), DLM_MAX_RUNNING (16), THREADS (0: CPU threads, DEVICE=cpu only),
# DEADLINE_S (0 = none: loadgen runs not started within this many seconds of the servers' start
# are skipped, and reported as such, so that metrics and the drain still happen in a short lease),
# WARMUP_ROUNDS (0: whole passes over every (streams, workload, mode) run first and not recorded,
# so that lazy per-shape work such as the GPU backend's GEMM autotuning happens before measuring),
# ROUNDS (1: measured passes; the mode that goes first alternates between rounds; with ROUNDS > 1
# the summary gives per cell the median tokens/s of each mode and the median of the per-round
# split / embedded ratios, with their min and max).
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE_DIR=${DEVICE_DIR:-.device}
BIN=${BIN:-$DEVICE_DIR/bin}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/device_services}
BASE_PORT=${BASE_PORT:-50150}
STREAMS=${STREAMS:-"1 4 16"}
PROMPT_LEN=${PROMPT_LEN:-128}
MAX_TOKENS=${MAX_TOKENS:-128}
GEN_LENGTH=${GEN_LENGTH:-64}
BLOCK_LENGTH=${BLOCK_LENGTH:-32}
REQS_PER_STREAM=${REQS_PER_STREAM:-4}
MAX_RUNNING=${MAX_RUNNING:-32}
DLM_MAX_RUNNING=${DLM_MAX_RUNNING:-16}
THREADS=${THREADS:-0}
DEADLINE_S=${DEADLINE_S:-0}
WARMUP_ROUNDS=${WARMUP_ROUNDS:-0}
ROUNDS=${ROUNDS:-1}
AR=prehoc-code-ar
DLM=prehoc-code-dlm
if [ -d "$DEVICE_DIR/lib" ]; then
  export LD_LIBRARY_PATH="$PWD/$DEVICE_DIR/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
mkdir -p "$OUT/logs" "$OUT/metrics"
RESULTS="$OUT/results.txt"
: >"$RESULTS"
FAILED=0
say() { echo "$*" | tee -a "$RESULTS"; }
fail() { say "FAIL: $*"; FAILED=1; }

say "device_services: $(date -u +%FT%TZ) commit=$(cat "$DEVICE_DIR/COMMIT" 2>/dev/null || git rev-parse HEAD 2>/dev/null) device=$DEVICE"
if command -v nvidia-smi >/dev/null; then
  say "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
fi
say "cpu: $(nproc) cores; prompt_len=$PROMPT_LEN max_tokens=$MAX_TOKENS gen_length=$GEN_LENGTH block_length=$BLOCK_LENGTH reqs_per_stream=$REQS_PER_STREAM warmup_rounds=$WARMUP_ROUNDS rounds=$ROUNDS"

# name -> "pid grpc_port metrics_port"
declare -A PID GRPC METRICS
start() {  # name, index, command...
  local name=$1 i=$2
  shift 2
  GRPC[$name]=$((BASE_PORT + i))
  METRICS[$name]=$((BASE_PORT + 10 + i))
  "$@" --listen "127.0.0.1:${GRPC[$name]}" --metrics-listen "127.0.0.1:${METRICS[$name]}" \
    >"$OUT/logs/$name.log" 2>&1 &
  PID[$name]=$!
}
cleanup() {  # only on an early exit: servers still running are killed
  for n in "${!PID[@]}"; do kill -KILL "${PID[$n]}" 2>/dev/null || true; done
}
trap cleanup EXIT

COMMON=(--device "$DEVICE" --threads "$THREADS" --max-running "$MAX_RUNNING"
        --dlm-max-running "$DLM_MAX_RUNNING" --drain-timeout-s 20 --log-level info)
T0=$(date +%s%N)
elapsed() { echo "$((($(date +%s%N) - T0) / 1000000)) ms"; }
start cachemgr 0 "$BIN/prehoc-cachemgr" --heartbeat-interval-ms 500 --drain-timeout-s 20 \
  --log-level info
start worker-ar 1 "$BIN/prehoc-worker" --model "models/$AR" --cachemgr "127.0.0.1:${GRPC[cachemgr]}" \
  "${COMMON[@]}"
start worker-dlm 2 "$BIN/prehoc-worker" --model "models/$DLM" \
  --cachemgr "127.0.0.1:${GRPC[cachemgr]}" "${COMMON[@]}"
start serve-ar 3 "$BIN/prehoc" serve --model "models/$AR" "${COMMON[@]}"
start serve-dlm 4 "$BIN/prehoc" serve --model "models/$DLM" "${COMMON[@]}"

# Readiness: health "readiness" SERVING and the model listed (the cache manager lists only the
# models of registered, ready workers). One tiny request each also proves the path.
for pair in "cachemgr $AR generate" "cachemgr $DLM diffuse" "serve-ar $AR generate" \
            "serve-dlm $DLM diffuse"; do
  read -r srv model rpc <<<"$pair"
  if ! "$BIN/prehoc" loadgen --target "127.0.0.1:${GRPC[$srv]}" --wait-ready 120 \
       --model-name "$model" --rpc "$rpc" --streams 1 --requests 1 --warmup 0 --prompt-len 8 \
       --max-tokens 4 --label "probe-$srv-$model" >>"$OUT/logs/probes.log" 2>&1; then
    fail "$srv ($model, $rpc) did not become ready: $(tail -2 "$OUT/logs/probes.log")"
  fi
done
say "ready: all servers answered after $(elapsed)"
[ "$FAILED" = 0 ] || { for n in "${!PID[@]}"; do tail -5 "$OUT/logs/$n.log"; done; exit 1; }

# The backend each model runs on, from the servers' own log lines (worker/backend_factory.cc,
# worker/dlm/dlm_runner.cc). Generate: "device=cuda: using CUDA on ..."; Diffuse:
# "dlm device=cuda: using <backend>".
if [ "$DEVICE" = cuda ]; then
  want_ar="device=cuda: using CUDA on"
  want_dlm="dlm device=cuda: using"
else
  want_ar="device=$DEVICE: using the CPU engine"
  want_dlm="dlm device=$DEVICE: using"
fi
for n in worker-ar serve-ar worker-dlm serve-dlm; do
  line=$(grep -m1 -F "$want_ar" "$OUT/logs/$n.log" | sed 's/^.*\] //')
  [ -n "$line" ] && say "backend $n: $line" || fail "$n: no '$want_ar' log line"
done
for n in worker-dlm serve-dlm; do
  line=$(grep -m1 -F "$want_dlm" "$OUT/logs/$n.log" | sed 's/^.*\] //')
  [ -n "$line" ] && say "backend $n (diffuse): $line" || fail "$n: no '$want_dlm' log line"
done
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader \
    >"$OUT/logs/nvidia-smi-apps.txt" 2>&1
  for n in worker-ar worker-dlm serve-ar serve-dlm; do
    if grep -q "^${PID[$n]}," "$OUT/logs/nvidia-smi-apps.txt"; then
      say "gpu process $n: $(grep "^${PID[$n]}," "$OUT/logs/nvidia-smi-apps.txt")"
    elif [ "$DEVICE" = cuda ]; then
      say "note: pid ${PID[$n]} ($n) not in nvidia-smi's compute apps (container pid namespace?)"
    fi
  done
fi

# ---- Load: WARMUP_ROUNDS unrecorded passes, then ROUNDS measured ones (lines tagged round=R).
LINES="$OUT/loadgen.txt"
: >"$LINES"
for ((r = 1 - WARMUP_ROUNDS; r <= ROUNDS; ++r)); do
  # Alternate which mode goes first, so a drift within a pass does not favour one mode.
  [ $(((r + 2 * WARMUP_ROUNDS) % 2)) = 1 ] && modes="split embedded" || modes="embedded split"
  for s in $STREAMS; do
    n=$((s * REQS_PER_STREAM))
    for wl in "generate dense" "generate prhs" "diffuse spa" "diffuse none"; do
      read -r rpc pol <<<"$wl"
      if [ "$rpc" = generate ]; then
        model=$AR; embedded=serve-ar; args=(--policy "$pol" --max-tokens "$MAX_TOKENS")
      else
        model=$DLM; embedded=serve-dlm
        args=(--cache "$pol" --max-tokens "$GEN_LENGTH" --block-length "$BLOCK_LENGTH")
      fi
      for mode in $modes; do
        [ "$mode" = split ] && srv=cachemgr || srv=$embedded
        if [ "$DEADLINE_S" != 0 ] && [ $(($(date +%s) - T0 / 1000000000)) -ge "$DEADLINE_S" ]; then
          fail "skipped (DEADLINE_S=$DEADLINE_S reached): loadgen round $r $mode $rpc $pol streams=$s"
          continue
        fi
        line=$(timeout 60 "$BIN/prehoc" loadgen --target "127.0.0.1:${GRPC[$srv]}" \
                 --wait-ready 30 --model-name "$model" --rpc "$rpc" "${args[@]}" \
                 --streams "$s" --requests "$n" --warmup "$s" --prompt-len "$PROMPT_LEN" \
                 --label "$mode" 2>>"$OUT/logs/loadgen.err")
        rc=$?
        [ "$rc" = 0 ] || fail "loadgen round $r $mode $rpc $pol streams=$s: exit $rc ($(tail -1 "$OUT/logs/loadgen.err"))"
        [ -n "$line" ] || continue
        if [ "$r" -ge 1 ]; then
          echo "$line round=$r" >>"$LINES"
          say "$line round=$r"
        else
          echo "$line round=$r (warm-up, not recorded)" >>"$OUT/logs/warmup.txt"
        fi
      done
    done
  done
done

# ---- Metrics, then drain.
scrape() {  # name
  local port=${METRICS[$1]} f="$OUT/metrics/$1.prom"
  if command -v curl >/dev/null; then
    curl -sS --max-time 10 "http://127.0.0.1:$port/metrics" >"$f" 2>&1
  else
    python3 -c "import sys,urllib.request; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$port/metrics', timeout=10).read().decode())" >"$f" 2>&1
  fi || fail "scrape $1 (port $port)"
  say "metrics $1: $(grep -c '^prehoc_' "$f") prehoc_ samples"
}
for n in cachemgr worker-ar worker-dlm serve-ar serve-dlm; do scrape "$n"; done
# Generated-token counters on each worker / server (what ran where).
for n in worker-ar worker-dlm serve-ar serve-dlm; do
  say "tokens $n: $(grep -E '^prehoc_(generation_tokens_total|dlm_generated_tokens_total)' "$OUT/metrics/$n.prom" | grep -v ' 0$' | tr '\n' ' ')"
done

stop() {  # name: SIGTERM (drain), wait, check exit 0
  kill -TERM "${PID[$1]}" 2>/dev/null
  wait "${PID[$1]}"
  local rc=$?
  unset "PID[$1]"
  [ "$rc" = 0 ] && say "exit $1: 0" || fail "exit $1: $rc"
}
# Workers first (the cache manager sees them deregister / stop heartbeating), then the rest.
for n in worker-ar worker-dlm serve-ar serve-dlm cachemgr; do stop "$n"; done
trap - EXIT

# ---- Summary table: split vs embedded per (workload, streams); medians over the measured rounds.
{
  echo
  echo "| workload | streams | mode | tokens/s (median of $ROUNDS) | split / embedded: median of rounds [min, max] | ITL p50 ms (last round) | ITL p99 ms | TTFT p50 ms | TTFT p99 ms |"
  echo "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  awk '
    function get(k,   i, a) { for (i = 1; i <= NF; ++i) { split($i, a, "="); if (a[1] == k) return a[2] } return "" }
    function median(list,   v, m, i, j, t) {  # list: space-separated numbers
      m = split(list, v, " ")
      for (i = 2; i <= m; ++i) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; --j) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
      if (m == 0) return ""
      return m % 2 ? v[(m + 1) / 2] : (v[m / 2] + v[m / 2 + 1]) / 2
    }
    { wl = get("rpc") " " (get("rpc") == "generate" ? get("policy") : get("cache"))
      key = wl SUBSEP get("streams")
      if (!(key in seen)) { seen[key] = 1; order[++n] = key }
      r = get("round")
      tps[key, $2] = tps[key, $2] " " get("tokens_per_s")
      by_round[key, $2, r] = get("tokens_per_s")
      rounds[key, r] = 1
      row[key, $2] = sprintf("%s | %s | %s | %s", get("itl_p50_ms"), get("itl_p99_ms"), get("ttft_p50_ms"), get("ttft_p99_ms")) }
    END {
      for (i = 1; i <= n; ++i) {
        split(order[i], k, SUBSEP)
        ratios = ""; lo = ""; hi = ""
        for (rk in rounds) {
          split(rk, q, SUBSEP)
          if (q[1] SUBSEP q[2] != order[i]) continue
          s = by_round[order[i], "split", q[3]]; e = by_round[order[i], "embedded", q[3]]
          if (s == "" || e == "" || e + 0 <= 0) continue
          x = s / e; ratios = ratios " " x
          if (lo == "" || x < lo) lo = x
          if (hi == "" || x > hi) hi = x
        }
        for (m = 1; m <= 2; ++m) {
          mode = m == 1 ? "split" : "embedded"
          if (!((order[i], mode) in tps)) continue
          ratio = (m == 1 && ratios != "") ? sprintf("%.3f [%.3f, %.3f]", median(ratios), lo, hi) : ""
          printf "| %s | %s | %s | %.1f | %s | %s |\n", k[1], k[2], mode, median(tps[order[i], mode]), ratio, row[order[i], mode]
        }
      }
    }' "$LINES"
} | tee -a "$RESULTS"

tar -czf "$OUT/services.tgz" -C "$OUT" logs metrics loadgen.txt 2>/dev/null && rm -rf "$OUT/logs" "$OUT/metrics"
say "device_services: done in $(elapsed), $([ "$FAILED" = 0 ] && echo 'all checks passed' || echo 'FAILURES above')"
exit "$FAILED"
