//! Speed of the LLM engine, in the shapes the issue's targets name, to set beside
//! `scripts/hf-cpu-anchor.py` (CPU) and `../shared/bench/hf_anchor.py` (GPU) run on the same
//! machine:
//!
//! - `prefill`: one forward of 1 x 384 tokens, logits at the last position only;
//! - `decode`: 16 greedy tokens after a 384-token prompt (KV cache), new tokens per second;
//! - `score`: log-likelihood of 20 candidate titles after a 384-token prompt (prompt once,
//!   candidates batched over the cached prefix);
//! - `forward64` (GPU): 64 x 384 tokens forward, log-probs of the last 16 positions;
//! - `train16` (GPU): a full fine-tuning step at 16 x 384, bf16 autocast, AdamW, cross-entropy
//!   on the last 16 positions.
//!
//! ```text
//! cargo bench -p rsllm-llm --bench llm_bench -- [--iters 5] [--dtypes f32,bf16]
//!     [--only prefill,decode,score,forward64,train16] [--device auto|cpu|cuda]
//!     [--model PATH | --random-init] [--fusion off|frozen|all] [--json-out FILE]
//! ```
//! Each measurement is the median of `--iters` timed runs after one or two warm-up runs, with
//! min and max beside it; one JSON line per measurement on stdout, a markdown table on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use rsllm_llm::{
    Fusion, GenerateOptions, Llama, LlamaConfig, Sampling, generate, score_continuations,
};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

const PROMPT_TOKENS: usize = 384;
const TITLES: [&str; 20] = [
    " Fargo (1996)",
    " Scream (1996)",
    " Titanic (1997)",
    " Star Wars (1977)",
    " Contact (1997)",
    " English Patient, The (1996)",
    " Liar Liar (1997)",
    " Air Force One (1997)",
    " Return of the Jedi (1983)",
    " Toy Story (1995)",
    " Independence Day (ID4) (1996)",
    " Mission: Impossible (1996)",
    " Rock, The (1996)",
    " Godfather, The (1972)",
    " Pulp Fiction (1994)",
    " Twelve Monkeys (1995)",
    " Raiders of the Lost Ark (1981)",
    " Silence of the Lambs, The (1991)",
    " Jerry Maguire (1996)",
    " Conspiracy Theory (1997)",
];

#[derive(Debug)]
struct Args {
    iters: usize,
    dtypes: Vec<String>,
    only: Vec<String>,
    device: Device,
    model: Option<PathBuf>,
    random_init: bool,
    json_out: Option<PathBuf>,
    /// None: the device's default.
    fusion: Option<Fusion>,
}

fn parse_args() -> Args {
    let mut args = Args {
        iters: 5,
        dtypes: vec!["f32".into(), "bf16".into()],
        only: Vec::new(),
        device: Device::cuda_if_available(),
        model: None,
        random_init: false,
        json_out: None,
        fusion: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let list = |v: String| v.split(',').map(str::to_owned).collect::<Vec<_>>();
        match a.as_str() {
            "--iters" => args.iters = it.next().unwrap().parse().unwrap(),
            "--dtypes" => args.dtypes = list(it.next().unwrap()),
            "--only" => args.only = list(it.next().unwrap()),
            "--device" => {
                args.device = match it.next().unwrap().as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    _ => Device::cuda_if_available(),
                }
            }
            "--model" => args.model = Some(PathBuf::from(it.next().unwrap())),
            "--random-init" => args.random_init = true,
            "--json-out" => args.json_out = Some(PathBuf::from(it.next().unwrap())),
            "--fusion" => {
                args.fusion = Some(match it.next().unwrap().as_str() {
                    "off" => Fusion::Off,
                    "frozen" => Fusion::Frozen,
                    "all" => Fusion::All,
                    other => panic!("--fusion {other}: expected off, frozen or all"),
                })
            }
            // `cargo bench` passes --bench.
            _ => {}
        }
    }
    if args.only.is_empty() {
        args.only = if args.device.is_cuda() {
            vec!["prefill", "decode", "score", "forward64", "train16"]
        } else {
            vec!["prefill", "decode", "score"]
        }
        .into_iter()
        .map(str::to_owned)
        .collect();
    }
    args
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median, min and max seconds of `iters` runs of `f` after `warm` untimed ones.
fn timed(device: Device, warm: usize, iters: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..warm {
        f();
    }
    sync(device);
    let mut times: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            sync(device);
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0], times[times.len() - 1])
}

