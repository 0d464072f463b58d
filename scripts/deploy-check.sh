#!/usr/bin/env bash
# Offline checks of the deployment artefacts (helm/rsllm, docker/Dockerfile). No cluster and no
# Docker engine are needed or used; what that leaves unchecked: docs/deployment.md.
#
#   1. helm lint --strict (scripts/helmshim.py on helm-python-sdk), default, GPU and all-on values
#   2. helm template for four profiles: default, GPU (values-gpu.yaml), all-on (GPU + every
#      optional resource: bundled Redis, PVCs, HPAs, ServiceMonitors, training Job + CronJob,
#      OTel, ...), and Redis URL from a Secret
#   3. every rendered object validated with kubernetes-validate --strict -k $K8S_VERSION; a
#      "Couldn't find schema" is a failure. ServiceMonitor (a CRD, for which kubernetes-validate
#      has no schema) is filtered out explicitly and checked structurally instead.
#   4. render assertions: the services' runtime contract (env names, ports, probes on the gRPC
#      port, drain < grace, non-root + read-only root, volumes, endpoints resolving to Services,
#      GPU only where asked, checksum/config rolling only the changed service, ...)
#   5. hadolint on every docker/Dockerfile*, plus Dockerfile <-> chart consistency
#   6. negative cases that must fail: schema-rejected values (wrong type, bad enum, typo'd key),
#      template guards (grace <= drain, two Redis sources), a manifest with a misspelled field
#      and one with a wrong type, an unknown kind, a bad Dockerfile
#
# Exit status 0 only when every check passes. The last line is the summary:
#   deploy-check: N passed, M failed
# DEPLOY_CHECK_VERBOSE=1 also prints each passing check. Tools: scripts/ci-tools.sh (a pinned
# venv under $RSLLM_CACHE_DIR, created on first use). Runs in a few seconds once that exists.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
started=$(date +%s%N)
K8S_VERSION=${K8S_VERSION:-1.32.0}
verbose=${DEPLOY_CHECK_VERBOSE:-0}
chart=helm/rsllm
ns=rsllm-ci
release=rsllm

venv=$(bash scripts/ci-tools.sh)
py=$venv/bin/python
kv=$venv/bin/kubernetes-validate
hadolint=$venv/bin/hadolint

