#!/usr/bin/env bash
# The main job, end to end on the embedded defaults: setup, build, prepare MovieLens under the
# LLaRA protocol, train SASRec, evaluate it on the stored test candidates and print the table.
# (Later stages of RSLLM -- the LLM fine-tuning and its evaluation -- join this script as they
# land; see docs/results.md for what exists.)
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
