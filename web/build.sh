#!/usr/bin/env bash
# Rebuilds the playground from scratch: pinned tools (npm ci), TypeScript from the .proto
# (buf + protoc-gen-es → src/gen/), type check (tsc), bundle (esbuild → assets/playground/app.js).
# The server embeds that bundle and src/index.html, src/style.css as they are.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
npm run --silent generate
npm run --silent typecheck
out=../assets/playground
mkdir -p "$out"
npm run --silent bundle -- --log-level=warning
echo "playground built: $(wc -c < "$out/app.js") bytes in assets/playground/app.js"