work=$(mktemp -d "${TMPDIR:-/tmp}/deploy-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
ok() {
    passed=$((passed + 1))
    if [ "$verbose" = 1 ]; then printf 'ok   %s\n' "$1"; fi
}
bad() {
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then sed -n '1,40s/^/     /p' "$2"; fi
}
# check DESCRIPTION CMD...: CMD must succeed.
check() {
    local desc=$1
    shift
    if "$@" >"$work/out" 2>&1; then ok "$desc"; else bad "$desc" "$work/out"; fi
}
# must_fail DESCRIPTION PATTERN CMD...: CMD must fail, and say PATTERN (extended regex) while
# doing so, so that a check failing for an unrelated reason does not count as a pass.
must_fail() {
    local desc=$1 pattern=$2
    shift 2
    if "$@" >"$work/out" 2>&1; then
        bad "$desc: expected a failure, but it passed" "$work/out"
    elif grep -Eq -- "$pattern" "$work/out"; then
        ok "$desc"
    else
        bad "$desc: failed, but without /$pattern/" "$work/out"
    fi
}
helmshim() { "$py" scripts/helmshim.py "$@"; }
render() { # render NAME ARGS...: helm template into $work/NAME.yaml
    local name=$1
    shift
    if helmshim template "$release" "$chart" -n "$ns" "$@" >"$work/$name.yaml" 2>"$work/out"; then
        ok "helm template ($name)"
    else
        bad "helm template ($name)" "$work/out"
    fi
}

# 1. lint ------------------------------------------------------------------------------------
check "helm lint --strict (default values)" helmshim lint "$chart" --strict --kube-version "$K8S_VERSION"
check "helm lint --strict (values-gpu.yaml)" helmshim lint "$chart" --strict --kube-version "$K8S_VERSION" \
    -f "$chart/values-gpu.yaml"
check "helm lint --strict (all-on)" helmshim lint "$chart" --strict --kube-version "$K8S_VERSION" \
    -f "$chart/values-gpu.yaml" -f "$chart/ci/all-features-values.yaml"

# 2. render ----------------------------------------------------------------------------------
render default
render gpu -f "$chart/values-gpu.yaml"
render all -f "$chart/values-gpu.yaml" -f "$chart/ci/all-features-values.yaml"
render secret --set redis.existingSecret.name=rsllm-redis-url
render variant --set embedding.device=auto
profiles=(default gpu all secret)

# 3 + 4. split off ServiceMonitors, assert on the rendered objects ------------------------------
# (Written to a file first so that a failing assert is reported with its source line.)
cat >"$work/assert.py" <<'PY'
import os, re, sys, traceback
import yaml

work, ns, profiles = sys.argv[1], sys.argv[2], sys.argv[3:]
SVC = {  # component -> (binary, env infix, grpc port, metrics port, contract env names)
    "embedding": ("embedding-service", "EMBEDDING", 50051, 9101,
                  ["RSLLM_EMBEDDING_MODELS_DIR", "RSLLM_EMBEDDING_DEVICE"]),
    "prompt": ("prompt-service", "PROMPT", 50052, 9102,
               ["RSLLM_DATA_DIR", "RSLLM_CACHE_DIR", "RSLLM_PROMPT_TOKENIZER",
                "RSLLM_PROMPT_EMBEDDING_ENDPOINT", "RSLLM_PROMPT_DOMAINS"]),
    "llm": ("llm-service", "LLM", 50053, 9103,
            ["RSLLM_LLM_MODEL", "RSLLM_LLM_DEVICE", "RSLLM_LLM_DTYPE", "RSLLM_LLM_PROMPT_ENDPOINT",
             "RSLLM_LLM_EMBEDDING_ENDPOINT", "RSLLM_LLM_MAX_BATCH", "RSLLM_LLM_MAX_WAIT_MS",
             "RSLLM_LLM_QUEUE_CAPACITY", "RSLLM_LLM_JOBS_DIR", "RSLLM_DATA_DIR", "RSLLM_CACHE_DIR"]),
}
MOUNTS = {"embedding": {"models"}, "prompt": {"models", "data"}, "llm": {"models", "data", "jobs"}}


def report(ok, desc, detail=""):
    print(("ok   " if ok else "FAIL ") + desc + ("" if ok else f": {detail}"))


def load(name):
    with open(os.path.join(work, f"{name}.yaml")) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs, kind, name):
    found = find(docs, kind, name)
    if len(found) != 1:
        raise AssertionError(f"{len(found)} {kind}/{name}")
    return found[0]


