#!/usr/bin/env bash
# The main job, end to end on the embedded defaults: setup, build, prepare MovieLens under the
# LLaRA protocol, train SASRec and evaluate it, then `rsllm pipeline --profile quick`: RSLLM's
# stage 1 (text-only) and stage 2 (unified Text-ID prompts with SASRec's item vectors) on a
# training subset, and the evaluation of SASRec, the zero-shot LLM, the text-only fine-tune and
# RSLLM. About 15 minutes on a 2-core CPU after setup (AVX2, or AVX-512 BF16), 9-11 with AMX. Report: runs/pipeline-<dataset>-quick/.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh
cargo build --release --locked -p rsllm
rsllm=target/release/rsllm
dataset=${RSLLM_DATASET:-movielens}
"$rsllm" data prepare --dataset "$dataset" --protocol llara
"$rsllm" data stats --dataset "$dataset" --protocol llara
"$rsllm" rec train --dataset "$dataset" --protocol llara --model sasrec
"$rsllm" rec eval --dataset "$dataset" --protocol llara --model sasrec
"$rsllm" pipeline --dataset "$dataset" --protocol llara --profile quick
cat "runs/pipeline-$dataset-quick/report.md"