struct Engine {
    vs: nn::VarStore,
    model: Llama,
    tokenizer: Option<rsllm_llm::LlmTokenizer>,
}

fn build(args: &Args, kind: Kind) -> Engine {
    if args.random_init {
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(args.device);
        let mut model = Llama::new(&vs.root(), &LlamaConfig::smollm2_135m()).unwrap();
        tch::no_grad(|| {
            for (_, mut var) in vs.variables() {
                let _ = var.normal_(0.0, 0.02);
            }
        });
        if kind != Kind::Float {
            vs.set_kind(kind);
            model.fuse_projections().unwrap();
        }
        if let Some(fusion) = args.fusion {
            model.set_fusion(fusion);
        }
        return Engine {
            vs,
            model,
            tokenizer: None,
        };
    }
    let path = args
        .model
        .clone()
        .or_else(rsllm_llm::default_model_path)
        .unwrap();
    let mut loaded = rsllm_llm::load(&path, args.device, kind).unwrap();
    if let Some(fusion) = args.fusion {
        loaded.model.set_fusion(fusion);
    }
    Engine {
        vs: loaded.vs,
        model: loaded.model,
        tokenizer: Some(loaded.tokenizer),
    }
}

/// The 384-token prompt: a LLaRA-style MovieLens prompt (real tokens when a tokenizer is
/// loaded, seeded random ids otherwise) and the 20 candidate continuations.
fn workload(engine: &Engine) -> (Vec<u32>, Vec<Vec<u32>>) {
    match &engine.tokenizer {
        Some(tok) => {
            let mut text = String::from("This user has watched");
            let mut ids = Vec::new();
            let mut i = 0;
            while ids.len() < PROMPT_TOKENS {
                text.push_str(TITLES[i % TITLES.len()]);
                text.push(',');
                i += 1;
                ids = tok
                    .encode(&format!(
                        "{text} in the previous. Please predict the next movie this user will \
                         watch. Choose the answer from the following 20 movie titles: Answer:"
                    ))
                    .unwrap();
            }
            ids.truncate(PROMPT_TOKENS);
            let candidates = TITLES.iter().map(|t| tok.encode(t).unwrap()).collect();
            (ids, candidates)
        }
        None => {
            let ids =
                Tensor::randint_low(3, 49152, [PROMPT_TOKENS as i64], (Kind::Int64, Device::Cpu));
            let ids: Vec<i64> = Vec::try_from(ids).unwrap();
            let candidates = (0..20)
                .map(|i| (0..(4 + i % 5)).map(|j| 100 + (i * 7 + j) as u32).collect())
                .collect();
            (ids.into_iter().map(|x| x as u32).collect(), candidates)
        }
    }
}

fn report(rows: &mut Vec<serde_json::Value>, row: serde_json::Value) {
    println!("{row}");
    rows.push(row);
}

