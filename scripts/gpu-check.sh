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
# Evaluation time grows with the test rows: the H100's MovieLens call spent at most 32 s on
# data, model and three evaluations of 95 rows, about 0.1 s a row and method. Steam
# (GPU_DATASET=steam-valtrain) has 1,186 test rows, about six minutes for three methods, so
# give it GPU_TEST_LIMIT=200 (the CPU columns' rows) or 400 within one session.
#
# Each dataset's run directory there is /tmp/rsllm-gpu/run-<dataset>: a second call for the
# same dataset resumes it when the settings are the same and is refused when they differ, so
# start such a call with `rm -rf /tmp/rsllm-gpu/run-<dataset> &&`.
#
# One lent session, one schedule. A session's 15 minutes hold about nine of training once the
# machine has started and the model has travelled, and the files a call brings back land on
# the session's own machine: the next session starts on a fresh one with the repository alone,
# so nothing trained reaches it. Plan each run to finish inside its call (docs/results.md,
# "What remains" has the next one, with its arithmetic). Within a session a stage can still
# come back, to be evaluated on more rows on the CPU (`rsllm eval --stage-dir`) or resumed by
# a later call after the machine was given back (same settings: the pipeline refuses others):
#
#   GPU_KEEP=stage2 ... bash scripts/gpu-check.sh pipeline   # there: the stage's latest
#                             # checkpoint, optimizer state included (42 MB with LoRA), comes
#                             # back as <dataset>.<stage>.tar.part-* beside the report (its
#                             # rows and figure then come packed in rows-and-figure.tar.gz,
#                             # 7 files in all: a call brings back 8 at most)
#   GPU_KEEP=stage1 bash scripts/gpu-check.sh keep   # there, the next call, no carry: one
#                             # more stage of the same run (a call brings back one)
#   bash scripts/gpu-check.sh unpack-here DIR RUN    # here: those parts from the files folder
#                             # DIR into run directory RUN, for `rsllm eval --stage-dir`
#   bash scripts/gpu-check.sh prepare-carry k1 DIR  # here: those parts into .device/k1 (one
#                             # stage per folder), to resume on a fresh machine
#   GPU_PART=k1 bash scripts/gpu-check.sh unpack    # there, carry [".device/k1"], after call 1:
#                             # into /tmp/rsllm-gpu/run-<dataset>; then the pipeline call
#
# A stage-1 settings change (GPU_LIMIT, GPU_EPOCHS, ...) makes the carried stages unusable: the
# pipeline names the setting and the script starts afresh (a stage-2 change alone, such as
# GPU_LAMBDA_UI, sets aside the stage-2 runs and keeps stage 1). GPU_STAGE1_EPOCHS gives stage
# 1 its own epochs, so stage 2 can take more (GPU_EPOCHS); GPU_STAGE_SECS stops a training run
# that would outlast the call, which then still evaluates and reports what it reached.
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
# GPU_FULL=1 (full fine-tune, as the peer anchor's text-only baseline: try GPU_LR=1e-4),
# GPU_STAGE1_EPOCHS, GPU_REC (the recommender whose vectors fill the ID slots: sasrec,
# METHOD.md's default, gru4rec or caser), GPU_LAMBDA_RANK and GPU_RANK_NEG (L_rank's weight and
# negatives in the `rank` variant, GPU_VARIANTS=rank; docs/training.md), GPU_WINDOW (--length-window-steps, default 16 here: a 64-row step pads 2%
# instead of 15-23%; 0 was every run until 2026-11-27; docs/results.md, "Steps of similar
# lengths"), GPU_KEEP, and for
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
# prepared split and trained recommenders when they exist here (else the pipeline trains the
# one that fills the ID slots there, GPU_REC, and reports only that one).
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
    for f in "prepared/$dataset-llara" "models/rec/$dataset-llara-"{sasrec,gru4rec,caser}; do
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

