#!/usr/bin/env bash
# Trains and evaluates every ID-based recommender on every dataset and protocol, then prints
# the markdown table that docs/results.md records. Reuses prepared splits; retrains models.
#   RSLLM_REC_DATASETS="movielens lastfm"  RSLLM_REC_MODELS="sasrec gru4rec caser"
#   RSLLM_REC_PROTOCOLS="llara loo"
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bash scripts/setup.sh >/dev/null
cargo build --release --locked -p rsllm
rsllm=target/release/rsllm
datasets=${RSLLM_REC_DATASETS:-movielens lastfm}
protocols=${RSLLM_REC_PROTOCOLS:-llara loo}
models=${RSLLM_REC_MODELS:-sasrec gru4rec caser}
out=$(mktemp -d)
for d in $datasets; do
    for p in $protocols; do
        for m in $models; do
            start=$(date +%s)
            "$rsllm" rec train --dataset "$d" --protocol "$p" --model "$m" --json >"$out/$d-$p-$m.train.json"
            secs=$(( $(date +%s) - start ))
            "$rsllm" rec eval --dataset "$d" --protocol "$p" --model "$m" --json >"$out/$d-$p-$m.eval.json"
            python3 - "$out/$d-$p-$m.eval.json" "$out/$d-$p-$m.train.json" "$secs" <<'PY'
import json, sys
e = json.load(open(sys.argv[1])); t = json.load(open(sys.argv[2]))
m = t.get("metrics", {})
print(f"| {e['dataset']} | {e['protocol']} | {e['model']} | {e['n']} | {e['hr1']:.4f} "
      f"| {e['ci95']['hr1'][0]:.3f}-{e['ci95']['hr1'][1]:.3f} | {e['hr5']:.4f} | {e['ndcg5']:.4f} "
      f"| {m.get('val', {}).get('hr1', {}).get('mean', float('nan')):.4f} | {m.get('best_epoch', '?')} "
      f"| {sys.argv[3]} s | {e['version'][:12]} |", flush=True)
PY
        done
    done
done
