#!/usr/bin/env python3
"""CPU speed anchor: what PyTorch + Hugging Face transformers does with SmolLM2-135M on this machine.

Our Rust engine's bench (`cargo bench -p rsllm-llm --bench llm_bench`) is compared against this
script on the same (2-core) CPU machine. It is the CPU twin of ../shared/bench/hf_anchor.py (which
measures the GPU); the model is the same SmolLM2-135M architecture.

What it measures (wall clock, time.perf_counter; a few warm-up runs, then median / min / max)
--------------------------------------------------------------------------------------------
  prefill   forward of 1 x 384 token ids, called the way a user would: `model(input_ids=x)`, which
            computes the 49152-wide logits at every position; and `logits_to_keep=1`, which computes
            only the last position's logits (what our engine's prefill does).
  decode    `model.generate` of exactly 16 greedy tokens after a 384-token prompt (KV cache).
            Reported: total seconds, new tokens/s = 16 / total, and
            decode tokens/s = 16 / (total - prefill median, logits_to_keep=1 variant, since generate
            itself asks for the last logits only). Note that generate's prefill already yields the
            first new token, so the remainder is 15 single-token forward steps.
  score     log-probability sums of 20 candidate movie titles after a 384-token prompt:
              naive         one batch of 20 x (prompt + candidate), right-padded, one forward,
                            log_softmax + gather of the candidate tokens;
              prefix-cache  the prompt once with use_cache=True, its DynamicCache repeated to batch
                            20 (Cache.batch_repeat_interleave), then the 20 candidates as one batch.
            Both must give the same per-candidate sums (checked to 1e-3 in f32; printed).

Each measurement runs in these precisions ("dtype" in the output):
  f32            float32 weights and compute;
  bf16-autocast  float32 weights under torch.autocast("cpu", dtype=torch.bfloat16) (what the CPU
                 table in shared/docs/GPU.md measured);
  bf16-weights   model.to(torch.bfloat16).
On a CPU without bf16 hardware (no avx512_bf16 / amx_bf16; e.g. the AVX2-only AMD EPYC of the
2-core machine, where oneDNN has no bf16 path: "mkldnn_bf16_supported": false in the env line)
both bf16 modes are several times *slower* than f32, because PyTorch falls back to a generic bf16
matmul. That is a result, not a bug of this script.

Run time (default: about 3 minutes on 2 cores)
---------------------------------------------
--iters / --decode-iters / --score-iters are upper bounds: one measurement stops timing once its
timed runs add up to --measure-s seconds (at least one run; 0 = no limit), and the "iters" field
says how many runs the median / min / max are over. Naive scoring (20 full prompts, about 20 x a
prefill) is skipped, with a {"skipped": ...} line, when one run is estimated from the prefill at
over --max-run-s seconds (bf16 here: about 2 minutes a run); --max-run-s 0 runs it anyway.

Output: first a JSON line describing the environment, then one JSON line per measurement on stdout,
a final {"done": ...} line, and a markdown summary table on stderr.

Run
---
  ~/.cache/rsllm/py/bin/python scripts/hf-cpu-anchor.py                 # default model dir, all
  ~/.cache/rsllm/py/bin/python scripts/hf-cpu-anchor.py --random-init   # same shapes, random weights
  ~/.cache/rsllm/py/bin/python scripts/hf-cpu-anchor.py --only prefill --dtypes f32,bf16-autocast

The model directory defaults to $RSLLM_CACHE_DIR/models/llm/SmolLM2-135M-Instruct-hf (cache dir
defaults to ~/.cache/rsllm): a Hugging Face export of our default GGUF (config.json,
model.safetensors in f32, tokenizer.json). Nothing is ever downloaded (HF_HUB_OFFLINE=1).
"""
import argparse
import contextlib
import copy
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time

# Never touch the Hugging Face hub: everything comes from local directories. Set before importing
# transformers so that huggingface_hub reads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

PROMPT_LEN = 384
NEW_TOKENS = 16
N_CANDIDATES = 20
PAD_ID = 2  # SmolLM2's <|im_end|>, also its eos; what hf_anchor.py and the model dir use.
DTYPES = ("f32", "bf16-autocast", "bf16-weights")
MEASUREMENTS = ("prefill", "decode", "score")

