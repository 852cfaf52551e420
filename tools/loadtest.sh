#!/usr/bin/env bash
# The measurement behind docs/loadtest.md, in one run: starts `stylealign serve` on loopback
# (tiny model) with batching on, then off (default settings otherwise: 1 CPU worker, 8 rows per
# batch, 20 ms batch delay); runs `stylealign loadtest` with 1, 4 and 16 clients against each
# (closed loop, CASE_DURATION each) while reading the server's CPU time from /proc; then a soak
# (SOAK_DURATION) against the batching-on server, warm from its cases, with its RSS from
# /proc/<pid>/status and /metrics; then three 16-client variants that show where the limit is
# (16 rows per batch; 2 CPU workers with batching on and off); stops the servers. Prints a
# Markdown summary; the JSON reports stay in OUT.
#
#   tools/loadtest.sh                       # ~7 min: 9 × 30 s + 120 s soak
#   CASE_DURATION=10s SOAK_DURATION=20s tools/loadtest.sh   # a quick look
#
# Env: STYLEALIGN_BIN (default: build target/release/stylealign), OUT (default
# target/loadtest/<time>), CASE_DURATION (30s), SOAK_DURATION (120s), SOAK_CLIENTS (4),
# CLIENTS (1 4 16), EXTRAS (1; 0 skips the variants), IMAGES (2), STEPS (8), SIZE (32).
# Ports: ephemeral (127.0.0.1:0). Needs jq and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

CASE_DURATION=${CASE_DURATION:-30s}
SOAK_DURATION=${SOAK_DURATION:-120s}
SOAK_CLIENTS=${SOAK_CLIENTS:-4}
CLIENTS=${CLIENTS:-1 4 16}
EXTRAS=${EXTRAS:-1}
IMAGES=${IMAGES:-2}
STEPS=${STEPS:-8}
SIZE=${SIZE:-32}
OUT=${OUT:-target/loadtest/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

if [[ -z "${STYLEALIGN_BIN:-}" ]]; then
    cargo build --release --bin stylealign >&2
    STYLEALIGN_BIN=target/release/stylealign
fi
BIN=$STYLEALIGN_BIN
# Nothing from the caller's environment configures the servers.
unset "${!STYLEALIGN_@}" 2>/dev/null || true
# One server at a time: a per-run secret (avoids the "random secret" warning in the logs).
export STYLEALIGN_SESSION_SECRET_FILE="$OUT/session-secret"
head -c 32 /dev/urandom | base64 >"$STYLEALIGN_SESSION_SECRET_FILE"

SERVER_PID=
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        wait "$SERVER_PID" || true
    fi
    SERVER_PID=
}
trap stop_server EXIT

# start_server NAME [serve flags...]: starts it on ephemeral loopback ports, waits until it is
# SERVING; sets ADDR and ADMIN.
start_server() {
    local name=$1 line=
    shift
    "$BIN" serve --model tiny --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 "$@" \
        >"$OUT/$name.stdout" 2>"$OUT/$name.log" &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        # "stylealign: gRPC on 127.0.0.1:P, admin (metrics, health) on 127.0.0.1:Q"
        line=$(head -1 "$OUT/$name.stdout" 2>/dev/null || true)
        if [[ "$line" == *" admin "* ]]; then
            ADDR=$(sed -E 's/^stylealign: gRPC on ([^,]+),.*/\1/' <<<"$line")
            ADMIN=$(sed -E 's/.* on ([^ ]+)$/\1/' <<<"$line")
            if curl -fsS "http://$ADMIN/healthz" >/dev/null 2>&1; then return 0; fi
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server $name exited; see $OUT/$name.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "server $name did not become SERVING" >&2
    exit 1
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "cpu: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
    echo "memory: $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB"}')"
    echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
    echo "loadavg before: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?') (other CPU work skews every number)"
    echo "load: tiny model, $IMAGES images/request, $STEPS steps, ${SIZE}x$SIZE, ddim; clients $CLIENTS; $CASE_DURATION per case; soak $SOAK_DURATION with $SOAK_CLIENTS clients"
} | tee "$OUT/machine.txt" >&2

CASES=()
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

