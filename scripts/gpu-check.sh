#!/usr/bin/env bash
# The GPU checks, as two short device calls for the lent GPU machine (see
# ../shared/docs/GPU.md and docs/results.md). A call carries at most 64 MiB and the default
# GGUF alone is 98 MB, so the model travels in two parts, one per call, joined on the device
# (its /tmp survives between calls while the machine is warm, 30 s):
#
#   bash scripts/gpu-check.sh prepare    # here: build, stage .device/a and .device/b
#   bash scripts/gpu-check.sh bench      # there, call 1, carry [".device/a"]: the GGUF's first
#                                        # half, our llm_bench and optim_bench on CUDA, then
#                                        # hf_anchor.py
#   bash scripts/gpu-check.sh pipeline   # there, call 2, carry [".device/b"]: the second half,
#                                        # then `rsllm pipeline` on CUDA (GPU_DATASET at prepare
#                                        # time picks the dataset, default movielens)
#
# Call 1 also fails fast: if our binary cannot use CUDA there, the machine can be given back
# before the longer call 2. Both use the device image's own PyTorch 2.11.0 as libtorch.
# Pipeline settings come from the environment (defaults below: the H100 run of docs/results.md,
# 248 s wall on MovieLens, micro-batch 64 being 2.7x faster than 16), so a rerun needs no edit:
# GPU_LIMIT (training rows per stage), GPU_EPOCHS, GPU_MICRO, GPU_ACCUM, GPU_STAGE_SECS, GPU_VARIANTS, GPU_LR,
# GPU_FULL=1 (full fine-tune, as the peer anchor's text-only baseline: try GPU_LR=1e-4), and for
# a dry run on the CPU machine GPU_DEVICE=cpu GPU_TEST_LIMIT=3 (with OUT and /tmp/rsllm-gpu here).
set -euo pipefail
cd "$(dirname "$0")/.."

stage_dir=/tmp/rsllm-gpu
model_file=SmolLM2-135M-Instruct.Q4_1.gguf

# Unpacks an .xz file with xz, or Python's lzma where the image has no xz.
unxz_to() {
    if command -v xz >/dev/null; then
        xz -dc "$1" >"$2"
    else
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
    fi
    chmod +x "$2"
}

use_device_torch() {
    # Here (a dry run) the binaries find the cache's libtorch through their rpath instead.
    python3 -c 'import torch' 2>/dev/null || return 0
    torch_lib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

case "${1:-}" in
prepare)
    cache=${RSLLM_CACHE_DIR:-$HOME/.cache/rsllm}
    data=${RSLLM_DATA_DIR:-../shared/data}
    gguf="$cache/models/llm/$model_file"
    [ -f "$gguf" ] || { echo "no $gguf: run scripts/setup.sh first" >&2; exit 1; }
    cargo build --release -p rsllm
    cargo bench -p rsllm-llm --bench llm_bench --no-run
    cargo bench -p rsllm-trainer --bench optim_bench --no-run
    bench=$(ls -t target/release/deps/llm_bench-* | grep -v '\.d$' | head -n1)
    optim_bench=$(ls -t target/release/deps/optim_bench-* | grep -v '\.d$' | head -n1)
    rm -rf .device/a .device/b
    mkdir -p .device/a .device/b/cache/models/rec .device/b/cache/prepared .device/b/data
    # Stripped and xz-packed: the line tables alone would exceed a call's 64 MiB.
    strip -o .device/a/llm_bench "$bench" && xz -T2 -f .device/a/llm_bench
    strip -o .device/a/optim_bench "$optim_bench" && xz -T2 -f .device/a/optim_bench
    strip -o .device/b/rsllm target/release/rsllm && xz -T2 -f .device/b/rsllm
    install -m 644 ../shared/bench/hf_anchor.py .device/a/hf_anchor.py
    # Call 1 carries little else, so it takes as much of the model as fits in 60 MiB; call 2
    # the rest beside the binary and the data.
    first=$((60 * 1024 * 1024 - $(du -cb .device/a | tail -n1 | cut -f1)))
    head -c "$first" "$gguf" >.device/a/model.part
    tail -c +"$((first + 1))" "$gguf" >.device/b/model.part
    sha256sum "$gguf" | cut -d' ' -f1 >.device/b/model.sha256
    # One dataset per staging (GPU_DATASET, default movielens): its raw files, and its prepared
    # split and trained SASRec when they exist here (else the pipeline makes them there).
    dataset=${GPU_DATASET:-movielens}
    case "$dataset" in
    movielens) raw=movielens-100k ;;
    lastfm) raw=lastfm-hetrec2011-2k ;;
    steam | steam-valtrain) raw=steam ;;
    *) echo "GPU_DATASET=$dataset: expected movielens, lastfm, steam or steam-valtrain" >&2; exit 2 ;;
    esac
    cp -r "$data/$raw" .device/b/data/
    for f in "prepared/$dataset-llara" "models/rec/$dataset-llara-sasrec"; do
        if [ -d "$cache/$f" ]; then cp -r "$cache/$f" ".device/b/cache/$(dirname "$f")/"; fi
    done
    echo "$dataset" >.device/b/dataset
    for part in a b; do
        size=$(du -sm ".device/$part" | cut -f1)
        echo ".device/$part: ${size} MiB"
        # A call carries 64 MiB in all, the repository's own files (about 2 MiB) included.
        [ "$size" -le 61 ] || { echo ".device/$part is too large for one call" >&2; exit 1; }
    done
    echo "staged; call 1: 'bash scripts/gpu-check.sh bench' carry [\".device/a\"]," \
        "call 2 at once after it: 'bash scripts/gpu-check.sh pipeline' carry [\".device/b\"]"
    ;;
