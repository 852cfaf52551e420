#!/usr/bin/env bash
# The Python client package (clients/python) against the real server: installs it into a fresh
# venv, checks the committed gRPC stubs are not stale, runs its pytest suite (which starts
# `stylealign serve --model tiny` itself), then runs examples/client.py against a server.
# Needs target/release/stylealign (or $STYLEALIGN_BIN).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export STYLEALIGN_BIN="${STYLEALIGN_BIN:-$root/target/release/stylealign}"
[ -x "$STYLEALIGN_BIN" ] || { echo "python client: no server binary at $STYLEALIGN_BIN (cargo build --release --bin stylealign)"; exit 1; }

work=$(mktemp -d)
pid=
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "-- fresh venv, pip install ./clients/python[dev] (grpcio-tools pinned for the stub check, pytest)"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check "./clients/python[dev]" pytest

echo "-- committed stubs are up to date with proto/"
PYTHON="$py" bash clients/python/check_stubs.sh

echo "-- pytest clients/python/tests (against the installed package)"
# From a folder outside the source tree, so that `import stylealign_client` is the installed copy.
set +e
(cd "$work" && "$py" -m pytest -p no:cacheprovider -q -rs "$root/clients/python/tests")
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "python client: pytest collected no tests"; exit 1; fi
[ "$rc" -eq 0 ] || { echo "python client: pytest failed ($rc)"; exit "$rc"; }

echo "-- examples/client.py against a server"
"$STYLEALIGN_BIN" serve --model tiny --listen 127.0.0.1:0 --admin-listen off > "$work/server.out" 2> "$work/server.err" &
pid=$!
for _ in $(seq 1 240); do
  grep -q "gRPC on" "$work/server.out" 2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
addr=$(sed -n 's/.*gRPC on \([0-9.:]*\).*/\1/p' "$work/server.out" | head -1)
[ -n "$addr" ] || { cat "$work/server.err"; echo "python client: server did not start"; exit 1; }
(cd "$work" && "$py" "$root/examples/client.py" --server "$addr" --out "$work/images")
kill -TERM "$pid"
wait "$pid"
pid=
echo "python client: ok (server drained and exited 0)"