# Real-looking MovieLens-1M titles (leading space: they follow "... titles:" / "Answer:").
# The first 20 are the candidates; all of them feed the watch history of the prompt.
TITLES = [
    " Fargo (1996)", " Scream (1996)", " Titanic (1997)", " Star Wars (1977)", " Pulp Fiction (1994)",
    " Toy Story (1995)", " Jurassic Park (1993)", " Braveheart (1995)", " Men in Black (1997)",
    " The Matrix (1999)", " Forrest Gump (1994)", " Schindler's List (1993)", " Alien (1979)",
    " Twister (1996)", " Contact (1997)", " Independence Day (ID4) (1996)", " Air Force One (1997)",
    " The Fugitive (1993)", " Good Will Hunting (1997)", " American Beauty (1999)",
    " Back to the Future (1985)", " Raiders of the Lost Ark (1981)", " The Silence of the Lambs (1991)",
    " Terminator 2: Judgment Day (1991)", " Saving Private Ryan (1998)", " Groundhog Day (1993)",
    " The Usual Suspects (1995)", " Shakespeare in Love (1998)", " The Sixth Sense (1999)",
    " L.A. Confidential (1997)", " Being John Malkovich (1999)", " Princess Bride, The (1987)",
]
CANDIDATES = TITLES[:N_CANDIDATES]

# SmolLM2-135M, as in ../shared/bench/hf_anchor.py (used with --random-init).
RANDOM_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     max_position_embeddings=8192,
                     rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                     rms_norm_eps=1e-5, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)

RESULTS = []  # every measurement dict, for the summary table


# ----------------------------------------------------------------------------------------- helpers

def default_model_dir():
    cache = os.environ.get("RSLLM_CACHE_DIR") or os.path.expanduser("~/.cache/rsllm")
    return os.path.join(cache, "models", "llm", "SmolLM2-135M-Instruct-hf")


def cpu_model_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags():
    """The CPU flags that decide how bf16 runs (natively with avx512_bf16 / amx_bf16, else emulated)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
                                                              "avx_vnni", "amx_bf16", "f16c"})
    except OSError:
        pass
    return []


def timed(fn, warm, iters, cap_s=0.0, est_s=None):
    """Run fn `warm` times untimed (allocator, oneDNN primitive caches), then time up to `iters` runs.

    cap_s > 0 keeps the slow cases (bf16 on CPUs without bf16 hardware: several seconds a run)
    within a few minutes in all: timing stops once the timed runs add up to cap_s (at least one run),
    warm-ups after the first are dropped when the first took over cap_s / 4, and none is done when
    est_s (the expected seconds of one run) is over cap_s / 2; one-time costs (oneDNN primitives,
    allocator) are then small next to a run anyway.
    Returns (median, min, max, number of timed runs, last result of fn)."""
    if cap_s and est_s is not None and est_s > cap_s / 2:
        warm = 0
    out = None
    t_warm = time.perf_counter()
    for _ in range(warm):
        out = fn()
        if cap_s and time.perf_counter() - t_warm > cap_s / 4:
            break
    ts = []
    while len(ts) < iters and not (cap_s and ts and sum(ts) >= cap_s):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts), max(ts), len(ts), out


def accepts(model, kwarg):
    """Whether model.forward takes `kwarg` (the check transformers' generate does itself)."""
    return kwarg in inspect.signature(model.forward).parameters


def report(name, dtype, med, lo, hi, iters, **extra):
    d = dict(name=name, dtype=dtype, median_s=round(med, 4), min_s=round(lo, 4), max_s=round(hi, 4),
             iters=iters, **extra)
    RESULTS.append(d)
    print(json.dumps(d), flush=True)
    return d


def precision(model_f32, dtype):
    """(model, context manager) for one of DTYPES. bf16-weights gets its own bf16 copy."""
    if dtype == "f32":
        return model_f32, contextlib.nullcontext
    if dtype == "bf16-autocast":
        return model_f32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if dtype == "bf16-weights":
        return copy.deepcopy(model_f32).to(torch.bfloat16).eval(), contextlib.nullcontext
    raise ValueError(dtype)


# ------------------------------------------------------------------------------------ model, inputs

def load_model(args):
    if args.random_init:
        torch.manual_seed(0)
        cfg = LlamaConfig(**RANDOM_CONFIG)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    else:
        model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True)
    return model.eval()


