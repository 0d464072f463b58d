#!/usr/bin/env bash
# The LLM engine's GPU checks, as one short script for the lent GPU machine (see
# ../shared/docs/GPU.md and docs/results.md). Two halves:
#
#   bash scripts/gpu-check.sh prepare    # here, on the CPU machine: build, stage under .device/
#   bash scripts/gpu-check.sh run        # there, in the device call (carry: [".device"])
#
# `run` uses the device image's own PyTorch 2.11.0 as libtorch (LD_LIBRARY_PATH), runs our
# llm_bench on CUDA (random-init SmolLM2-135M shape: forward 64 x 384, training step 16 x 384,
# prefill, decode, 20-candidate scoring) and then ../shared/bench/hf_anchor.py in the same call,
# so the two are compared on the same card. Logs land in $OUT (or .device/out).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    cargo bench -p rsllm-llm --bench llm_bench --no-run
    bench=$(ls -t target/release/deps/llm_bench-* | grep -v '\.d$' | head -n1)
    mkdir -p .device/bin
    # Stripped: a device call carries at most 64 MiB, and the line tables alone exceed it.
    strip -o .device/bin/llm_bench "$bench"
    install -m 644 ../shared/bench/hf_anchor.py .device/hf_anchor.py
    du -sh .device
    size=$(du -sm .device | cut -f1)
    [ "$size" -lt 64 ] || { echo ".device holds ${size} MiB; a device call carries at most 64" >&2; exit 1; }
    echo "staged: .device/bin/llm_bench and .device/hf_anchor.py; now run it there with carry [\".device\"]"
    ;;
run)
    out=${OUT:-.device/out}
    mkdir -p "$out"
    torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
    .device/bin/llm_bench --device cuda --random-init --iters 10 --dtypes f32,bf16 \
        --json-out "$out/rsllm.json" 2>&1 | tee "$out/rsllm.log"
    BUDGET_S=${HF_BUDGET_S:-240} python3 .device/hf_anchor.py 2>&1 | tee "$out/hf.log"
    ;;
*)
    echo "usage: bash scripts/gpu-check.sh prepare|run" >&2
    exit 2
    ;;
esac
