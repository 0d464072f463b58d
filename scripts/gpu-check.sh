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
# `bash scripts/gpu-check.sh stage` (carry [".device/a"]) is call 1 without the benchmarks: it
# only leaves the model's first half there (with GPU_STEP_BENCH=1 it also times the optimizer
# update with and without an idle projector, one training step of the pipeline's shape, full
# fine-tune and LoRA, fused and not, and the LoRA step at 128 and 256 rows, about 100 s). A
# further dataset on the same warm machine needs
# neither the model nor the binary again:
#
#   GPU_DATASET=lastfm bash scripts/gpu-check.sh prepare-data   # here: stage .device/c
#   GPU_PART=c bash scripts/gpu-check.sh pipeline               # there, carry [".device/c"]
#
# Each dataset's run directory there is /tmp/rsllm-gpu/run-<dataset>: a second call for the
# same dataset resumes it when the settings are the same and is refused when they differ, so
# start such a call with `rm -rf /tmp/rsllm-gpu/run-<dataset> &&`.
#
# Call 1 also fails fast: if our binary cannot use CUDA there, the machine can be given back
# before the longer call 2. Both use the device image's own PyTorch 2.11.0 as libtorch.
# Pipeline settings come from the environment, so a rerun needs no edit. The defaults are the
# best H100 runs of docs/results.md ("Two epochs, L_ui weighed 1 in stage 2 over the catalog"):
# 30,000 rows per stage, two epochs, micro-batch 64 (2.7x faster than 16) and one micro-batch
# per step, L_ui over the whole catalog ("The alignment heads' ceiling") weighed 1 in stage 2
# and METHOD.md's 0.1 in stage 1 ("Four times the quick profile's steps"), 170 s per training
# run (MovieLens's 938 steps took 149-158 s on an H100). GPU_LIMIT (training rows per stage),
# GPU_EPOCHS, GPU_MICRO, GPU_ACCUM, GPU_STAGE_SECS, GPU_TIMEOUT (the whole pipeline), GPU_VARIANTS,
# GPU_LR, GPU_WARMUP (projector warm-up steps before every stage-2 run with slots),
# GPU_UI_SIM=user-normalised (L_ui keeps the item vectors' length; docs/results.md, "What ranking
# by the cosine costs the recommenders themselves"), GPU_UI_NEG (default catalog; candidates is
# METHOD.md's), GPU_LAMBDA_UI (default 1; METHOD.md's 0.1), GPU_STAGE1_LAMBDA_UI (default 0.1),
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

# Stages one dataset (GPU_DATASET, default movielens) into $1: its raw files, and its
# prepared split and trained SASRec when they exist here (else the pipeline makes them there).
stage_dataset() {
    local dir=$1 cache=${RSLLM_CACHE_DIR:-$HOME/.cache/rsllm} data=${RSLLM_DATA_DIR:-../shared/data}
    local dataset=${GPU_DATASET:-movielens} raw
    case "$dataset" in
    movielens) raw=movielens-100k ;;
    lastfm) raw=lastfm-hetrec2011-2k ;;
    steam | steam-valtrain) raw=steam ;;
    *) echo "GPU_DATASET=$dataset: expected movielens, lastfm, steam or steam-valtrain" >&2; exit 2 ;;
    esac
    mkdir -p "$dir/cache/models/rec" "$dir/cache/prepared" "$dir/data"
    cp -r "$data/$raw" "$dir/data/"
    for f in "prepared/$dataset-llara" "models/rec/$dataset-llara-sasrec"; do
        if [ -d "$cache/$f" ]; then cp -r "$cache/$f" "$dir/cache/$(dirname "$f")/"; fi
    done
    echo "$dataset" >"$dir/dataset"
}

# A call carries 64 MiB in all, the repository's own files (about 2 MiB) included.
check_size() {
    local size
    size=$(du -sm "$1" | cut -f1)
    echo "$1: ${size} MiB"
    [ "$size" -le 61 ] || { echo "$1 is too large for one call" >&2; exit 1; }
}

# GPU_STEP_BENCH=1 (in `stage` and `bench`): also time the optimizer update over LoRA with
# and without an idle projector (stage 1 and 2), and the pipeline's training step shape (64 x
# 256) as a full fine-tune and with LoRA, fused and unfused, with and without the base's bf16
# copies (about 60 s): what the adapters cost per step on this card. Then the LoRA step at 128
# and 256 rows (GPU_STEP_ROWS): where a step stops being bound by kernel launches, i.e. which
# micro-batch trains the most rows per second.
step_bench() {
    local out=${OUT:-.device/out} rows
    mkdir -p "$out"
    use_device_torch
    unxz_to .device/a/optim_bench.xz "$stage_dir/optim_bench"
    timeout 150 "$stage_dir/optim_bench" --device cuda --iters 5 --only lora,lora-idle-projector,train16,train-lora \
        --batch 64 --seq 256 --json-out "$out/step.json" 2>&1 | tee "$out/step.log"
    for rows in ${GPU_STEP_ROWS:-128 256}; do
        timeout 100 "$stage_dir/optim_bench" --device cuda --iters 5 --only train-lora \
            --batch "$rows" --seq 256 --json-out "$out/step-$rows.json" 2>&1 | tee "$out/step-$rows.log"
    done
}