def checks(profile, docs):
    """Yield (description, callable raising AssertionError)."""
    cms = {d["metadata"]["name"]: d.get("data", {}) for d in find(docs, "ConfigMap")}
    services = {d["metadata"]["name"]: d for d in find(docs, "Service")}

    def resolves(url):  # http://name.ns.svc:port -> a Service with that port
        m = re.fullmatch(r"https?://([a-z0-9-]+)\.([a-z0-9-]+)\.svc:(\d+)", url)
        assert m, f"endpoint {url!r} is not http://<svc>.<ns>.svc:<port>"
        assert m.group(2) == ns, f"{url}: namespace {m.group(2)} != {ns}"
        svc = services.get(m.group(1))
        assert svc, f"{url}: no Service {m.group(1)}"
        ports = [p["port"] for p in svc["spec"]["ports"]]
        assert int(m.group(3)) in ports, f"{url}: Service ports {ports}"

    for comp, (binary, infix, grpc, metrics, extra_env) in SVC.items():
        name = f"rsllm-{comp}"

        def deployment_contract(comp=comp, binary=binary, infix=infix, grpc=grpc, metrics=metrics,
                                extra_env=extra_env, name=name):
            dep = one(docs, "Deployment", name)
            env = cms[name]
            need = [f"RSLLM_{infix}_{k}" for k in
                    ("LISTEN", "METRICS_LISTEN", "JSON_LOGS", "DRAIN_TIMEOUT_SECS")] + extra_env
            if profile != "secret":
                need.append(f"RSLLM_{infix}_REDIS_URL")
            missing = [k for k in need if k not in env]
            assert not missing, f"ConfigMap {name} lacks {missing}"
            assert env[f"RSLLM_{infix}_LISTEN"].endswith(f":{grpc}"), env[f"RSLLM_{infix}_LISTEN"]
            assert env[f"RSLLM_{infix}_METRICS_LISTEN"].endswith(f":{metrics}")
            pod = dep["spec"]["template"]
            spec = pod["spec"]
            (c,) = spec["containers"]
            assert c["name"] == binary
            assert c["image"].split("/")[-1].split(":")[0] == binary, c["image"]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"grpc": grpc, "metrics": metrics}, ports
            assert c["envFrom"][0]["configMapRef"]["name"] == name
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c[probe]["grpc"]["port"] == grpc, f"{probe} not a grpc probe on {grpc}"
            psc, csc = spec["securityContext"], c["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001
            assert psc["seccompProfile"]["type"] == "RuntimeDefault"
            assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"]["drop"] == ["ALL"] and csc["runAsNonRoot"] is True
            pre = c["lifecycle"]["preStop"]
            sleep = pre["sleep"]["seconds"] if "sleep" in pre else int(pre["exec"]["command"][-1])
            drain = int(env[f"RSLLM_{infix}_DRAIN_TIMEOUT_SECS"])
            grace = spec["terminationGracePeriodSeconds"]
            assert grace > sleep + drain, f"grace {grace} <= preStop {sleep} + drain {drain}"
            assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/config"])
            vols = {v["name"]: v for v in spec["volumes"]}
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert set(mounts) == MOUNTS[comp] | {"cache", "tmp"}, sorted(mounts)
            assert set(vols) == set(mounts), f"volumes {sorted(vols)} vs mounts {sorted(mounts)}"
            for v in ("models", "data"):
                if v in mounts:
                    assert mounts[v].get("readOnly") is True, f"{v} not read-only"
            if "jobs" in mounts:
                assert not mounts["jobs"].get("readOnly"), "jobs must be writable"
            for path_var in ("RSLLM_CACHE_DIR", "HOME"):
                writable = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
                if path_var in env:
                    assert env[path_var] in writable, f"{path_var}={env[path_var]} not writable"
            for k, v in env.items():
                if k.endswith("_ENDPOINT"):
                    resolves(v)
            svc = services[name]
            sel = svc["spec"]["selector"]
            labels = pod["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in sel.items()), "Service selector misses pods"
            assert dep["spec"]["selector"]["matchLabels"] == sel
            assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == ports
        yield f"[{profile}] {binary}: contract, probes, security, drain, volumes", deployment_contract

        def test_pod(comp=comp, grpc=grpc, name=name):
            pod = one(docs, "Pod", f"{name}-test-health")
            assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
            addr = [a for a in pod["spec"]["containers"][0]["args"] if a.startswith("-addr=")]
            assert addr == [f"-addr={name}.{ns}.svc:{grpc}"], addr
            assert name in services
        yield f"[{profile}] {binary}: helm test pod probes grpc.health.v1 at its Service", test_pod

    def pdbs():
        for d in find(docs, "PodDisruptionBudget"):
            dep = one(docs, "Deployment", d["metadata"]["name"])
            assert d["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        assert len(find(docs, "PodDisruptionBudget")) == 3
    yield f"[{profile}] PodDisruptionBudgets select their Deployments", pdbs

    def gpu():
        for dep in find(docs, "Deployment"):
            for c in dep["spec"]["template"]["spec"]["containers"]:
                limits = (c.get("resources") or {}).get("limits") or {}
                want = 1 if (profile in ("gpu", "all") and c["name"] == "llm-service") else None
                assert limits.get("nvidia.com/gpu") == want, f"{c['name']}: gpu {limits.get('nvidia.com/gpu')}"
        if profile in ("gpu", "all"):
            env = cms["rsllm-llm"]
            assert env["RSLLM_LLM_DEVICE"] == "cuda" and env["RSLLM_LLM_DTYPE"] == "bf16"
            spec = one(docs, "Deployment", "rsllm-llm")["spec"]["template"]["spec"]
            assert spec.get("nodeSelector") and spec.get("tolerations")
    yield f"[{profile}] nvidia.com/gpu only on llm-service, only with GPU values", gpu

    if profile == "secret":
        def secret():
            for comp, (_, infix, *_rest) in SVC.items():
                assert f"RSLLM_{infix}_REDIS_URL" not in cms[f"rsllm-{comp}"]
                c = one(docs, "Deployment", f"rsllm-{comp}")["spec"]["template"]["spec"]["containers"][0]
                ref = {e["name"]: e for e in c["env"]}[f"RSLLM_{infix}_REDIS_URL"]
                assert ref["valueFrom"]["secretKeyRef"] == {"name": "rsllm-redis-url", "key": "url"}
        yield "[secret] Redis URL comes from the Secret, not the ConfigMaps", secret

    if profile == "all":
        def servicemonitors():
            sms = find(docs, "ServiceMonitor")
            assert len(sms) == 3, f"{len(sms)} ServiceMonitors"
            for sm in sms:
                assert sm["apiVersion"] == "monitoring.coreos.com/v1"
                svc = services[sm["metadata"]["name"]]
                sel = sm["spec"]["selector"]["matchLabels"]
                assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items())
                matched = [s for s in services.values()
                           if all(s["metadata"]["labels"].get(k) == v for k, v in sel.items())]
                assert len(matched) == 1, f"selector matches {len(matched)} Services"
                (ep,) = sm["spec"]["endpoints"]
                assert ep["port"] == "metrics" and ep["path"] == "/metrics"
                assert "metrics" in [p["name"] for p in svc["spec"]["ports"]]
                assert sm["metadata"]["labels"].get("release") == "prometheus"
        yield "[all] ServiceMonitor (CRD, no schema): 3, each scraping one Service's metrics port", servicemonitors

        def redis():
            svc = services["rsllm-redis"]
            dep = one(docs, "Deployment", "rsllm-redis")
            url = f"redis://rsllm-redis.{ns}.svc:{svc['spec']['ports'][0]['port']}"
            for comp, (_, infix, *_rest) in SVC.items():
                assert cms[f"rsllm-{comp}"][f"RSLLM_{infix}_REDIS_URL"] == url
            spec = dep["spec"]["template"]["spec"]
            c = spec["containers"][0]
            assert c["image"].startswith("redis:7")
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        yield "[all] bundled Redis: non-root redis:7, every service points at it", redis

        def hpas():
            hs = find(docs, "HorizontalPodAutoscaler")
            assert len(hs) == 3
            for h in hs:
                dep = one(docs, "Deployment", h["spec"]["scaleTargetRef"]["name"])
                assert "replicas" not in dep["spec"], "HPA-managed Deployment sets replicas"
        yield "[all] HPAs target Deployments that leave replicas to them", hpas

        def training():
            (job,) = find(docs, "Job")
            (cron,) = find(docs, "CronJob")
            assert cron["spec"]["concurrencyPolicy"] == "Forbid"
            for spec in (job["spec"]["template"]["spec"],
                         cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]):
                (c,) = spec["containers"]
                assert c["image"].endswith("/rsllm/rsllm:0.1.0"), c["image"]
                assert spec["restartPolicy"] == "Never"
                mounts = {m["name"]: m for m in c["volumeMounts"]}
                assert not mounts["jobs"].get("readOnly") and mounts["models"]["readOnly"]
                env = {e["name"]: e.get("value") for e in c["env"]}
                assert env["RSLLM_CACHE_DIR"].startswith(mounts["jobs"]["mountPath"])
                assert c["workingDir"] == mounts["jobs"]["mountPath"]
                assert (c["resources"]["limits"] or {}).get("nvidia.com/gpu") == 1
            assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "pipeline"
            assert cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][:3] == ["train", "--stage", "2"]
        yield "[all] training Job + CronJob: CLI image, jobs volume writable, GPU", training

        def pvcs():
            names = {d["metadata"]["name"] for d in find(docs, "PersistentVolumeClaim")}
            assert names == {"rsllm-models", "rsllm-jobs"}, names
            for d in find(docs, "PersistentVolumeClaim"):
                assert d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        yield "[all] created PVCs are kept on uninstall", pvcs