def load_tokenizer(args):
    """The model dir's tokenizer; with --random-init the default dir's one if present, else None."""
    path = default_model_dir() if args.random_init else args.model
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not args.random_init:
        sys.exit(f"no tokenizer.json in {path}")
    return None


def build_prompt(tok, vocab):
    """Exactly PROMPT_LEN ids: a LLaRA-style MovieLens prompt, or random ids without a tokenizer/--random-init."""
    if tok is None:
        g = torch.Generator().manual_seed(1)
        return torch.randint(3, vocab, (1, PROMPT_LEN), generator=g)
    cands = ",".join(CANDIDATES)
    history, i = [], 0
    while True:
        text = (f"This user has watched{','.join(history)} in the previous. Please predict the next movie "
                f"this user will watch. Choose the answer from the following 20 movie titles:{cands}. Answer:")
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) >= PROMPT_LEN:
            break
        # Grow the watch history (cycling through the titles) until the prompt is long enough.
        history.append(TITLES[i % len(TITLES)])
        i += 1
    # Keep the last PROMPT_LEN ids: cut the oldest history, so the prompt still ends with "Answer:".
    return torch.tensor([ids[-PROMPT_LEN:]])


def build_candidates(tok, vocab):
    """20 token-id lists: the titles tokenized, or random 4-8 token continuations without a tokenizer."""
    if tok is None:
        g = torch.Generator().manual_seed(2)
        lens = torch.randint(4, 9, (N_CANDIDATES,), generator=g).tolist()
        return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]
    return [tok(t, add_special_tokens=False).input_ids for t in CANDIDATES]


def pad_candidates(cands):
    """Right-pad the candidates: (ids [20, K], mask [20, K]) with K the longest candidate."""
    k = max(len(c) for c in cands)
    ids = torch.full((len(cands), k), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(cands), k), dtype=torch.long)
    for i, c in enumerate(cands):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------- measurements

def measure_prefill(model, ctx, dtype, x, args):
    """Forward 1 x 384: all-position logits (as users call it), and last-position only."""
    out = {}
    variants = [("prefill", {})]
    if accepts(model, "logits_to_keep"):  # transformers >= 4.50; generate uses it the same way
        variants.append(("prefill_logits_to_keep_1", {"logits_to_keep": 1}))
    for name, kw in variants:
        def run():
            with torch.inference_mode(), ctx():
                return model(input_ids=x, use_cache=False, **kw).logits
        med, lo, hi, n, logits = timed(run, args.warmup, args.iters, args.measure_s)
        out[name] = med
        report(name, dtype, med, lo, hi, n, batch=1, seq=x.shape[1],
               logits_positions=logits.shape[1], tokens_per_s=round(x.shape[1] / med, 1))
    return out


def quick_prefill(model, ctx, x, kw):
    """Seconds of one prefill (after one warm-up), for when the prefill measurement is filtered out."""
    def run():
        with torch.inference_mode(), ctx():
            return model(input_ids=x, use_cache=False, **kw)
    return timed(run, 1, 1)[0]


def measure_decode(model, ctx, dtype, x, prefill_med, args):
    """Greedy generate of exactly NEW_TOKENS tokens after the prompt (KV cache, DynamicCache)."""
    att = torch.ones_like(x)

    def run():
        with torch.inference_mode(), ctx():
            return model.generate(input_ids=x, attention_mask=att, min_new_tokens=NEW_TOKENS,
                                  max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=PAD_ID,
                                  use_cache=True)
    med, lo, hi, n, seq = timed(run, 1, args.decode_iters, args.measure_s)
    new = seq.shape[1] - x.shape[1]
    assert new == NEW_TOKENS, f"generate made {new} tokens"
    extra = dict(prompt=x.shape[1], new_tokens=new, new_tokens_per_s=round(new / med, 2))
    if prefill_med is not None and med > prefill_med:
        # generate's prefill (logits_to_keep=1) is timed separately; the rest is the decode loop.
        extra.update(prefill_median_s=round(prefill_med, 4),
                     decode_tokens_per_s=round(new / (med - prefill_med), 2),
                     decode_steps_per_s=round((new - 1) / (med - prefill_med), 2))
    report("decode", dtype, med, lo, hi, n, **extra)