fn main() {
    let args = parse_args();
    let threads = tch::get_num_threads();
    eprintln!(
        "llm_bench: device {:?}, {} intra-op threads, dtypes {:?}, measurements {:?}",
        args.device, threads, args.dtypes, args.only
    );
    let mut rows = Vec::new();
    report(
        &mut rows,
        serde_json::json!({"env": {
            "device": format!("{:?}", args.device),
            "threads": threads,
            "random_init": args.random_init,
            "iters": args.iters,
        }}),
    );
    for dtype in &args.dtypes {
        let kind = if dtype == "bf16" {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let engine = build(&args, kind);
        let (prompt, candidates) = workload(&engine);
        let model = &engine.model;
        let device = args.device;
        let _guard = tch::no_grad_guard();
        let ids: Vec<i64> = prompt.iter().map(|&i| i64::from(i)).collect();
        let prompt_t = Tensor::from_slice(&ids).view([1, -1]).to_device(device);

        if args.only.iter().any(|o| o == "prefill") {
            let (med, lo, hi) = timed(device, 2, args.iters, || {
                let hidden = model.forward_ids(&prompt_t, None).unwrap();
                let _ = model.last_logits(&hidden).unwrap();
            });
            report(
                &mut rows,
                serde_json::json!({"name": "prefill", "dtype": dtype, "batch": 1, "seq": PROMPT_TOKENS,
                    "median_s": med, "min_s": lo, "max_s": hi,
                    "tokens_per_s": PROMPT_TOKENS as f64 / med}),
            );
        }
        if args.only.iter().any(|o| o == "decode") {
            let new_tokens = 16;
            let options = GenerateOptions {
                max_new_tokens: new_tokens,
                sampling: Sampling::Greedy,
                stop_on_eos: false,
                ..GenerateOptions::default()
            };
            // Whole generate calls need the tokenizer (stop rules, text); --random-init has none.
            if let Some(tokenizer) = &engine.tokenizer {
                let (med, lo, hi) = timed(device, 1, args.iters.min(3), || {
                    let g = generate(model, tokenizer, std::slice::from_ref(&prompt), &options)
                        .unwrap();
                    assert_eq!(g[0].token_ids.len(), new_tokens);
                });
                report(
                    &mut rows,
                    serde_json::json!({"name": "generate16", "dtype": dtype, "batch": 1, "prompt": PROMPT_TOKENS,
                    "new_tokens": new_tokens, "median_s": med, "min_s": lo, "max_s": hi,
                    "new_tokens_per_s": new_tokens as f64 / med}),
                );
            }
            // Decode alone: the 16 single-token steps after a prefill, timed without it.
            let step_ids = Tensor::from_slice(&[42i64]).view([1, 1]).to_device(device);
            let mut per_step = Vec::new();
            for _ in 0..args.iters.min(3) {
                let mut cache = rsllm_llm::KvCache::new(model.config.num_hidden_layers);
                let _ = model.forward_ids(&prompt_t, Some(&mut cache)).unwrap();
                sync(device);
                let start = Instant::now();
                for _ in 0..new_tokens {
                    let h = model.forward_ids(&step_ids, Some(&mut cache)).unwrap();
                    let _ = model.last_logits(&h).unwrap().argmax(-1, false);
                }
                sync(device);
                per_step.push(start.elapsed().as_secs_f64() / new_tokens as f64);
            }
            per_step.sort_by(f64::total_cmp);
            let med = per_step[per_step.len() / 2];
            report(
                &mut rows,
                serde_json::json!({"name": "decode_step", "dtype": dtype, "batch": 1, "cache": PROMPT_TOKENS,
                    "median_s": med, "min_s": per_step[0], "max_s": per_step[per_step.len() - 1],
                    "new_tokens_per_s": 1.0 / med}),
            );
        }
        if args.only.iter().any(|o| o == "score") {
            let (med, lo, hi) = timed(device, 1, args.iters, || {
                let s = score_continuations(model, &prompt, &candidates).unwrap();
                assert_eq!(s.len(), 20);
            });
            report(
                &mut rows,
                serde_json::json!({"name": "score20", "dtype": dtype, "prompt": PROMPT_TOKENS,
                    "candidates": candidates.len(),
                    "candidate_tokens": candidates.iter().map(Vec::len).sum::<usize>(),
                    "median_s": med, "min_s": lo, "max_s": hi}),
            );
        }
        if args.only.iter().any(|o| o == "forward64") {
            let b = 64;
            let x = Tensor::randint_low(3, 49152, [b, PROMPT_TOKENS as i64], (Kind::Int64, device));
            let (med, lo, hi) = timed(device, 2, args.iters, || {
                let hidden = model.forward_ids(&x, None).unwrap();
                let tail = hidden.narrow(1, PROMPT_TOKENS as i64 - 17, 16);
                let logp = model.head(&tail).unwrap().log_softmax(-1, Kind::Float);
                let targets = x.narrow(1, PROMPT_TOKENS as i64 - 16, 16).unsqueeze(-1);
                let _ = logp.gather(-1, &targets, false).sum(Kind::Float);
            });
            report(
                &mut rows,
                serde_json::json!({"name": "forward64_score_last16", "dtype": dtype, "batch": b,
                    "seq": PROMPT_TOKENS, "median_s": med, "min_s": lo, "max_s": hi,
                    "tokens_per_s": (b as f64) * PROMPT_TOKENS as f64 / med}),
            );
        }
        drop(_guard);
        if args.only.iter().any(|o| o == "train16") && dtype == "f32" {
            train_step(&args, engine, &mut rows);
        }
    }
    eprintln!("\n| measurement | dtype | median s | min s | max s | throughput |");
    eprintln!("|---|---|---|---|---|---|");
    for row in rows.iter().skip(1) {
        let throughput = row
            .get("tokens_per_s")
            .map(|t| format!("{:.0} tokens/s", t.as_f64().unwrap_or(0.0)))
            .or_else(|| {
                row.get("new_tokens_per_s")
                    .map(|t| format!("{:.1} new tokens/s", t.as_f64().unwrap_or(0.0)))
            })
            .unwrap_or_default();
        eprintln!(
            "| {} | {} | {:.4} | {:.4} | {:.4} | {} |",
            row["name"].as_str().unwrap_or(""),
            row["dtype"].as_str().unwrap_or(""),
            row["median_s"].as_f64().unwrap_or(0.0),
            row["min_s"].as_f64().unwrap_or(0.0),
            row["max_s"].as_f64().unwrap_or(0.0),
            throughput
        );
    }
    if let Some(path) = &args.json_out {
        let json = serde_json::to_string_pretty(&rows).unwrap();
        rsllm_core::artefact::write_atomic(path, json.as_bytes())
            .unwrap_or_else(|e| panic!("--json-out {}: {e}", path.display()));
    }
}

/// Full fine-tuning step: f32 master weights, bf16 autocast, AdamW, loss on the last 16
/// positions of 16 x 384 random sequences.
fn train_step(args: &Args, engine: Engine, rows: &mut Vec<serde_json::Value>) {
    let Engine { mut vs, model, .. } = engine;
    vs.unfreeze();
    let device = args.device;
    let mut opt = nn::AdamW::default().build(&vs, 1e-4).unwrap();
    let (b, t, tail) = (16i64, PROMPT_TOKENS as i64, 16i64);
    let x = Tensor::randint_low(3, 49152, [b, t], (Kind::Int64, device));
    let targets = x.narrow(1, t - tail, tail).reshape([-1]);
    let (med, lo, hi) = timed(device, 2, args.iters, || {
        let loss = rsllm_llm::bf16_autocast(device, device.is_cuda(), || {
            let hidden = model.forward_ids(&x, None).unwrap();
            let logits = model.head(&hidden.narrow(1, t - tail - 1, tail)).unwrap();
            logits
                .reshape([-1, model.config.vocab_size as i64])
                .cross_entropy_for_logits(&targets)
        });
        opt.zero_grad();
        loss.backward();
        opt.step();
    });
    let row = serde_json::json!({"name": "train16_full_autocast_bf16", "dtype": "f32+autocast",
        "batch": b, "seq": t, "median_s": med, "min_s": lo, "max_s": hi,
        "tokens_per_s": (b * t) as f64 / med});
    report(rows, row);
}
