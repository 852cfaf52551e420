#!/usr/bin/env bash
# Runs the curl examples of docs/api.md (section HTTP/JSON: each ```sh block that follows a
# `<!-- curl-example: NAME -->` line), literally and in order in one shell, against
# `target/release/stylealign serve --model tiny`, and checks what each one printed or wrote.
# The images from the HTTP Generate must equal (bytes) those of `stylealign generate` (gRPC).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export CARGO_TERM_COLOR=never

fail() { echo "curl_examples: FAIL: $*" >&2; exit 1; }

if ! command -v jq >/dev/null; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -q jq >/dev/null; else sudo apt-get install -y -q jq >/dev/null; fi
fi
command -v curl >/dev/null || fail "curl is required"

cargo build --release --locked --bin stylealign
bin=$repo/target/release/stylealign

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# The examples, one file per name, in document order.
python3 - "$repo/docs/api.md" "$work" <<'EOF'
import re, sys
doc, out = sys.argv[1], sys.argv[2]
text = open(doc, encoding="utf-8").read()
blocks = re.findall(r"^<!-- curl-example: (\S+) -->\n```sh\n(.*?)^```$", text, re.S | re.M)
want = ["list-models", "patch-model", "get-session", "generate", "release-session"]
names = [n for n, _ in blocks]
if names != want:
    sys.exit(f"docs/api.md: curl examples {names}, expected {want}")
for i, (name, body) in enumerate(blocks):
    open(f"{out}/{i}-{name}.sh", "w").write(body)
EOF

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api_port=$(port)
admin_port=$(port)
"$bin" serve --model tiny --listen "127.0.0.1:$api_port" --admin-listen "127.0.0.1:$admin_port" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/healthz")" = 200 ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the server exited"; }
    sleep 0.2
done
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin_port/healthz")" = 200 ] || fail "the server is not SERVING"

API=http://127.0.0.1:$api_port
cd "$work"
example() { # run the example NAME in this shell, its stdout into NAME.out
    local file
    file=$(ls "$work"/*-"$1".sh)
    echo "== $1"
    cat "$file"
    # shellcheck disable=SC1090
    source "$file" >"$work/$1.out"
    cat "$work/$1.out"
    [ -z "$(tail -c 1 "$work/$1.out")" ] || echo
}

example list-models
jq -e '.models[0].name == "tiny" and .models[0].family == "FAMILY_SD1" and .models[0].nativeWidth == 64 and (.samplers | index("ddim"))' list-models.out >/dev/null \
    || fail "ListModels: $(cat list-models.out)"

example patch-model
[[ ${SESSION:-} == sa1.* ]] || fail "PatchModel: SESSION=${SESSION:-}"

example get-session
jq -e --arg s "$SESSION" '.sessionId == $s and .model == "tiny" and .options.node.shareNorm == "SHARE_NORM_GROUP" and .options.node.scale == 0.8 and (.createdAt | type) == "string"' get-session.out >/dev/null \
    || fail "GetSession: $(cat get-session.out)"

example generate
python3 - events.txt <<'EOF' || fail "Generate: unexpected events"
import json, sys
events, name = [], None
for line in open(sys.argv[1], encoding="utf-8").read().splitlines():
    if line.startswith("event: "):
        name = line[7:]
    elif line.startswith("data: "):
        events.append((name, json.loads(line[6:])))
names = [n for n, _ in events]
q = names.index("started")
assert q >= 1 and set(names[:q]) == {"queued"}, names
assert names[q:] == ["started"] + ["progress"] * 20 + ["image", "image", "done"], names
assert [d["progress"]["step"] for n, d in events if n == "progress"] == list(range(1, 21))
imgs = [d["image"] for n, d in events if n == "image"]
assert [i.get("index", 0) for i in imgs] == [0, 1] and imgs[0]["seed"] == "42", imgs
assert events[-1][1] == {"status": "OK", "images": 2}, events[-1]
EOF
grep -q 'event: progress' generate.out || fail "Generate: the example printed $(cat generate.out)"
for f in reference.png fox.png; do
    [ "$(head -c 8 "$f" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] || fail "$f is not a PNG"
done
# The same set over gRPC: the same bytes (`generate` names its files NNNNN-<seed>-<index>.png).
"$bin" generate --server "127.0.0.1:$api_port" --client-id me --out grpc --share-norm group --scale 0.8 --seed 42 --steps 20 \
    --prompt "a lighthouse, linocut print" --prompt "a fox, linocut print" >grpc.log 2>&1 || { cat grpc.log >&2; fail "stylealign generate (gRPC) failed"; }
cmp reference.png grpc/00000-42-0.png || fail "reference.png differs from the gRPC image"
cmp fox.png grpc/00000-42-1.png || fail "fox.png differs from the gRPC image"

example release-session
[ "$(cat release-session.out)" = "{}" ] || fail "ReleaseSession: $(cat release-session.out)"
code=$(curl -s -o gone.json -w '%{http_code}' -H 'x-client-id: me' "$API/v1/sessions/$SESSION")
[ "$code" = 404 ] && jq -e '.status == "NOT_FOUND"' gone.json >/dev/null || fail "released session: HTTP $code $(cat gone.json)"

echo "curl_examples: every example of docs/api.md ran and checked out"