# Packs the stage directory $2 of run $1 into $3 as <dataset $4>.<stage>.tar cut into pieces of
# 15 MiB (.tar.part-aa, -ab, ...): its stage files and its latest checkpoint alone (a run keeps
# two), optimizer state included, so the next lent GPU resumes it. The checkpoint's manifest
# holds its tensor files' sha256, which the resuming run checks.
keep_stage() {
    local run=$1 stage=$2 out=$3 tarball=$4.$2.tar latest
    [ -f "$run/$stage/checkpoints/latest.json" ] || { echo "GPU_KEEP=$stage: no checkpoint in $run/$stage" >&2; return 1; }
    latest=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["dir"])' "$run/$stage/checkpoints/latest.json")
    (cd "$run" && find "$stage" -maxdepth 1 -type f -print0 | tar -cf "$out/$tarball" --null -T - \
        "$stage/checkpoints/latest.json" "$stage/checkpoints/$latest")
    (cd "$out" && split -b 15m "$tarball" "$tarball.part-" && rm "$tarball")
    echo "kept $stage ($latest) in $(find "$out" -name "$tarball.part-*" | wc -l) parts"
}

# Joins the pieces of every stage kept in folder $1 and unpacks them into run directory $2.
unpack_parts() {
    local from=$1 run=$2 first tarball
    mkdir -p "$run"
    for first in "$from"/*.tar.part-aa; do
        tarball=$(basename "$first" .part-aa)
        cat "$from/$tarball".part-* | tar -xf - -C "$run"
        echo "unpacked $tarball into $run"
    done
    find "$run" -maxdepth 3 -name latest.json -exec sh -c 'echo "  $1: $(tr -d "\n " <"$1")"' _ {} \;
}

case "${1:-}" in
prepare-data)
    rm -rf .device/c
    stage_dataset .device/c
    check_size .device/c
    echo "staged; after call 2, on the same warm machine: 'GPU_PART=c bash scripts/gpu-check.sh pipeline' carry [\".device/c\"]"
    ;;
prepare-carry)
    name=${2:?usage: bash scripts/gpu-check.sh prepare-carry NAME FILES_DIR}
    from=${3:?usage: bash scripts/gpu-check.sh prepare-carry NAME FILES_DIR}
    case "$name" in a | b | c | out | *[!A-Za-z0-9_-]*) echo "prepare-carry: NAME '$name' must be a new folder name (not a, b, c or out)" >&2; exit 2 ;; esac
    parts=("$from"/*.tar.part-*)
    [ -f "${parts[0]}" ] || { echo "prepare-carry: no *.tar.part-* in $from (a call with GPU_KEEP brings them back)" >&2; exit 1; }
    rm -rf ".device/$name"
    mkdir -p ".device/$name"
    cp "${parts[@]}" ".device/$name/"
    # <dataset>.<stage>.tar.part-xx: the dataset names the run directory there.
    basename "${parts[0]}" | cut -d. -f1 >".device/$name/dataset"
    check_size ".device/$name"
    echo "staged; there, after call 1: 'GPU_PART=$name bash scripts/gpu-check.sh unpack' carry [\".device/$name\"]"
    ;;
keep)
    # A second stage after the pipeline call, on the same warm machine: a call brings back
    # 64 MiB at most, one stage's checkpoint (42 MB with LoRA) and the pipeline's results.
    out=${OUT:-.device/out}
    part=.device/${GPU_PART:-b}
    mkdir -p "$out"
    keep_stage "$stage_dir/run-$(cat "$part/dataset")" "${GPU_KEEP:?GPU_KEEP names the stage to bring back: stage1, stage2, ...}" "$out" "$(cat "$part/dataset")"
    ;;
unpack)
    part=.device/${GPU_PART:?GPU_PART names the folder prepare-carry staged}
    unpack_parts "$part" "$stage_dir/run-$(cat "$part/dataset")"
    ;;
unpack-here)
    from=${2:?usage: bash scripts/gpu-check.sh unpack-here FILES_DIR RUN_DIR}
    run=${3:?usage: bash scripts/gpu-check.sh unpack-here FILES_DIR RUN_DIR}
    parts=("$from"/*.tar.part-aa)
    [ -f "${parts[0]}" ] || { echo "unpack-here: no *.tar.part-aa in $from (a call with GPU_KEEP brings them back)" >&2; exit 1; }
    unpack_parts "$from" "$run"
    echo "evaluate with: rsllm eval --dataset $(basename "${parts[0]}" | cut -d. -f1) --stage-dir $run/<stage> [--limit N]"
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
    run_pipeline() {
        RSLLM_CACHE_DIR=$cache RSLLM_DATA_DIR=$PWD/$part/data RUST_LOG=info \
            timeout "${GPU_TIMEOUT:-480}" "$stage_dir/rsllm" pipeline --dataset "$(cat "$part/dataset")" --profile full \
            --device "${GPU_DEVICE:-cuda}" --rec-model "${GPU_REC:-sasrec}" --limit "${GPU_LIMIT:-30000}" --epochs "${GPU_EPOCHS:-2}" \
            ${GPU_STAGE1_EPOCHS:+--stage1-epochs "$GPU_STAGE1_EPOCHS"} --length-window-steps "${GPU_WINDOW:-16}" \
            --micro-batch "${GPU_MICRO:-64}" --grad-accum "${GPU_ACCUM:-1}" \
            --stage-time-limit-secs "${GPU_STAGE_SECS:-170}" \
            ${GPU_VARIANTS:+--variants "$GPU_VARIANTS"} ${GPU_TEST_LIMIT:+--test-limit "$GPU_TEST_LIMIT"} \
            ${GPU_LR:+--lr "$GPU_LR"} ${GPU_WARMUP:+--projector-warmup-steps "$GPU_WARMUP"} ${GPU_FULL:+--full-finetune --checkpoint-every 1000} \
            ${GPU_UI_SIM:+--ui-similarity "$GPU_UI_SIM"} --ui-negatives "${GPU_UI_NEG:-catalog}" \
            --lambda-ui "${GPU_LAMBDA_UI:-1}" --stage1-lambda-ui "${GPU_STAGE1_LAMBDA_UI:-0.1}" \
            ${GPU_LAMBDA_RANK:+--lambda-rank "$GPU_LAMBDA_RANK"} ${GPU_RANK_NEG:+--rank-negatives "$GPU_RANK_NEG"} \
            --out "$run" 2>&1 | tee -a "$out/pipeline.log"
        return "${PIPESTATUS[0]}"
    }
    set +e
    : >"$out/pipeline.log"
    run_pipeline
    status=$?
    # A carried stage (unpack) trained with other settings binds its directory: set it aside
    # rather than lose the call. Only the stage-2 runs when stage 1 still matches (they start
    # from it); the whole run when stage 1 does not (a stage 2 over another stage 1 is stale
    # whatever its own settings say).
    stale=$(grep -o "^Error: $run: .* were started with other settings" "$out/pipeline.log" || true)
    if [ "$status" -ne 0 ] && [ -n "$stale" ]; then
        rm -rf "$run.unmatched" && mkdir -p "$run.unmatched"
        if echo "$stale" | grep -Eq "(: |, )stage1 \("; then
            echo "gpu-check: the carried stage 1 does not match these settings; $run moved to $run.unmatched, starting afresh" | tee -a "$out/pipeline.log"
            rmdir "$run.unmatched" && mv "$run" "$run.unmatched"
        else
            echo "gpu-check: a carried stage 2 does not match these settings; the stage-2 runs moved to $run.unmatched, stage 1 kept" | tee -a "$out/pipeline.log"
            find "$run" -mindepth 1 -maxdepth 1 -type d -name 'stage2*' -exec mv {} "$run.unmatched/" \;
        fi
        run_pipeline
        status=$?
    fi
    set -e
    # A call brings back at most 8 files. Without GPU_KEEP: the log, these three, and the LLM
    # rows but zero-shot's. With it: the log, report and metrics, the rows and figure packed,
    # and the kept stage's checkpoint in pieces of 15 MiB (16 MiB a file, 64 MiB a call).
    results=(report.md metrics.json)
    extras=(figure.png)
    for f in "$run"/rows-text-only.csv "$run"/rows-rsllm*.csv; do
        [ -f "$f" ] && extras+=("$(basename "$f")")
    done
    if [ -n "${GPU_KEEP:-}" ]; then
        keep_stage "$run" "$GPU_KEEP" "$out" "$(cat "$part/dataset")" || echo "gpu-check: GPU_KEEP=$GPU_KEEP kept nothing" >&2
        present=()
        for f in "${extras[@]}"; do [ -f "$run/$f" ] && present+=("$f"); done
        [ "${#present[@]}" -eq 0 ] || tar -czf "$out/rows-and-figure.tar.gz" -C "$run" "${present[@]}"
    else
        results+=("${extras[@]}")
    fi
    for f in "${results[@]}"; do
        [ -f "$run/$f" ] && cp "$run/$f" "$out/"
    done
    nvidia-smi --query-gpu=memory.used --format=csv >>"$out/pipeline.log" || true
    exit "$status"
    ;;
*)
    echo "usage: bash scripts/gpu-check.sh prepare|prepare-data|prepare-carry|stage|bench|pipeline|keep|unpack|unpack-here" >&2
    exit 2
    ;;
esac
