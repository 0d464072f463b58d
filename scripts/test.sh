#!/usr/bin/env bash
# Every test of the project, from a fresh clone: setup (idempotent), formatting, lints, then
# the whole workspace's tests (unit tests beside the code and the one integration-test binary,
# which starts real redis-server and service processes on loopback).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
cargo fmt --all --check
# --release everywhere: torch-sys compiles libtorch's C++ bindings once per profile (minutes on
# 2 cores), and scripts/run.sh builds release anyway.
cargo clippy --workspace --all-targets --release --locked -- -D warnings
cargo test --workspace --release --locked