def score_naive(model, ctx, prompt, cands):
    """One batch of 20 x (prompt + candidate), right-padded; sum of the candidates' log-probs."""
    ids, mask = pad_candidates(cands)
    n, p = ids.shape[0], prompt.shape[1]
    full = torch.cat([prompt.expand(n, -1), ids], dim=1)
    att = torch.cat([torch.ones((n, p), dtype=torch.long), mask], dim=1)
    with torch.inference_mode(), ctx():
        logits = model(input_ids=full, attention_mask=att, use_cache=False).logits  # [20, P+K, V]
        # Candidate token j (at position p+j) is predicted by the logits at position p+j-1. Slicing
        # before log_softmax only saves the softmax over prompt positions; the model has already
        # computed all of them (that is the naive cost).
        lp = torch.log_softmax(logits[:, p - 1:p - 1 + ids.shape[1]].float(), dim=-1)
        tok_lp = lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (tok_lp * mask).sum(dim=1)


def score_prefix_cache(model, ctx, prompt, cands):
    """The prompt once (KV cache), the cache repeated to batch 20, the candidates as one batch."""
    ids, mask = pad_candidates(cands)
    n, p = ids.shape[0], prompt.shape[1]
    with torch.inference_mode(), ctx():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.2x
        cache.batch_repeat_interleave(n)  # DynamicCache: every layer's keys/values repeated to batch n
        # The mask covers prefix + candidates; with right padding the positions (taken from the
        # cache length, p..p+K-1) are right for every real token.
        att = torch.cat([torch.ones((n, p), dtype=torch.long), mask], dim=1)
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns).
        cache_kw = "cache" if accepts(model, "cache") else "past_key_values"
        logits = model(input_ids=ids, attention_mask=att, use_cache=True, **{cache_kw: cache}).logits
        # Token 0 of each candidate comes from the prompt's last logits, token j from candidate pos j-1.
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).expand(n, -1).gather(1, ids[:, :1])
        rest = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        return (torch.cat([first, rest], dim=1) * mask).sum(dim=1)


def measure_score(model, ctx, dtype, prompt, cands, ref_f32, prefill_full_s, args):
    n_tok = sum(len(c) for c in cands)
    # The naive batch is 20 prompts long: about 20 x (P + K) / P times one full-logits prefill.
    k = max(len(c) for c in cands)
    naive_est = prefill_full_s * len(cands) * (prompt.shape[1] + k) / prompt.shape[1]
    sums = {}
    for name, fn, est in [("score_naive", score_naive, naive_est), ("score_prefix_cache", score_prefix_cache, None)]:
        if est is not None and args.max_run_s and est > args.max_run_s:
            skip = dict(name=name, dtype=dtype, skipped=f"one run estimated at {est:.0f} s > --max-run-s {args.max_run_s:g}",
                        estimated_s=round(est, 1))
            print(json.dumps(skip), flush=True)
            continue
        med, lo, hi, n, s = timed(lambda: fn(model, ctx, prompt, cands), 1, args.score_iters, args.measure_s, est)
        sums[name] = s
        extra = dict(candidates=len(cands), prompt=prompt.shape[1], candidate_tokens=n_tok,
                     candidates_per_s=round(len(cands) / med, 2))
        if est is not None:
            extra["estimated_s"] = round(est, 2)
        if dtype != "f32" and name in ref_f32:
            extra["max_abs_diff_vs_f32"] = round((s - ref_f32[name]).abs().max().item(), 4)
        report(name, dtype, med, lo, hi, n, **extra)
    if len(sums) < 2:
        return sums
    a, b = sums["score_naive"], sums["score_prefix_cache"]
    diff = (a - b).abs().max().item()
    # f32 must agree to 1e-3; bf16 rounds differently for different batch shapes, so there only the
    # difference and whether both pick the same best candidate are recorded.
    check = dict(name="score_check", dtype=dtype, max_abs_diff=round(diff, 6),
                 same_argmax=bool(a.argmax() == b.argmax()),
                 naive_sums=[round(v, 3) for v in a.tolist()])
    if dtype == "f32":
        check.update(tolerance=1e-3, ok=diff <= 1e-3)
    print(json.dumps(check), flush=True)
    return sums


# --------------------------------------------------------------------------------------------- main

