#!/usr/bin/env bash
# Fails when the committed generated code (web/src/gen/) or bundle (assets/playground/) differs
# from a fresh `web/build.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash web/build.sh
if ! git diff --exit-code --stat -- web/src/gen assets/playground || [ -n "$(git status --porcelain -- web/src/gen assets/playground)" ]; then
  git status --short -- web/src/gen assets/playground
  echo "the committed playground is stale: run web/build.sh and commit web/src/gen and assets/playground" >&2
  exit 1
fi
echo "playground bundle: up to date"