# run_case NAME SETTINGS CLIENTS: one measurement against ADDR, with the server's CPU use.
run_case() {
    local name=$1 settings=$2 clients=$3
    local c0 c1 b0 b1 t0 t1 hz cores other f
    hz=$(getconf CLK_TCK)
    f="$OUT/case-$(( ${#CASES[@]} + 1 ))-$name-$clients"
    c0=$(cpu_ticks "$SERVER_PID"); b0=$(busy_ticks); t0=$(date +%s.%N)
    "$BIN" loadtest --server "$ADDR" --label "$name" --clients "$clients" --duration "$CASE_DURATION" \
        --images "$IMAGES" --steps "$STEPS" --size "$SIZE" --json >"$f.raw.json"
    c1=$(cpu_ticks "$SERVER_PID"); b1=$(busy_ticks); t1=$(date +%s.%N)
    cores=$(awk -v a="$c0" -v b="$c1" -v s="$t0" -v e="$t1" -v hz="$hz" 'BEGIN {printf "%.2f", (b - a) / hz / (e - s)}')
    # Everything else busy meanwhile: the load generator itself, and any other work (which
    # would skew the numbers).
    other=$(awk -v a="$b0" -v b="$b1" -v s="$t0" -v e="$t1" -v hz="$hz" -v c="$cores" 'BEGIN {printf "%.2f", (b - a) / hz / (e - s) - c}')
    jq --argjson cores "$cores" --argjson other "$other" --arg settings "$settings" '.runs[0] + {server_cpu_cores: $cores, other_cpu_cores: $other, settings: $settings}' \
        "$f.raw.json" >"$f.json"
    CASES+=("$f.json")
    echo "   $name ($settings), $clients clients: $(jq -r '"\(.images_per_s) images/s, p50 \(.latency_ms.p50) ms"' "$f.json"), server CPU $cores cores, other $other" >&2
}

t0=$(date +%s)
echo "== batching on" >&2
start_server on
for c in $CLIENTS; do run_case on "defaults" "$c"; done
echo "== soak ($SOAK_DURATION, $SOAK_CLIENTS clients, same server, warm)" >&2
"$BIN" loadtest --server "$ADDR" --label soak --soak --duration "$SOAK_DURATION" --clients "$SOAK_CLIENTS" \
    --images "$IMAGES" --steps "$STEPS" --size "$SIZE" --rss-every 10s \
    --server-pid "$SERVER_PID" --metrics "$ADMIN" --json >"$OUT/soak.json"
stop_server

echo "== batching off" >&2
start_server off --no-batching
for c in $CLIENTS; do run_case off "--no-batching" "$c"; done
stop_server

if [[ "$EXTRAS" != 0 ]]; then
    echo "== variants at 16 clients" >&2
    start_server on-rows16 --max-batch-rows 16
    run_case on "--max-batch-rows 16" 16
    stop_server
    start_server on-workers2 --cpu-workers 2
    run_case on "--cpu-workers 2" 16
    stop_server
    start_server off-workers2 --no-batching --cpu-workers 2
    run_case off "--no-batching --cpu-workers 2" 16
    stop_server
fi
echo "wall time: $(( $(date +%s) - t0 )) s; loadavg after: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')" | tee -a "$OUT/machine.txt" >&2

{
    echo
    echo "| batching | server settings | clients | requests | images/s | p50 ms | p95 ms | p99 ms | queue p50 ms | queue p95 ms | queue p99 ms | images/batch | server CPU (cores) | other CPU (cores) | codes |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    jq -r '"| \(.label) | `\(.settings)` | \(.clients) | \(.requests) | \(.images_per_s * 10 | round / 10) | \(.latency_ms.p50 | round) | \(.latency_ms.p95 | round) | \(.latency_ms.p99 | round) | \(.queue_ms.p50 | round) | \(.queue_ms.p95 | round) | \(.queue_ms.p99 | round) | \(.mean_batch_rows) | \(.server_cpu_cores) | \(.other_cpu_cores) | \(.codes | to_entries | map("\(.key) \(.value)") | join(", ")) |"' "${CASES[@]}"
    echo
    jq -r '"soak: \(.soak.duration_s) s, " + (.runs[0] | "\(.clients) clients, \(.requests) requests, \(.images_per_s) images/s, p50 \(.latency_ms.p50) ms, p99 \(.latency_ms.p99) ms, codes \(.codes | tostring)")' "$OUT/soak.json"
    jq -r '.soak.rss[] | "RSS (\(.source)): start \(.start_bytes / 1048576 * 10 | round / 10) MB, end \(.end_bytes / 1048576 * 10 | round / 10) MB, max \(.max_bytes / 1048576 * 10 | round / 10) MB, \(.samples | length) samples: \(.samples | map(.[1] / 1048576 * 10 | round / 10) | map(tostring) | join(" "))"' "$OUT/soak.json"
} | tee "$OUT/summary.md"
echo "reports: $OUT" >&2
