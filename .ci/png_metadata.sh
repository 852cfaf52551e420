#!/usr/bin/env bash
# The demo at its default settings, and its PNGs read the way AUTOMATIC1111 reads them: Pillow's
# `Image.info["parameters"]` parsed with A1111's `parse_generation_parameters` algorithm
# (.ci/a1111_infotext.py) agrees with the `stylealign` JSON chunk of every image.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check pillow
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
target/release/stylealign demo --out "$out" | tee "$out/demo.txt"
test -s "$out/contact_sheet.png"
python3 .ci/a1111_infotext.py --demo-output "$out/demo.txt" "$out"/aligned_*.png "$out"/unaligned_*.png
