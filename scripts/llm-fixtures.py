#!/usr/bin/env python3
"""Regenerate the reference fixtures for the default LLM with Hugging Face transformers.

What it makes
-------------
`shared/llm/tests/fixtures/smollm2-135m-instruct-q4_1.hf.json`: what transformers (the reference
implementation) says about SmolLM2-135M-Instruct.Q4_1.gguf, for the Rust `llm` crate's parity tests:

  config          model hyper-parameters as transformers reads them from the GGUF metadata
  special_tokens  [text, id] of bos / eos / pad / unk
  tokenize        text -> ids / tokens, no special tokens added (special-token *text* in the input
                  is still matched as one token, as in llama.cpp)
  decode          ids -> text, special tokens kept, incl. a lone byte of a multi-byte character
  score           log-probabilities of a continuation given a prompt (rule below)
  greedy          8 greedy tokens from model.generate (KV cache, float32)
  last_logits     top-10 logits at the last position, to debug parity when the above drift

How the model is loaded: `from_pretrained(dir, gguf_file=name, dtype=torch.float32)` (`dtype` is
transformers 5's name for the deprecated `torch_dtype`). transformers dequantises every GGUF tensor
(Q4_1 / Q8_0 / F32) to float32 and undoes llama.cpp's q/k row permutation, so this is "the
quantised weights, computed exactly in f32", on CPU.

Tokenizer caveat: the GGUF declares `tokenizer.ggml.pre = "smollm"` (llama.cpp: split every digit
on its own, then the GPT-2 regex), but transformers has no entry for "smollm" and falls back to a
plain byte-level pre-tokenizer. The vocabulary has no multi-digit tokens, so numbers come out the
same, but the whitespace next to them does not ("Racer  4", " ½"). This script builds the declared
tokenizer too (Digits(individual_digits=True) + ByteLevel), uses it for everything, and records
where transformers' as-loaded one differs; see the "tokenizer_note" it writes.

Scoring rule
------------
prompt_ids = tokenize(prompt), continuation_ids = tokenize(continuation), each separately and with
no special tokens added; the model runs once on prompt_ids + continuation_ids, and

    token_logprobs[i] = log_softmax(logits[len(prompt_ids) + i - 1])[continuation_ids[i]]

where the logits are the model's float32 output, cast to float64 before log_softmax (so the only
f32 rounding is in the forward pass). sum_logprob / mean_logprob are over the continuation tokens.

How to run
----------
    ~/.cache/rsllm/py/bin/pip install 'transformers>=5' gguf accelerate
    ~/.cache/rsllm/py/bin/python scripts/llm-fixtures.py [--gguf PATH] [--out PATH] [--export-hf]

Defaults: --gguf $RSLLM_CACHE_DIR/models/llm/SmolLM2-135M-Instruct.Q4_1.gguf (cache dir defaults to
~/.cache/rsllm), --out shared/llm/tests/fixtures/smollm2-135m-instruct-q4_1.hf.json in this repo.
--export-hf also writes the model as a Hugging Face directory (config.json, model.safetensors,
tokenizer.json with the declared pre-tokenizer, ...) to
$RSLLM_CACHE_DIR/models/llm/SmolLM2-135M-Instruct-hf/. Nothing is downloaded: everything comes from
the GGUF file. Runs on CPU with 2 threads in about a minute.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

# Everything comes from the local GGUF: keep huggingface_hub off the network. It reads this at
# import time, so it is set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RSLLM_CACHE_DIR") or Path.home() / ".cache" / "rsllm")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file scripts/setup.sh installs; a different file still works but is reported.
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = REPO / "shared/llm/tests/fixtures/smollm2-135m-instruct-q4_1.hf.json"
HF_EXPORT_NAME = "SmolLM2-135M-Instruct-hf"
RAW_TOKENIZER_DUMP = Path("/tmp/smollm2-gguf-tokenizer.json")
MAX_NEW_TOKENS = 8

CHAT_MESSAGES = [{"role": "user", "content": "Recommend a movie."}]
LLARA_PROMPT = (
    "This user has watched Toy Story (1995), Heat (1995), Casino (1995), Twelve Monkeys (1995), "
    "Braveheart (1995) in the previous. Please predict the next movie this user will watch. "
    "Choose the answer from the following 20 movie titles: Fargo (1996), Scream (1996), "
    "Titanic (1997). Answer:"
)

# Tokenizer cases: each exercises a different part of byte-level BPE / pre-tokenisation.
TOKENIZE_TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Recommend me a movie for tonight, please.",
    "Toy Story (1995), Heat (1995), GoldenEye (1995)",
    "Amélie, café, naïve, Ångström",
    "Straße, Œuvre, ½ ², Ⅻ",  # non-ASCII letters and non-Nd numerics (\p{No}, \p{Nl})
    "千と千尋の神隠し",
    "你好，世界",
    "Привет, мир! Γειά σου",
    "👍🏽 🇫🇷 👨‍👩‍👧",
    "a  b   c\t\td\n\n\ne",
    "   leading and trailing   ",
    "     ",
    "\n\n\n",
    " \n \r\n\t ",
    "1995",
    " 2024-11-26 3.14159 1,000,000",
    "007",
    "١٢٣ ४५६",  # Arabic-Indic and Devanagari digits: \p{Nd} outside ASCII
    # Whitespace next to numbers is where the declared ("smollm") pre-tokenizer and transformers'
    # plain ByteLevel one disagree (see declared_tokenizer); these pin that down.
    "Moto Racer  4",
    "kill  20-30 minutes",
    "line\n\n1995\t\t2024",
    "I rate this game ⑨/10",
    "I'm, you're, it's, they'll, we'd, can't, I've",
    "DON'T SHOUT'S",
    'fn main() { println!("hi"); }',
    "https://movielens.org/movies/1?ref=home&x=%20y",
    "<|im_start|>user\nWhat should I watch next?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more <|endoftext|> tail",
    "<|im_start",  # an incomplete marker is plain text
    LLARA_PROMPT,
    # The rendered chat template is appended at run time (needs the tokenizer).
]

SCORE_CASES = [
    (LLARA_PROMPT, " Fargo (1996)"),
    (LLARA_PROMPT, " Titanic (1997)"),
    ("<chat>", "Toy Story (1995)"),  # "<chat>" = the rendered chat template prompt
    ("The capital of France is", " Paris"),
    ("The capital of France is", " London"),
    ("My favourite film is", " Amélie (2001) 🎬"),
    ("Count: 1, 2, 3,", " 4, 5"),
]

GREEDY_PROMPTS = ["The capital of France is", "<chat>", LLARA_PROMPT]
LAST_LOGITS_PROMPTS = ["The capital of France is", "<chat>"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=CACHE / "models/llm" / GGUF_NAME)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--export-hf",
        action="store_true",
        help=f"also save the model as an HF directory in {CACHE / 'models/llm' / HF_EXPORT_NAME}",
    )
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32(x) -> float:
    """A float32 as the shortest decimal that reads back to the same float32 (compact, exact)."""
    return float(str(np.float32(x)))  # numpy 2: str() is the shortest round-trip form


def declared_tokenizer(tok):
    """A copy of the transformers GGUF tokenizer with the pre-tokenizer the file declares.

    `tokenizer.ggml.pre = "smollm"`: llama.cpp splits on `\\p{N}` (each digit alone) and then applies
    the GPT-2 regex; SmolLM2's published tokenizer.json says the same as
    Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
    """
    fixed = copy.deepcopy(tok)
    fixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return fixed


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def describe_backend(tok) -> dict:
    """The parts of tokenizer.json needed to rebuild the tokenizer with the Rust `tokenizers` crate."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = {k: v for k, v in spec["model"].items() if k not in ("vocab", "merges")}
    model["vocab_size"] = len(spec["model"]["vocab"])
    model["merges"] = len(spec["model"]["merges"])
    return {
        "normalizer": spec["normalizer"],
        "pre_tokenizer": spec["pre_tokenizer"],
        "post_processor": spec["post_processor"],
        "decoder": spec["decoder"],
        "model": model,
        "added_tokens": spec["added_tokens"],
    }


