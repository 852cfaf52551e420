#!/usr/bin/env bash
# The GPU benchmark script's dry run (tools/gpu_bench.sh --dry-run: the CPU, tiny configs), so that
# the script, the PyTorch side and the table keep working between runs on a GPU machine. Installs
# torch and diffusers (the versions of tools/requirements.txt) into a fresh venv: PyPI's torch is
# the CUDA build, about 5.5 GB installed. Needs target/release/stylealign (or $STYLEALIGN_BIN).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export STYLEALIGN_BIN="${STYLEALIGN_BIN:-$root/target/release/stylealign}"
[ -x "$STYLEALIGN_BIN" ] || { echo "gpu bench dry run: no binary at $STYLEALIGN_BIN (cargo build --release --bin stylealign)"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pin() { sed -n "s/^\($1==[^ ]*\).*/\1/p" tools/requirements.txt; }
torch_pin=$(pin torch); diffusers_pin=$(pin diffusers)
[ -n "$torch_pin" ] && [ -n "$diffusers_pin" ] || { echo "gpu bench dry run: torch / diffusers pins not found in tools/requirements.txt"; exit 1; }

start=$(date +%s)
echo "-- fresh venv: pip install $torch_pin $diffusers_pin"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir "$torch_pin" "$diffusers_pin"
echo "-- installed in $(( $(date +%s) - start )) s"

echo "-- tools/gpu_bench.sh --dry-run"
t0=$(date +%s)
bash tools/gpu_bench.sh --dry-run --binary "$STYLEALIGN_BIN" --python "$work/venv/bin/python" --out-dir "$work/out"
echo "gpu bench dry run: ok ($(( $(date +%s) - t0 )) s for the dry run)"
