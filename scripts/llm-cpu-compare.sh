#!/usr/bin/env bash
# Our LLM engine and Hugging Face transformers, side by side on this CPU: runs
# `cargo bench -p rsllm-llm --bench llm_bench` and then scripts/hf-cpu-anchor.py on the same
# model (the set-up SmolLM2-135M GGUF; transformers reads its HF export), one after the other,
# and prints a table with the ratios. Nothing else should run meanwhile: the machine has 2
# cores and both sides use both. Output: runs/bench-llm-<time>/ (rsllm.json, hf.jsonl, table.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cache=${RSLLM_CACHE_DIR:-$HOME/.cache/rsllm}
py=$cache/py/bin/python
"$py" -c 'import transformers' 2>/dev/null || "$py" -m pip install -q 'transformers>=5,<6' accelerate
hf_dir=$cache/models/llm/SmolLM2-135M-Instruct-hf
cargo build --release -p rsllm --locked
[ -f "$hf_dir/model.safetensors" ] || target/release/rsllm llm export --device cpu --out "$hf_dir"
out=$PWD/runs/bench-llm-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"
cargo bench -p rsllm-llm --bench llm_bench --locked -- --device cpu --iters 3 --dtypes f32,bf16 \
    --json-out "$out/rsllm.json" 2> "$out/rsllm.err"
"$py" scripts/hf-cpu-anchor.py --model "$hf_dir" > "$out/hf.jsonl" 2> "$out/hf.err"
python3 - "$out" <<'PY' | tee "$out/table.md"
import json, sys
out = sys.argv[1]
ours = {(r.get("name"), r.get("dtype")): r for r in json.load(open(f"{out}/rsllm.json")) if "name" in r}
hf = {}
for line in open(f"{out}/hf.jsonl"):
    r = json.loads(line)
    if "median_s" in r:
        hf[(r["name"], r["dtype"])] = r
rows = [
    ("prefill 1 x 384", ("prefill", "f32"), [("prefill", "f32"), ("prefill_logits_to_keep_1", "f32"), ("prefill", "bf16-autocast")]),
    ("prefill 1 x 384", ("prefill", "bf16"), [("prefill", "bf16-weights"), ("prefill", "bf16-autocast")]),
    ("generate 16 after 384", ("generate16", "f32"), [("decode", "f32")]),
    ("generate 16 after 384", ("generate16", "bf16"), [("decode", "bf16-weights")]),
    ("score 20 candidates after 384", ("score20", "f32"), [("score_prefix_cache", "f32"), ("score_naive", "f32")]),
    ("score 20 candidates after 384", ("score20", "bf16"), [("score_prefix_cache", "bf16-weights")]),
]
print("| measurement | rsllm (dtype) | rsllm median s | HF variant | HF median s | HF / rsllm |")
print("|---|---|---|---|---|---|")
for label, key, hf_keys in rows:
    o = ours.get(key)
    if not o:
        continue
    for hk in hf_keys:
        h = hf.get(hk)
        if not h:
            continue
        print(f"| {label} | {key[1]} | {o['median_s']:.3f} | {hk[0]} {hk[1]} | {h['median_s']:.3f} | {h['median_s'] / o['median_s']:.2f}x |")
PY
echo "written: $out"