def gguf_token_types(path: Path) -> dict:
    """llama.cpp token types (1 normal, 3 control, 4 user-defined, 6 byte): distribution and odd ids."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types = list(reader.fields["tokenizer.ggml.token_type"].contents())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    counts = {str(t): types.count(t) for t in sorted(set(types))}
    special = [[i, int(t), tokens[i]] for i, t in enumerate(types) if t != 1]
    return {
        "counts": counts,
        "non_normal": special,
        "pre": reader.fields["tokenizer.ggml.pre"].contents(),
    }


def model_config(config) -> dict:
    rope_theta = getattr(config, "rope_theta", None)
    if rope_theta is None:  # transformers 5 keeps it in rope_parameters
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
        "max_position_embeddings", "bos_token_id", "eos_token_id",
    ]
    out = {k: getattr(config, k, None) for k in keys}
    out["rope_theta"] = rope_theta
    out["head_dim"] = getattr(config, "head_dim", None)
    out["rope_parameters"] = getattr(config, "rope_parameters", None)
    return out


@torch.inference_mode()
def logits_for(model, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] for one sequence, no cache."""
    out = model(input_ids=torch.tensor([ids]), use_cache=False)
    assert out.logits.dtype == torch.float32
    return out.logits[0]


def score_case(model, tok, prompt: str, continuation: str) -> dict:
    prompt_ids, cont_ids = encode(tok, prompt), encode(tok, continuation)
    assert prompt_ids and cont_ids, "the scoring rule needs a non-empty prompt and continuation"
    logits = logits_for(model, prompt_ids + cont_ids)
    # float64 log_softmax of the float32 logits: see the scoring rule in the module docstring.
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    n = len(prompt_ids)
    token_logprobs = [float(logprobs[n + i - 1, t]) for i, t in enumerate(cont_ids)]
    return {
        "prompt": prompt,
        "continuation": continuation,
        "prompt_ids": prompt_ids,
        "continuation_ids": cont_ids,
        "token_logprobs": token_logprobs,
        "sum_logprob": math.fsum(token_logprobs),
        "mean_logprob": math.fsum(token_logprobs) / len(token_logprobs),
    }


