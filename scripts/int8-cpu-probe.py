#!/usr/bin/env python3
"""Would int8 matrix products take the CPU engine under its targets without hurting the model?

The CPU targets of issue 3 (20-candidate score under 0.5 s) and issue 5 (Recommend p50 under
0.6 s) sit below this machine's f32 GEMM floor (docs/results.md). The one faster compute type
libtorch offers on an AVX2 CPU is FBGEMM's int8 (bf16 has no fast kernel here). Before wiring
it into the Rust engine (it is not exposed by tch, so it would need a C++ shim), this probe
measures both sides of the trade on the real model with PyTorch itself:

  speed     prefill of 1 x 384 tokens (logits at the last position), f32 against every body
            Linear replaced by an int8 one, median of --iters runs;
  fidelity  per-token log-probs of the same 384 tokens against f32: mean and max absolute
            difference, the summed log-prob, and how often the arg-max token agrees.

Two int8 schemes, both dynamic (activations quantised per call, as the engine would have to):
  per-tensor   torch.fbgemm_linear_int8_weight_fp32_activation (one scale per weight matrix);
  per-channel  torch.ao quantize_dynamic with per_channel_dynamic_qconfig (one scale per row).

Usage: ~/.cache/rsllm/py/bin/python scripts/int8-cpu-probe.py [--model DIR] [--iters N]
(DIR: the Hugging Face export of the set-up GGUF, `rsllm llm export`; transformers needed:
`~/.cache/rsllm/py/bin/pip install transformers`). Prints one JSON line per scheme.
"""

import argparse
import copy
import json
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def median_seconds(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def per_tensor_int8(model):
    """Every body Linear through FBGEMM's per-tensor int8 kernel (weights quantised once)."""
    for name, module in model.model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight.data
        qweight, col_offsets, scale, zero_point = torch.fbgemm_linear_quantize_weight(weight)
        packed = torch.fbgemm_pack_quantized_matrix(qweight)
        bias = module.bias.data if module.bias is not None else torch.zeros(weight.shape[0])

        def forward(x, q=qweight, p=packed, c=col_offsets, s=scale, z=zero_point, b=bias):
            return torch.fbgemm_linear_int8_weight_fp32_activation(x, q, p, c, s, z, b)

        module.forward = forward
    return model


def per_channel_int8(model):
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.model = quantize_dynamic(
        model.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
    )
    return model


def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    default_model = os.path.expanduser("~/.cache/rsllm/models/llm/SmolLM2-135M-Instruct-hf")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    # A LLaRA-like MovieLens history, repeated to 384 tokens.
    text = (
        "This user has watched Toy Story (1995), Star Wars (1977), Fargo (1996), "
        "Heat (1995), Casino (1995), Twelve Monkeys (1995), Babe (1995), "
    ) * 20
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :384]
    targets = ids[0, 1:, None]

    with torch.no_grad():
        ref_logp = base(ids).logits.log_softmax(-1)
        ref_tokens = ref_logp[0, :-1].gather(-1, targets).squeeze(-1)
        f32_s = median_seconds(lambda: base(ids, logits_to_keep=1), args.iters)
        for scheme, convert in [("per-tensor", per_tensor_int8), ("per-channel", per_channel_int8)]:
            model = convert(copy.deepcopy(base))
            logp = model(ids).logits.log_softmax(-1)
            tokens = logp[0, :-1].gather(-1, targets).squeeze(-1)
            int8_s = median_seconds(lambda: model(ids, logits_to_keep=1), args.iters)
            diff = (tokens - ref_tokens).abs()
            print(
                json.dumps(
                    {
                        "scheme": scheme,
                        "prefill_384_f32_s": round(f32_s, 4),
                        "prefill_384_int8_s": round(int8_s, 4),
                        "speedup": round(f32_s / int8_s, 2),
                        "logprob_abs_diff_mean": round(diff.mean().item(), 4),
                        "logprob_abs_diff_max": round(diff.max().item(), 4),
                        "logprob_sum_f32": round(ref_tokens.sum().item(), 2),
                        "logprob_sum_int8": round(tokens.sum().item(), 2),
                        "argmax_agreement": round(
                            (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item(), 3
                        ),
                        "threads": args.threads,
                        "torch": torch.__version__,
                    }
                )
            )


if __name__ == "__main__":
    main()
