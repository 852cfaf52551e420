#!/usr/bin/env bash
# Measures stylealign against PyTorch in one call on a GPU machine (no download, nothing compiled
# there) and prints ONE table (markdown; also written to OUT_DIR/gpu-bench.md):
#
#   1. PyTorch (tools/gpu_bench_torch.py): diffusers' UNet with random weights, fp16, SDPA, eager
#      and torch.compile, plain and StyleAligned (google's defaults, the ComfyUI node's), SD1.5
#      512² and SDXL 1024², batch 8 (4 images × CFG), plus the per-op breakdown;
#   2. ours (`stylealign bench`, the prebuilt binary): the same shapes, variants and timing method,
#      kernels warmed in the same process before timing, one process per model;
#   3. a full 30-step 4-image StyleAligned SD1.5 set through the server (`stylealign serve` on a
#      folder of random SD1.5 weights that the binary writes, `stylealign generate`), after an
#      untimed 2-step set of the same shape that warms the kernels.
#
# Usage: tools/gpu_bench.sh [--dry-run] [--binary PATH] [--python PY] [--out-dir DIR]
#                           [--budget SECONDS] [--dtype f16|bf16|f32]
#   --binary   the stylealign binary, or a compressed copy (.xz, .gz, .zst), unpacked to a
#              temporary folder. Default: $STYLEALIGN_BIN, else target/release/stylealign.
#   --python   Python with torch and diffusers. Default: $PYTHON, else python3.
#   --out-dir  where the JSON files, the server's log and gpu-bench.md go. Default: a new
#              temporary folder (printed).
#   --budget   seconds for the whole run (default 450); each phase gets a share and a phase
#              that runs out of time is stopped, its finished rows kept.
#   --dry-run  the CPU, the tiny test configs, 2 timed steps, a 3-step set: checks that every
#              part still runs (CI), in under 3 minutes on 2 cores. Its numbers mean nothing
#              about GPUs.
# Before measuring, the PyTorch side's StyleAligned patches are checked against the tiny goldens
# of tests/fixtures (plain, google's defaults, the node's defaults; CPU, float32, ≤ 1e-4).
# Exit status: 0 when the goldens check passed, the table holds at least one measurement of each
# side and the set through the server succeeded; 1 otherwise (the table is printed either way).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
binary=${STYLEALIGN_BIN:-$root/target/release/stylealign}
python=${PYTHON:-python3}
out_dir=
budget=450
dry=0
dtype=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --binary) binary=$2; shift ;;
    --python) python=$2; shift ;;
    --out-dir) out_dir=$2; shift ;;
    --budget) budget=$2; shift ;;
    --dtype) dtype=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$budget" in ''|*[!0-9]*) echo "gpu_bench: --budget takes whole seconds, got '$budget'" >&2; exit 2 ;; esac
[ -n "$out_dir" ] || out_dir=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench.XXXXXX")
mkdir -p "$out_dir" || exit 2
out_dir=$(cd "$out_dir" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-bench-work.XXXXXX")
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; fi
  rm -rf "$work"
}
trap cleanup EXIT
start=$(date +%s)
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
# Milliseconds since $1 (a now_ms value), as seconds with three decimals.
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%03d' $(( d / 1000 )) $(( d % 1000 )); }
say() { echo "== gpu_bench: $* ($(( $(date +%s) - start )) s)" >&2; }
# Seconds a phase may take: its share of the budget, never past the budget's end (minus a
# reserve for the table).
allow() {
  local left=$(( budget - ($(date +%s) - start) - 10 ))
  local want=$1
  [ "$left" -lt "$want" ] && want=$left
  [ "$want" -lt 5 ] && want=5
  echo "$want"
}

# The binary: unpack a compressed copy.
case "$binary" in
  *.xz) xz -dc "$binary" > "$work/stylealign" || exit 2; binary=$work/stylealign ;;
  *.gz) gzip -dc "$binary" > "$work/stylealign" || exit 2; binary=$work/stylealign ;;
  *.zst) zstd -qdc "$binary" > "$work/stylealign" || exit 2; binary=$work/stylealign ;;