@torch.inference_mode()
def greedy_case(model, tok, prompt: str, eos_id: int, pad_id: int) -> dict:
    prompt_ids = encode(tok, prompt)
    input_ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        pad_token_id=pad_id,
        use_cache=True,  # the KV-cache path, which is what an incremental decoder must match
    )
    new_ids = out[0, len(prompt_ids):].tolist()
    # Cross-check against a cache-free argmax loop; it also gives all 8 tokens if EOS stopped
    # generate early, so the fixture always has MAX_NEW_TOKENS ids.
    ids = list(prompt_ids)
    for _ in range(MAX_NEW_TOKENS):
        ids.append(int(logits_for(model, ids)[-1].argmax()))
    manual = ids[len(prompt_ids):]
    assert manual[: len(new_ids)] == new_ids, f"generate {new_ids} != no-cache argmax {manual}"
    stopped_early = len(new_ids) < MAX_NEW_TOKENS
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "new_ids": manual,
        "text": tok.decode(manual, skip_special_tokens=False),
        "eos_in_new_ids": eos_id in manual,
        "generate_stopped_at_eos": stopped_early,
        "generate_new_ids": new_ids,
    }


def last_logits_case(model, tok, prompt: str) -> dict:
    ids = encode(tok, prompt)
    top = torch.topk(logits_for(model, ids)[-1], 10)
    return {
        "prompt": prompt,
        "prompt_ids": ids,
        "top10_ids": top.indices.tolist(),
        "top10_logits": [f32(x) for x in top.values.tolist()],
    }


