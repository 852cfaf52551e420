#!/usr/bin/env bash
# Proto hygiene: `buf lint` (rules and documented exceptions in buf.yaml) and `buf format`.
# The npm package @bufbuild/buf ships the buf binary.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
npm install --silent --no-audit --no-fund --prefix "$tools" @bufbuild/buf@1.75.0
buf="$tools/node_modules/.bin/buf"
"$buf" --version
"$buf" lint
"$buf" format --diff --exit-code
echo "buf lint and format: clean"
