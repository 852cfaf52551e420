#!/usr/bin/env bash
# Rebuilds the playground from scratch: pinned tools (npm ci), TypeScript from the .proto
# (buf + protoc-gen-es → src/gen/), type check (tsc), bundle (esbuild → assets/playground/app.js),
# and the page and style sheet copied next to it. The server embeds assets/playground/.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
npm run --silent generate
npm run --silent typecheck
out=../assets/playground
mkdir -p "$out"
npm run --silent bundle -- --log-level=warning
cp src/index.html src/style.css "$out/"
echo "playground built: $(cd "$out" && wc -c index.html style.css app.js | tail -1 | awk '{print $1}') bytes in assets/playground/"