def decode_cases(tok, chat_prompt: str) -> list[dict]:
    emoji_ids = encode(tok, "👍🏽 🇫🇷 👨‍👩‍👧")
    id_lists = [
        encode(tok, "Hello, world!"),
        encode(tok, "Amélie, café, naïve, Ångström"),
        encode(tok, "千と千尋の神隠し"),
        emoji_ids,
        emoji_ids[:1],  # a lone byte token of a multi-byte character: invalid UTF-8 -> U+FFFD
        encode(tok, "   leading and trailing   "),
        encode(tok, chat_prompt),  # special tokens kept in the text
        [1, 4093, 198, 2, 0],  # <|im_start|>user\n<|im_end|><|endoftext|>
        [],
    ]
    return [{"ids": ids, "text": tok.decode(ids, skip_special_tokens=False)} for ids in id_lists]


def tokenizer_note(differing: list[str]) -> str:
    head = (
        "transformers builds the GGUF tokenizer with a plain ByteLevel(use_regex=true) pre-tokenizer, because it "
        "has no entry for the file's tokenizer.ggml.pre='smollm'. The file (llama.cpp: regexes ['\\p{N}', GPT-2]) "
        "and SmolLM2's published tokenizer.json declare Sequence[Digits(individual_digits=true), ByteLevel("
        "add_prefix_space=false, trim_offsets=true, use_regex=true)]: every numeric char is its own pre-token. "
    )
    if not differing:
        return head + "On every text here both give the same ids, so 'ids' is both."
    return head + (
        "The vocabulary has no token that joins a numeric char to anything, so plain numbers tokenize the same; "
        "the two differ only in the whitespace next to numerics: GPT-2's ' ?\\p{N}+' glues one space to the "
        "number (splitting a run like '  4' into 'Ġ','Ġ','4' instead of 'ĠĠ','4', and giving ' ½' as 'ĠÂ','½' "
        f"instead of 'Ġ','Â½'). {len(differing)} tokenize texts differ; there 'ids'/'tokens' are the declared "
        "tokenizer's and 'ids_transformers_gguf_default' is transformers' as-loaded output. Every other section "
        "(decode, score, greedy, last_logits) and the exported HF tokenizer.json use the declared tokenizer."
    )