esac
[ -f "$binary" ] && chmod +x "$binary" 2>/dev/null
"$binary" --version > /dev/null 2>&1 || { echo "gpu_bench: cannot run the binary $binary (build it, or pass --binary)" >&2; exit 2; }
"$python" -c "import torch, diffusers" 2>/dev/null || { echo "gpu_bench: $python cannot import torch and diffusers" >&2; exit 2; }

if [ "$dry" = 1 ]; then
  device=cpu; torch_device=cpu; dtype=${dtype:-f32}
  common=(--tiny --steps 2 --warmup 1 --op-iters 2)
  torch_extra=(--compile none --threads "$(nproc)")
  model_flags=(--tiny); set_steps=3; set_size=0
  shares=(60 30 30 60)
else
  device=cuda; torch_device=cuda; dtype=${dtype:-f16}
  common=(--steps 20 --warmup 3 --op-iters 20)
  torch_extra=(--compile sd15)
  model_flags=(); set_steps=30; set_size=512
  shares=(170 70 80 90)
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2
  # Our CUDA kernels are compiled at run time by NVRTC. Without a system copy, use the one the
  # PyTorch wheels bring (site-packages/nvidia/...).
  if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    nvrtc_dir=$("$python" -c '
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
for base in (spec.submodule_search_locations if spec else []):
    found = sorted(glob.glob(os.path.join(base, "**", "libnvrtc.so*"), recursive=True))
    if found:
        print(os.path.dirname(found[0]))
        break
')
    if [ -n "$nvrtc_dir" ]; then
      export LD_LIBRARY_PATH="$nvrtc_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      echo "gpu_bench: NVRTC from the PyTorch wheels: $nvrtc_dir" >&2
    fi
  fi
fi
say "binary $("$binary" --version), out $out_dir, budget ${budget} s, device $device, dtype $dtype"

say "0/4 the PyTorch side's StyleAligned against the tiny goldens (CPU, float32)"
timeout -k 10 "$(allow 40)" "$python" "$root/tools/gpu_bench_torch.py" --check-goldens 2> "$out_dir/check_goldens.log"
check_goldens_rc=$?
cat "$out_dir/check_goldens.log" >&2
[ "$check_goldens_rc" = 0 ] || say "the PyTorch StyleAligned patches do NOT match the goldens (status $check_goldens_rc)"

say "1/4 PyTorch"
timeout -k 10 "$(allow "${shares[0]}")" "$python" "$root/tools/gpu_bench_torch.py" --device "$torch_device" --dtype "$dtype" \
  --model sd15,sdxl "${common[@]}" "${torch_extra[@]}" --out "$out_dir/torch.json" 2> "$out_dir/torch.log"
rc=$?; [ "$rc" = 0 ] || say "PyTorch side ended with status $rc (124: out of time); see torch.log"

say "2/4 ours"
ours=()
for model in sd15 sdxl; do
  timeout -k 10 "$(allow "${shares[1]}")" "$binary" bench --device "$device" --dtype "$dtype" --model "$model" "${common[@]}" \
    --out "$out_dir/ours_$model.json" > /dev/null 2> "$out_dir/ours_$model.log"
  rc=$?; [ "$rc" = 0 ] || say "ours $model ended with status $rc (124: out of time); see ours_$model.log"
  ours+=(--ours "$out_dir/ours_$model.json")
done

say "3/4 a full set through the server"
serve_json=$out_dir/serve.json
serve_fail() { printf '{"model":"sd15","variant":"sa-node","error":"%s"}\n' "$1" > "$serve_json"; say "set through the server: $1"; }
set_start=$(date +%s)
set_left() { local l=$(( $(allow "${shares[3]}") - ($(date +%s) - set_start) )); [ "$l" -lt 5 ] && l=5; echo "$l"; }
model_dir=$work/sd15
if ! timeout -k 10 "$(set_left)" "$binary" bench "${model_flags[@]}" --write-model "$model_dir" 2> "$out_dir/write_model.log"; then
  serve_fail "writing the random SD1.5 folder failed (write_model.log)"
else
  t0=$(now_ms)
  STYLEALIGN_LOG_FORMAT=text "$binary" serve --model "$model_dir" --device "$device" --listen 127.0.0.1:0 --admin-listen off \
    > "$work/server.out" 2> "$out_dir/server.log" &
  server_pid=$!
  addr=
  deadline=$(( $(date +%s) + $(set_left) ))
  # The address comes first; requests are served once the log says SERVING (models loaded, one
  # warm-up step run).
  serving=
  while [ "$(date +%s)" -lt "$deadline" ]; do
    addr=$(sed -n 's/.*gRPC on \([0-9.:]*\).*/\1/p' "$work/server.out" | head -1)
    grep -q 'server: SERVING' "$out_dir/server.log" && serving=1
    [ -n "$addr" ] && [ -n "$serving" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ -z "$addr" ] || [ -z "$serving" ]; then
    serve_fail "the server did not reach SERVING (server.log)"
  else
    startup=$(secs_since "$t0")
    prompts=(--prompt "a lighthouse, watercolor" --prompt "a fox" --prompt "a teapot" --prompt "a bicycle")
    gen() {  # STEPS OUT-FOLDER
      timeout -k 5 "$(set_left)" "$binary" generate --server "$addr" --model sd15 "${prompts[@]}" --seed 7 --steps "$1" \
        --width "$set_size" --height "$set_size" --out "$2" > /dev/null 2>> "$out_dir/generate.log"
    }
    if ! gen 2 "$work/warm"; then
      serve_fail "the warm-up set failed (generate.log, server.log)"
    else
      t1=$(now_ms)
      if gen "$set_steps" "$work/set"; then
        secs=$(secs_since "$t1")
        images=$(find "$work/set" -name '*.png' | wc -l)
        size=$set_size; [ "$size" = 0 ] && size="native size"
        printf '{"model":"sd15","variant":"sa-node","images":%s,"steps":%s,"size":"%s","seconds":%s,"startup_seconds":%s}\n' \
          "$images" "$set_steps" "$size" "$secs" "$startup" > "$serve_json"
        [ "$images" = 4 ] || serve_fail "the set wrote $images images, not 4"
      else
        serve_fail "the ${set_steps}-step set failed or ran out of time (generate.log, server.log)"
      fi
    fi
  fi
  kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; server_pid=
fi

say "4/4 table"
title="stylealign vs PyTorch$([ "$dry" = 1 ] && echo ' — DRY RUN: CPU, tiny configs, numbers say nothing about GPUs')"
"$python" "$root/tools/gpu_bench_table.py" "${ours[@]}" --torch "$out_dir/torch.json" --serve "$serve_json" \
  --title "$title" --markdown "$out_dir/gpu-bench.md"
table_rc=$?
say "done; files in $out_dir"

# Success needs rows from both sides and the set through the server.
"$python" - "$out_dir" "$check_goldens_rc" <<'EOF'
import json, os, sys
d = sys.argv[1]
goldens_ok = sys.argv[2] == "0"
def rows(name):
    try:
        doc = json.load(open(os.path.join(d, name)))
        return len(doc.get("unet", [])) + len(doc.get("ops", []))
    except (OSError, ValueError):
        return 0
ours = rows("ours_sd15.json") + rows("ours_sdxl.json")
torch = rows("torch.json")
serve = json.load(open(os.path.join(d, "serve.json")))
problems = [p for p, bad in (("no rows of ours", ours == 0), ("no PyTorch rows", torch == 0),
                             ("the set through the server failed", "error" in serve),
                             ("the PyTorch StyleAligned patches did not match the goldens", not goldens_ok)) if bad]
for p in problems:
    print(f"gpu_bench: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
check_rc=$?
[ "$table_rc" = 0 ] && [ "$check_rc" = 0 ]