failures = 0
for profile in profiles:
    try:
        docs = load(profile)
    except Exception as err:  # noqa: BLE001 - reported as a check failure
        report(False, f"[{profile}] rendered YAML parses", err)
        failures += 1
        continue
    # kubernetes-validate has no CRD schemas: ServiceMonitors are checked above instead.
    with open(os.path.join(work, f"{profile}.k8s.yaml"), "w") as fh:
        yaml.safe_dump_all([d for d in docs if d["kind"] != "ServiceMonitor"], fh)
    for desc, fn in checks(profile, docs):
        try:
            fn()
            report(True, desc)
        except Exception as err:  # noqa: BLE001
            where = traceback.extract_tb(err.__traceback__)[-1]
            report(False, desc, f"{type(err).__name__}: {str(err) or where.line} (line {where.lineno})")
            failures += 1

# checksum/config: a change to embedding's config rolls embedding only.
try:
    def sums(name):
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in find(load(name), "Deployment")}
    a, b = sums("default"), sums("variant")
    changed = sorted(k for k in a if a[k] != b[k])
    report(changed == ["rsllm-embedding"], "checksum/config changes with the config, per service",
           f"changed: {changed}")
except Exception as err:  # noqa: BLE001
    report(False, "checksum/config changes with the config, per service", err)
