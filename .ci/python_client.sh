#!/usr/bin/env bash
# A non-Rust client against the real server: examples/client.py (grpcio, stubs generated from the
# .proto) talks to `stylealign serve --model tiny` on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
target/release/stylealign serve --model tiny --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 > "$out/server.out" 2> "$out/server.err" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "gRPC on" "$out/server.out" 2>/dev/null && break
  sleep 0.5
done
addr=$(sed -n 's/.*gRPC on \([0-9.:]*\),.*/\1/p' "$out/server.out" | head -1)
[ -n "$addr" ] || { cat "$out/server.err"; echo "server did not start"; exit 1; }
python3 examples/client.py --server "$addr" --out "$out/images"
kill -TERM $pid
wait $pid
echo "python client: ok (server drained and exited 0)"