def parse_list(value, allowed, what):
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return items


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=default_model_dir(), help="Hugging Face model directory (default: %(default)s)")
    ap.add_argument("--random-init", action="store_true",
                    help="SmolLM2-135M architecture from LlamaConfig with random weights (no model dir needed)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: %(default)s)")
    ap.add_argument("--iters", type=int, default=5, help="timed prefill iterations (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed prefill warm-up runs (default: %(default)s)")
    ap.add_argument("--decode-iters", type=int, default=3, help="timed generate runs, after 1 warm-up (default: %(default)s)")
    ap.add_argument("--score-iters", type=int, default=3, help="timed runs of each scoring way, after 1 warm-up (default: %(default)s)")
    ap.add_argument("--measure-s", type=float, default=8.0,
                    help="stop timing one measurement once its timed runs add up to this (at least 1 run; "
                         "0 = always all iterations) (default: %(default)s)")
    ap.add_argument("--max-run-s", type=float, default=60.0,
                    help="skip naive scoring when one run is estimated (from the prefill) to take longer "
                         "(bf16 without bf16 hardware); 0 = never skip (default: %(default)s)")
    ap.add_argument("--only", default=",".join(MEASUREMENTS),
                    type=lambda v: parse_list(v, MEASUREMENTS, "measurement"), help="subset of %(default)s")
    ap.add_argument("--dtypes", default=",".join(DTYPES),
                    type=lambda v: parse_list(v, DTYPES, "dtype"), help="subset of %(default)s")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # keep stderr for the summary table
    transformers.logging.disable_progress_bar()

    print(json.dumps(dict(
        env="hf-cpu-anchor", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(), cpu=cpu_model_name(), cpu_flags=cpu_flags(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        mkldnn_bf16_supported=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        loadavg_1m=round(os.getloadavg()[0], 2),
        model="random-init" if args.random_init else args.model, attn="sdpa",
        prompt_tokens=PROMPT_LEN)), flush=True)

    model = load_model(args)
    tok = load_tokenizer(args)
    vocab = model.config.vocab_size
    prompt = build_prompt(tok, vocab)
    cands = build_candidates(tok, vocab)
    assert prompt.shape == (1, PROMPT_LEN)

    ref_f32 = {}
    for dtype in args.dtypes:
        m, ctx = precision(model, dtype)
        if "prefill" in args.only:
            prefill = measure_prefill(m, ctx, dtype, prompt, args)
        else:
            # decode needs the prefill time, score an estimate of the naive batch: one quick run each.
            prefill = {name: quick_prefill(m, ctx, prompt, kw)
                       for name, kw in [("prefill", {}), ("prefill_logits_to_keep_1", {"logits_to_keep": 1})]
                       if not kw or accepts(m, "logits_to_keep")}
        if "decode" in args.only:
            pm = prefill.get("prefill_logits_to_keep_1", prefill["prefill"])
            measure_decode(m, ctx, dtype, prompt, pm, args)
        if "score" in args.only:
            sums = measure_score(m, ctx, dtype, prompt, cands, ref_f32, prefill["prefill"], args)
            if dtype == "f32":
                ref_f32 = sums
        if m is not model:
            del m

    elapsed = time.perf_counter() - t_start
    print(json.dumps(dict(done=True, elapsed_s=round(elapsed, 1), loadavg_1m=round(os.getloadavg()[0], 2))),
          flush=True)

    # Summary on stderr, so stdout stays pure JSON lines.
    rows = ["| what | dtype | median s | min s | max s | rate |", "|---|---|---|---|---|---|"]
    for r in RESULTS:
        if "tokens_per_s" in r:
            rate = f"{r['tokens_per_s']} tok/s"
        elif "decode_tokens_per_s" in r:
            rate = f"{r['decode_tokens_per_s']} decode tok/s, {r['new_tokens_per_s']} new tok/s"
        elif "new_tokens_per_s" in r:
            rate = f"{r['new_tokens_per_s']} new tok/s"
        else:
            rate = f"{r['candidates_per_s']} cand/s"
        rows.append(f"| {r['name']} | {r['dtype']} | {r['median_s']} | {r['min_s']} | {r['max_s']} | {rate} |")
    print("\n" + "\n".join(rows) + f"\n\n{torch.get_num_threads()} threads, total {elapsed:.0f} s\n",
          file=sys.stderr)


if __name__ == "__main__":
    main()