PY
"$py" "$work/assert.py" "$work" "$ns" "${profiles[@]}" >"$work/assert.out" 2>&1 || true
while IFS= read -r line; do
    case $line in
        "ok   "*) ok "${line#ok   }" ;;
        "FAIL "*) bad "${line#FAIL }" ;;
        *) bad "render assertions: $line" ;;
    esac
done <"$work/assert.out"

# 3. kubernetes-validate (one run over all profiles; its exit status covers them all) ----------
kv_files=()
for p in "${profiles[@]}"; do kv_files+=("$work/$p.k8s.yaml"); done
kv_rc=0
"$kv" --strict -k "$K8S_VERSION" "${kv_files[@]}" >"$work/kv.out" 2>&1 || kv_rc=$?
for p in "${profiles[@]}"; do
    f=$work/$p.k8s.yaml
    grep -F "$f " "$work/kv.out" | grep -v ' passed ' >"$work/kv.err" || true
    n=$(grep -cF "$f passed " "$work/kv.out" || true)
    if [ ! -s "$f" ]; then
        bad "kubernetes-validate ($p): nothing to validate"
    elif [ -s "$work/kv.err" ] || [ "$n" = 0 ]; then
        bad "kubernetes-validate --strict -k $K8S_VERSION ($p)" "$work/kv.err"
    else
        ok "kubernetes-validate --strict -k $K8S_VERSION ($p: $n objects)"
    fi
done
if [ "$kv_rc" != 0 ] && [ "$failed" = 0 ]; then bad "kubernetes-validate exited $kv_rc" "$work/kv.out"; fi
sm_count=$(grep -c '^kind: ServiceMonitor$' "$work/all.yaml" || true)
if [ "$sm_count" = 3 ]; then ok "ServiceMonitors rendered (3) and filtered from schema validation"; else
    bad "expected 3 ServiceMonitors in the all-on render, found $sm_count"; fi