bench)
    out=${OUT:-.device/out}
    mkdir -p "$out" "$stage_dir"
    cp .device/a/model.part "$stage_dir/model.part-a"
    use_device_torch
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    unxz_to .device/a/llm_bench.xz "$stage_dir/llm_bench"
    timeout 150 "$stage_dir/llm_bench" --device cuda --random-init --iters 10 --dtypes f32,bf16 \
        --json-out "$out/rsllm.json" 2>&1 | tee "$out/rsllm.log"
    # The optimizer alone (full and LoRA tensor sets) and the full fine-tuning step with
    # libtorch's AdamW and with ours, in the same call as the anchor.
    unxz_to .device/a/optim_bench.xz "$stage_dir/optim_bench"
    timeout 90 "$stage_dir/optim_bench" --device cuda --iters 10 \
        --json-out "$out/optim.json" 2>&1 | tee "$out/optim.log"
    BUDGET_S=${HF_BUDGET_S:-100} timeout 150 python3 .device/a/hf_anchor.py 2>&1 | tee "$out/hf.log"
    ;;
pipeline)
    out=${OUT:-.device/out}
    mkdir -p "$out"
    [ -f "$stage_dir/model.part-a" ] || { echo "no $stage_dir/model.part-a: run call 1 first, on the same warm machine" >&2; exit 1; }
    use_device_torch
    cache=$stage_dir/cache
    mkdir -p "$cache/models/llm"
    cp -r .device/b/cache/. "$cache/"
    cat "$stage_dir/model.part-a" .device/b/model.part >"$cache/models/llm/$model_file"
    echo "$(cat .device/b/model.sha256)  $cache/models/llm/$model_file" | sha256sum -c -
    unxz_to .device/b/rsllm.xz "$stage_dir/rsllm"
    run=$stage_dir/run
    set +e
    RSLLM_CACHE_DIR=$cache RSLLM_DATA_DIR=$PWD/.device/b/data RUST_LOG=info \
        timeout "${GPU_TIMEOUT:-480}" "$stage_dir/rsllm" pipeline --dataset "$(cat .device/b/dataset)" --profile full \
        --device "${GPU_DEVICE:-cuda}" --limit "${GPU_LIMIT:-30000}" --epochs "${GPU_EPOCHS:-1}" \
        --micro-batch "${GPU_MICRO:-64}" --grad-accum "${GPU_ACCUM:-2}" \
        --stage-time-limit-secs "${GPU_STAGE_SECS:-110}" \
        ${GPU_VARIANTS:+--variants "$GPU_VARIANTS"} ${GPU_TEST_LIMIT:+--test-limit "$GPU_TEST_LIMIT"} \
        ${GPU_LR:+--lr "$GPU_LR"} ${GPU_FULL:+--full-finetune --checkpoint-every 1000} \
        --out "$run" 2>&1 | tee "$out/pipeline.log"
    status=${PIPESTATUS[0]}
    set -e
    # A call brings back at most 8 files: the log, these three, and the LLM rows but zero-shot's.
    for f in report.md metrics.json figure.png "$run"/rows-text-only.csv "$run"/rows-rsllm*.csv; do
        f=$(basename "$f")
        [ -f "$run/$f" ] && cp "$run/$f" "$out/"
    done
    nvidia-smi --query-gpu=memory.used --format=csv >>"$out/pipeline.log" || true
    exit "$status"
    ;;
*)
    echo "usage: bash scripts/gpu-check.sh prepare|bench|pipeline" >&2
    exit 2
    ;;
esac
