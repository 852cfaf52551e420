#!/usr/bin/env bash
# The command line from a shell: output into a pipe that its reader closes early
# (`stylealign loadtest --json | head -1`) ends quietly, without a panic, and `generate --help`
# names the samplers as the API does.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/stylealign
err=$(mktemp)
trap 'rm -f "$err"' EXIT
status=0
first=$("$bin" loadtest --json --clients 1 --requests 1 --batching on --images 1 --steps 1 --size 16 2> "$err" | head -1) || status=$?
if [ "$status" -ne 0 ] || grep -q "panicked" "$err" || [ "$first" != "{" ]; then
  cat "$err"
  echo "loadtest --json | head -1: exit status $status, first line ${first@Q}"
  exit 1
fi
help=$("$bin" generate --help)
for s in ddim euler euler_a dpmpp_2m dpmpp_2m_karras; do
  grep -q -- "$s" <<< "$help" || { echo "generate --help does not name the sampler $s"; exit 1; }
done
echo "cli: ok (no panic on a closed pipe)"
