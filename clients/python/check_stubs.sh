#!/usr/bin/env bash
# Fails when the committed stubs (src/stylealign_client/_pb) differ from what generate_stubs.sh
# makes from the current proto: regenerates into a temporary folder and compares.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bash "$here/generate_stubs.sh" "$tmp/_pb" > /dev/null
if ! diff -r -u --exclude=__pycache__ "$here/src/stylealign_client/_pb" "$tmp/_pb"; then
  echo "check_stubs: the committed stubs are stale; run clients/python/generate_stubs.sh and commit" >&2
  exit 1
fi
echo "check_stubs: stubs up to date"