def dump(obj, indent: int = 0) -> str:
    """JSON with objects one key per line but lists of scalars on one line: readable, small diffs."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in obj) + "]"
        return "[\n" + ",\n".join(inner + dump(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def export_hf(model, tok, dest: Path) -> None:
    """Save a plain HF directory (safetensors) so the Rust side can test loading one.

    The model is already plain float32 nn.Linear weights (the GGUF was dequantised at load), but it
    still carries the GGUF "quantizer" and a quantization_config, and save_pretrained refuses a
    non-serialisable quantizer. Dropping both (on a shallow copy of the config) gives an ordinary
    float32 Llama checkpoint, which is what it is.
    """
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(type(m).__name__ != "GgufLinear" for m in model.modules()), "weights still packed"
    dest.mkdir(parents=True, exist_ok=True)
    quantizer, config = model.hf_quantizer, model.config
    model.hf_quantizer = None
    model.config = copy.copy(config)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(dest)  # safetensors; the tied lm_head is not stored twice
    finally:
        model.hf_quantizer, model.config = quantizer, config
    tok.save_pretrained(dest)

    # The directory must load back as the same model: compare last-position logits on one prompt.
    ids = encode(tok, "The capital of France is")
    reloaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32).eval()
    diff = (logits_for(reloaded, ids) - logits_for(model, ids)).abs().max().item()
    assert diff == 0.0, f"re-loaded HF export differs from the GGUF model by {diff}"
    assert encode(AutoTokenizer.from_pretrained(dest), LLARA_PROMPT) == encode(tok, LLARA_PROMPT)
    print(f"[llm-fixtures] exported HF directory to {dest} (re-load checked)", file=sys.stderr)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # a small model on a small machine: keep it light
    torch.manual_seed(0)  # nothing here samples, but keep any accidental randomness fixed
    started = time.time()

    gguf = args.gguf.expanduser().resolve()
    digest = sha256_of(gguf)
    if digest != EXPECTED_SHA256:
        print(f"[llm-fixtures] warning: {gguf} sha256 {digest} is not the default model's", file=sys.stderr)

    tok_default = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    RAW_TOKENIZER_DUMP.write_text(tok_default.backend_tokenizer.to_str(pretty=True))
    tok = declared_tokenizer(tok_default)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()  # no dropout
    assert next(model.parameters()).dtype == torch.float32

    chat_prompt = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    resolve = lambda p: chat_prompt if p == "<chat>" else p  # noqa: E731

    tokenize, differing = [], []
    for text in TOKENIZE_TEXTS + [chat_prompt]:
        ids, ids_default = encode(tok, text), encode(tok_default, text)
        case = {"text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}
        if ids != ids_default:
            differing.append(text)
            case["ids_transformers_gguf_default"] = ids_default
            case["tokens_transformers_gguf_default"] = tok_default.convert_ids_to_tokens(ids_default)
        tokenize.append(case)

    eos_id, pad_id = tok.eos_token_id, tok.pad_token_id
    fixture = {
        "generated_by": "scripts/llm-fixtures.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf_file": gguf.name,
        "gguf_sha256": digest,
        "config": model_config(model.config),
        "special_tokens": {
            name: [getattr(tok, f"{name}_token"), getattr(tok, f"{name}_token_id")]
            for name in ("bos", "eos", "pad", "unk")
        },
        "tokenizer_note": tokenizer_note(differing),
        "scoring_rule": (
            "prompt_ids and continuation_ids tokenized separately without special tokens; one forward pass on "
            "prompt_ids+continuation_ids in float32; token_logprobs[i] = log_softmax(float64(logits[len(prompt_ids)"
            "+i-1]))[continuation_ids[i]]"
        ),
        "greedy_note": (
            f"model.generate(do_sample=False, max_new_tokens={MAX_NEW_TOKENS}, use_cache=True), float32, "
            "cross-checked against a cache-free argmax loop; new_ids always has "
            f"{MAX_NEW_TOKENS} ids (argmax continued past EOS if generate stopped there, see generate_stopped_at_eos)"
        ),
        "chat_template_prompt": chat_prompt,
        "tokenize": tokenize,
        "decode": decode_cases(tok, chat_prompt),
        "score": [score_case(model, tok, resolve(p), c) for p, c in SCORE_CASES],
        "greedy": [greedy_case(model, tok, resolve(p), eos_id, pad_id) for p in GREEDY_PROMPTS],
        "last_logits": [last_logits_case(model, tok, resolve(p)) for p in LAST_LOGITS_PROMPTS],
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(fixture) + "\n", encoding="utf-8")

    report = {
        "out": str(args.out),
        "bytes": args.out.stat().st_size,
        "seconds": round(time.time() - started, 1),
        "differing_texts": differing,
        "gguf_token_types": gguf_token_types(gguf),
        "tokenizer_as_loaded": describe_backend(tok_default),
        "raw_tokenizer_json": str(RAW_TOKENIZER_DUMP),
    }
    if args.export_hf:
        export_hf(model, tok, CACHE / "models/llm" / HF_EXPORT_NAME)
    print(json.dumps(report, ensure_ascii=False, indent=1), file=sys.stderr)


if __name__ == "__main__":
    main()
