#!/usr/bin/env bash
# Every test of the project, from a fresh clone: setup (idempotent), formatting, lints, the
# contract and deployment checks, then the whole workspace's tests (unit tests beside the code
# and the one integration-test binary, which starts real redis-server and service processes on
# loopback, and the Python client generated from the protos).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
venv=$(bash scripts/ci-tools.sh)
cargo fmt --all --check
(cd proto && "$venv/bin/buf" lint)
bash scripts/deploy-check.sh
# --release everywhere: torch-sys compiles libtorch's C++ bindings once per profile (minutes on
# 2 cores), and scripts/run.sh builds release anyway.
cargo clippy --workspace --all-targets --release --locked -- -D warnings
RSLLM_CI_PYTHON="$venv/bin/python" cargo test --workspace --release --locked