case "${1:-}" in
prepare-data)
    rm -rf .device/c
    stage_dataset .device/c
    check_size .device/c
    echo "staged; after call 2, on the same warm machine: 'GPU_PART=c bash scripts/gpu-check.sh pipeline' carry [\".device/c\"]"
    ;;
prepare)
    cache=${RSLLM_CACHE_DIR:-$HOME/.cache/rsllm}
    gguf="$cache/models/llm/$model_file"
    [ -f "$gguf" ] || { echo "no $gguf: run scripts/setup.sh first" >&2; exit 1; }
    cargo build --release -p rsllm
    cargo bench -p rsllm-llm --bench llm_bench --no-run
    cargo bench -p rsllm-trainer --bench optim_bench --no-run
    bench=$(ls -t target/release/deps/llm_bench-* | grep -v '\.d$' | head -n1)
    optim_bench=$(ls -t target/release/deps/optim_bench-* | grep -v '\.d$' | head -n1)
    rm -rf .device/a .device/b
    mkdir -p .device/a .device/b
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
    stage_dataset .device/b
    check_size .device/a
    check_size .device/b
    echo "staged; call 1: 'bash scripts/gpu-check.sh bench' carry [\".device/a\"]," \
        "call 2 at once after it: 'bash scripts/gpu-check.sh pipeline' carry [\".device/b\"]"
    ;;
stage)
    mkdir -p "$stage_dir"
    cp .device/a/model.part "$stage_dir/model.part-a"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    if [ -n "${GPU_STEP_BENCH:-}" ]; then step_bench; fi
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
    # Our step once more after the anchor, so the anchor's step sits between two of ours: the
    # spread between processes on one card was as large as the ratio being checked.
    timeout 60 "$stage_dir/optim_bench" --device cuda --iters 10 --only train16 \
        --json-out "$out/optim-after.json" 2>&1 | tee "$out/optim-after.log"
    if [ -n "${GPU_STEP_BENCH:-}" ]; then step_bench; fi
    ;;
pipeline)
    out=${OUT:-.device/out}
    part=.device/${GPU_PART:-b}
    mkdir -p "$out"
    use_device_torch
    cache=$stage_dir/cache
    mkdir -p "$cache/models/llm"
    cp -r "$part/cache/." "$cache/"
    model=$cache/models/llm/$model_file
    if [ -f "$part/model.part" ]; then
        [ -f "$stage_dir/model.part-a" ] || { echo "no $stage_dir/model.part-a: run call 1 first, on the same warm machine" >&2; exit 1; }
        cat "$stage_dir/model.part-a" "$part/model.part" >"$model"
        cp "$part/model.sha256" "$stage_dir/model.sha256"
        unxz_to "$part/rsllm.xz" "$stage_dir/rsllm"
    fi
    # A data-only part (prepare-data) reuses the model and the binary an earlier call left.
    [ -x "$stage_dir/rsllm" ] && [ -f "$stage_dir/model.sha256" ] || { echo "no model or binary in $stage_dir: run calls 1 and 2 first, on the same warm machine" >&2; exit 1; }
    echo "$(cat "$stage_dir/model.sha256")  $model" | sha256sum -c -
    run=$stage_dir/run-$(cat "$part/dataset")
    set +e
    RSLLM_CACHE_DIR=$cache RSLLM_DATA_DIR=$PWD/$part/data RUST_LOG=info \
        timeout "${GPU_TIMEOUT:-480}" "$stage_dir/rsllm" pipeline --dataset "$(cat "$part/dataset")" --profile full \
        --device "${GPU_DEVICE:-cuda}" --limit "${GPU_LIMIT:-30000}" --epochs "${GPU_EPOCHS:-2}" \
        --micro-batch "${GPU_MICRO:-64}" --grad-accum "${GPU_ACCUM:-1}" \
        --stage-time-limit-secs "${GPU_STAGE_SECS:-170}" \
        ${GPU_VARIANTS:+--variants "$GPU_VARIANTS"} ${GPU_TEST_LIMIT:+--test-limit "$GPU_TEST_LIMIT"} \
        ${GPU_LR:+--lr "$GPU_LR"} ${GPU_WARMUP:+--projector-warmup-steps "$GPU_WARMUP"} ${GPU_FULL:+--full-finetune --checkpoint-every 1000} \
        ${GPU_UI_SIM:+--ui-similarity "$GPU_UI_SIM"} --ui-negatives "${GPU_UI_NEG:-catalog}" \
        --lambda-ui "${GPU_LAMBDA_UI:-1}" --stage1-lambda-ui "${GPU_STAGE1_LAMBDA_UI:-0.1}" \
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
    echo "usage: bash scripts/gpu-check.sh prepare|prepare-data|stage|bench|pipeline" >&2
    exit 2
    ;;
esac