# 5. Dockerfiles -----------------------------------------------------------------------------
shopt -s nullglob
dockerfiles=(docker/Dockerfile*)
if [ ${#dockerfiles[@]} = 0 ]; then bad "no docker/Dockerfile* found"; fi
for f in "${dockerfiles[@]}"; do
    check "hadolint $f" "$hadolint" --no-color "$f"
done
dockerfile_contract() {
    local f=docker/Dockerfile t
    for t in embedding-service prompt-service llm-service rsllm; do
        grep -Eq "^FROM .* AS $t\$" "$f" || { echo "no target $t in $f"; return 1; }
        grep -q "repository: rsllm/$t\$" "$chart/values.yaml" || { echo "chart does not use image rsllm/$t"; return 1; }
    done
    for p in 50051 50052 50053 9101 9102 9103; do
        grep -Eq "^EXPOSE .*\b$p\b" "$f" || { echo "$f does not EXPOSE $p"; return 1; }
    done
    [ "$(grep -c '^USER 10001:10001$' "$f")" = 4 ] || { echo "not every target runs as USER 10001:10001"; return 1; }
    grep -q 'runAsUser: 10001' "$chart/values.yaml" || { echo "chart runAsUser is not 10001"; return 1; }
    # shellcheck disable=SC2016 # the literal text of the Dockerfile's pip line
    grep -qF '"torch==${TORCH_VERSION}"' "$f" || { echo "$f does not install torch==\${TORCH_VERSION}"; return 1; }
    grep -qx 'ARG TORCH_VERSION=2.11.0' "$f" || { echo "$f does not pin TORCH_VERSION=2.11.0"; return 1; }
    if grep -En '^(COPY|ADD) .*\bdata\b' "$f"; then echo "a Dockerfile copies data: datasets are mounted, never shipped"; return 1; fi
    for e in .git target/ runs/ data/ .cargo/config.toml; do
        grep -qxF -- "$e" .dockerignore || { echo ".dockerignore lacks $e"; return 1; }
    done
}
check "Dockerfile targets, ports, uid and torch pin match the chart; .dockerignore" dockerfile_contract

# 6. negative cases --------------------------------------------------------------------------
must_fail "schema rejects a string replicaCount" "replicaCount.*(want integer|integer)" \
    helmshim template "$release" "$chart" --set embedding.replicaCount=three
must_fail "schema rejects llm.device=gpu" "llm/device|device.*(one of|enum)" \
    helmshim template "$release" "$chart" --set llm.device=gpu
must_fail "schema rejects a misspelled values key (llm.devise)" "devise" \
    helmshim template "$release" "$chart" --set llm.devise=cuda
must_fail "helm lint fails on a schema violation" "dtype" \
    helmshim lint "$chart" --strict --set llm.dtype=fp16
must_fail "template refuses terminationGracePeriodSeconds <= preStop + drain" "must exceed" \
    helmshim template "$release" "$chart" --set llm.terminationGracePeriodSeconds=60
must_fail "template refuses two Redis sources" "only one of" \
    helmshim template "$release" "$chart" --set redis.url=redis://x:6379 --set redis.bundled.enabled=true
must_fail "template refuses a disabled service without externalEndpoint" "externalEndpoint" \
    helmshim template "$release" "$chart" --set embedding.enabled=false

# Hand-made manifests derived from the real render: a misspelled field, a wrong type.
sed '0,/imagePullPolicy:/s//imagePulPolicy:/' "$work/default.k8s.yaml" >"$work/typo.yaml"
must_fail "kubernetes-validate --strict rejects a misspelled field (imagePulPolicy)" \
    "imagePulPolicy' was unexpected" "$kv" --strict --quiet -k "$K8S_VERSION" "$work/typo.yaml"
sed '0,/replicas: 1/s//replicas: "three"/' "$work/default.k8s.yaml" >"$work/type.yaml"
must_fail "kubernetes-validate --strict rejects replicas: \"three\"" "three" \
    "$kv" --strict --quiet -k "$K8S_VERSION" "$work/type.yaml"
cat >"$work/unknown.yaml" <<'EOF'
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w
EOF
# kubernetes-validate itself exits 0 here (a WARN): the grep guard above is what catches it.
unknown_kind_caught() {
    "$kv" --strict -k "$K8S_VERSION" "$work/unknown.yaml" 2>&1 | grep -q "Couldn't find schema" \
        && { echo "caught: Couldn't find schema"; return 1; }
    return 0
}
must_fail "an object without a schema (unknown CRD) is reported" "Couldn't find schema" unknown_kind_caught
printf 'FROM debian\nRUN apt-get update && apt-get install curl\n' >"$work/Dockerfile.bad"
must_fail "hadolint rejects a bad Dockerfile" "DL3006|DL3008|DL3015" "$hadolint" --no-color "$work/Dockerfile.bad"

elapsed=$((($(date +%s%N) - started) / 1000000))
printf '[deploy-check] %d.%01d s; chart %s, Kubernetes schemas %s\n' $((elapsed / 1000)) $((elapsed % 1000 / 100)) \
    "$chart" "$K8S_VERSION"
printf 'deploy-check: %d passed, %d failed\n' "$passed" "$failed"
[ "$failed" = 0 ]
