//! Speed of the optimizer step, ours (`rsllm_trainer::AdamW`: one flat buffer per device and
//! dtype) beside libtorch's own AdamW as tch exposes it (`nn::AdamW`: a C++ loop over the
//! tensors, a dozen kernels each), on the tensor sets RSLLM trains:
//!
//! - `full`: the 272 tensors of SmolLM2-135M (a full fine-tune, 134.5M f32 values);
//! - `lora`: LLaRA's default LoRA (rank 8 on the 7 projections of the 30 blocks: 420 tensors)
//!   plus the projector (64 -> 576 -> 576);
//! - `lora-idle-projector`: the same tensors as stage 1 trains them, where text-only prompts
//!   fill no ID slot and the projector's four tensors get no gradient;
//! - `train16` (GPU by default): a whole full fine-tuning step at `--batch` x `--seq` (384 by
//!   default; bf16 autocast where native, cross-entropy on the last 16 positions), once with each
//!   optimizer (the step `llm_bench`'s `train16` times with libtorch's AdamW), and ours again
//!   with q, k, v (gate, up) as separate products (`Fusion::Off`).
//! - `train-lora`: the same step as the pipeline trains it: base frozen, LLaRA's LoRA
//!   attached (dropout active), our AdamW over the adapters, under autocast the base's bf16 copies;
//!   then without dropout, unfused, without copies. Beside `train16` at the same shape it says
//!   what the adapters cost per step (on a GPU: their extra kernel launches). Each row also
//!   gives its first step's loss: rows that compute the same step another way must agree.
//!
//! `full` and `lora` time the update alone (gradients are set once by a backward pass and
//! left in place); ours is timed for `step` and for `clip_grad_norm` + `step`, as the trainer
//! calls them.
//!
//! ```text
//! cargo bench -p rsllm-trainer --bench optim_bench -- [--device auto|cpu|cuda] [--iters 10]
//!     [--only full,lora,lora-idle-projector,train16,train-lora] [--batch 16] [--seq 384]
//!     [--no-autocast] [--json-out FILE]
//! ```
//! The training steps run under bf16 autocast where the device computes bf16 natively (CUDA,
//! CPUs with AVX-512 BF16 or AMX), as the trainer does; `--no-autocast` runs them in f32.
//! Median of `--iters` timed runs after two warm-up runs, min and max beside it; one JSON line
//! per measurement on stdout, a markdown table on stderr.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Instant;

use rsllm_llm::{Fusion, Llama, LlamaConfig, LoraConfig, Projector};
use rsllm_trainer::{AdamW, AdamWConfig};
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

const SEQ: i64 = 384;
const LOSS_POSITIONS: i64 = 16;
const LR: f64 = 1e-4;

/// Ours with tch's default weight decay (0.01), so both do the same work.
fn ours_config() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    }
}

struct Args {
    device: Device,
    iters: usize,
    only: Vec<String>,
    batch: i64,
    seq: i64,
    json_out: Option<PathBuf>,
    /// bf16 autocast in the training steps (where native: `rsllm_llm::autocast::native_bf16`).
    autocast: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        device: Device::cuda_if_available(),
        iters: 10,
        only: Vec::new(),
        batch: 16,
        seq: SEQ,
        json_out: None,
        autocast: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--device" => {
                args.device = match it.next().unwrap().as_str() {
                    "cpu" => Device::Cpu,
                    "cuda" => Device::Cuda(0),
                    _ => Device::cuda_if_available(),
                }
            }
            "--iters" => args.iters = it.next().unwrap().parse().unwrap(),
            "--only" => args.only = it.next().unwrap().split(',').map(str::to_owned).collect(),
            "--batch" => args.batch = it.next().unwrap().parse().unwrap(),
            "--seq" => args.seq = it.next().unwrap().parse().unwrap(),
            "--json-out" => args.json_out = Some(PathBuf::from(it.next().unwrap())),
            "--no-autocast" => args.autocast = false,
            // `cargo bench` passes --bench.
            _ => {}
        }
    }
    if args.only.is_empty() {
        let mut only = vec!["full", "lora", "lora-idle-projector"];
        if args.device.is_cuda() {
            only.push("train16");
        }
        args.only = only.into_iter().map(str::to_owned).collect();
    }
    args
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median, min and max seconds of `iters` runs of `f` after two untimed ones.
fn timed(device: Device, iters: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..2 {
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

/// SmolLM2-135M with random weights in `vs` (speed does not depend on their values).
fn random_model(vs: &nn::VarStore) -> Llama {
    tch::manual_seed(0);
    let model = Llama::new(&vs.root(), &LlamaConfig::smollm2_135m()).unwrap();
    tch::no_grad(|| {
        // In name order: `variables()` is a hash map, and the same seed must give the same
        // weights in every variant for their first losses to be comparable.
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, mut var) in vars {
            let _ = var.normal_(0.0, 0.02);
        }
    });
    model
}

/// Gives every trainable tensor of `vs` but those named `idle*` a random gradient (one backward
/// pass).
fn set_gradients(vs: &nn::VarStore, idle: Option<&str>) {
    let loss = vs
        .variables()
        .into_iter()
        .filter(|(name, t)| t.requires_grad() && idle.is_none_or(|idle| !name.starts_with(idle)))
        .map(|(_, t)| (&t * t.randn_like()).sum(Kind::Float))
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
}

struct Row {
    case: &'static str,
    optimizer: &'static str,
    tensors: usize,
    values: i64,
    seconds: (f64, f64, f64),
    tokens: Option<i64>,
    /// The loss of the first (untimed) step, from the same seeded weights and tokens: variants
    /// that compute the same thing another way (fusion, copies) must agree on it.
    first_loss: Option<f64>,
}

impl Row {
    fn json(&self, device: Device) -> serde_json::Value {
        let (median, min, max) = self.seconds;
        let mut row = serde_json::json!({
            "case": self.case, "optimizer": self.optimizer, "device": format!("{device:?}"),
            "tensors": self.tensors, "values": self.values,
            "median_s": median, "min_s": min, "max_s": max,
        });
        if let Some(tokens) = self.tokens {
            row["tokens_per_s"] = serde_json::json!(tokens as f64 / median);
        }
        if let Some(loss) = self.first_loss {
            row["first_loss"] = serde_json::json!(loss);
        }
        row
    }
}

/// The update alone over the trainable tensors `make` creates, with each optimizer; the
/// tensors named `idle*` get no gradient.
fn update_only(
    args: &Args,
    case: &'static str,
    make: impl Fn(Device) -> nn::VarStore,
    idle: Option<&str>,
    rows: &mut Vec<Row>,
) {
    let vs = make(args.device);
    let tensors = vs.trainable_variables();
    let values: i64 = tensors.iter().map(|t| t.numel() as i64).sum();
    set_gradients(&vs, idle);
    let mut libtorch = nn::AdamW::default().build(&vs, LR).unwrap();
    let seconds = timed(args.device, args.iters, || libtorch.step());
    rows.push(Row {
        case,
        optimizer: "libtorch AdamW (tch nn::AdamW) step",
        tensors: tensors.len(),
        values,
        seconds,
        tokens: None,
        first_loss: None,
    });
    drop(libtorch);
    drop(tensors);
    drop(vs);

    let vs = make(args.device);
    let tensors = vs.trainable_variables().len();
    set_gradients(&vs, idle);
    let mut ours = AdamW::for_var_store(&vs, ours_config()).unwrap();
    let seconds = timed(args.device, args.iters, || ours.step(LR).unwrap());
    rows.push(Row {
        case,
        optimizer: "rsllm AdamW (flat) step",
        tensors,
        values,
        seconds,
        tokens: None,
        first_loss: None,
    });
    let seconds = timed(args.device, args.iters, || {
        ours.clip_grad_norm(1e9).unwrap();
        ours.step(LR).unwrap();
    });
    rows.push(Row {
        case,
        optimizer: "rsllm AdamW (flat) clip_grad_norm + step",
        tensors,
        values,
        seconds,
        tokens: None,
        first_loss: None,
    });
}

fn full_store(device: Device) -> nn::VarStore {
    let vs = nn::VarStore::new(device);
    let _model = random_model(&vs);
    vs
}

fn lora_store(device: Device) -> nn::VarStore {
    let base = nn::VarStore::new(device);
    let mut model = random_model(&base);
    let trained = nn::VarStore::new(device);
    model
        .attach_lora(&trained.root(), &LoraConfig::default())
        .unwrap();
    let _projector = Projector::new(&trained.root(), 64, 576);
    trained
}

/// How many tensors `vs` trains, and how many values they hold.
fn trainable_size(vs: &nn::VarStore) -> (usize, i64) {
    let trainable = vs.trainable_variables();
    (
        trainable.len(),
        trainable.iter().map(|t| t.numel() as i64).sum(),
    )
}

/// The timed steps' loss: forward over token ids `x` `[B, T]` (bf16 autocast where the device
/// computes bf16 natively, as the trainer runs it, unless `--no-autocast`) and cross-entropy
/// of the last `tail` positions predicting their own ids.
fn step_loss(model: &Llama, x: &Tensor, tail: i64, args: &Args) -> Tensor {
    let device = args.device;
    let t = x.size()[1];
    let targets = x.narrow(1, t - tail, tail).reshape([-1]);
    rsllm_llm::bf16_autocast(device, args.autocast, || {
        let hidden = model.forward_ids(x, None).unwrap();
        let logits = model.head(&hidden.narrow(1, t - tail - 1, tail)).unwrap();
        logits
            .reshape([-1, model.config.vocab_size as i64])
            .cross_entropy_for_logits(&targets)
    })
}

/// A whole full fine-tuning step with each optimizer: zero_grad, forward (bf16 autocast where
/// native), loss on the last 16 positions, backward, update. Ours also with the projections
/// unfused (`Fusion::Off`), the model as it ran before q, k, v (gate, up) shared a product.
fn train_step(args: &Args, rows: &mut Vec<Row>) {
    let (b, t, tail) = (args.batch, args.seq, LOSS_POSITIONS);
    let default = Fusion::default_for(args.device);
    for (optimizer, fusion, label) in [
        ("libtorch", default, "libtorch AdamW (tch nn::AdamW)"),
        ("rsllm", default, "rsllm AdamW (flat)"),
        (
            "rsllm",
            Fusion::Off,
            "rsllm AdamW (flat), projections unfused",
        ),
    ] {
        let mut vs = nn::VarStore::new(args.device);
        let mut model = random_model(&vs);
        model.set_fusion(fusion);
        vs.unfreeze();
        let (tensors, values) = trainable_size(&vs);
        let x = Tensor::randint_low(3, 49152, [b, t], (Kind::Int64, args.device));
        let mut first_loss = None;
        let mut loss = || {
            let loss = step_loss(&model, &x, tail, args);
            first_loss.get_or_insert_with(|| loss.double_value(&[]));
            loss
        };
        let seconds = if optimizer == "libtorch" {
            let mut opt = nn::AdamW::default().build(&vs, LR).unwrap();
            timed(args.device, args.iters, || {
                opt.zero_grad();
                loss().backward();
                opt.step();
            })
        } else {
            let mut opt = AdamW::for_var_store(&vs, ours_config()).unwrap();
            timed(args.device, args.iters, || {
                opt.zero_grad();
                loss().backward();
                opt.step(LR).unwrap();
            })
        };
        rows.push(Row {
            case: "train16",
            optimizer: label,
            tensors,
            values,
            seconds,
            tokens: Some(b * t),
            first_loss,
        });
    }
}

/// The pipeline's step: frozen base, LoRA (LLaRA's, with its dropout 0.1, and again without
/// dropout), our AdamW over the adapters; under autocast the base's bf16 copies as the trainer keeps
/// them. Also the step as it ran before: projections unfused, no copies.
fn lora_train_step(args: &Args, rows: &mut Vec<Row>) {
    let (b, t, tail) = (args.batch, args.seq, LOSS_POSITIONS);
    let default = Fusion::default_for(args.device);
    // Copies where the trainer keeps them (CUDA); on a CPU the rows without copies are the
    // trainer's step.
    let copies = (args.autocast && args.device.is_cuda()).then_some(Kind::BFloat16);
    let mut variants = vec![
        (
            0.1,
            default,
            copies,
            "LoRA r 8 on 7 projections, dropout 0.1 (the trainer's step)",
        ),
        (
            0.1,
            Fusion::Off,
            None,
            "the same, projections unfused, no bf16 copies (before)",
        ),
        (0.0, default, copies, "LoRA, no dropout"),
        (
            0.0,
            Fusion::Off,
            None,
            "LoRA, no dropout, unfused, no copies (first loss: same)",
        ),
    ];
    if copies.is_some() {
        variants.push((
            0.1,
            default,
            None,
            "LoRA, dropout 0.1, fused, no bf16 copies",
        ));
    }
    for (dropout, fusion, copies, label) in variants {
        let mut base = nn::VarStore::new(args.device);
        let mut model = random_model(&base);
        // Frozen, as `rsllm_llm::load` leaves the base model.
        base.freeze();
        model.set_fusion(fusion);
        let trained = nn::VarStore::new(args.device);
        let lora = LoraConfig {
            dropout,
            ..LoraConfig::default()
        };
        model.attach_lora(&trained.root(), &lora).unwrap();
        model.keep_compute_copies(copies).unwrap();
        model.set_training(true);
        let (tensors, values) = trainable_size(&trained);
        let x = Tensor::randint_low(3, 49152, [b, t], (Kind::Int64, args.device));
        let mut opt = AdamW::for_var_store(&trained, ours_config()).unwrap();
        let mut first_loss = None;
        let seconds = timed(args.device, args.iters, || {
            opt.zero_grad();
            let loss = step_loss(&model, &x, tail, args);
            first_loss.get_or_insert_with(|| loss.double_value(&[]));
            loss.backward();
            opt.step(LR).unwrap();
        });
        rows.push(Row {
            case: "train-lora",
            optimizer: label,
            tensors,
            values,
            seconds,
            tokens: Some(b * t),
            first_loss,
        });
    }
}

fn main() {
    let args = parse_args();
    eprintln!(
        "device {:?}, {} intra-op threads, {} timed runs",
        args.device,
        tch::get_num_threads(),
        args.iters
    );
    let mut rows = Vec::new();
    for case in &args.only {
        match case.as_str() {
            "full" => update_only(&args, "full", full_store, None, &mut rows),
            "lora" => update_only(&args, "lora", lora_store, None, &mut rows),
            "lora-idle-projector" => update_only(
                &args,
                "lora-idle-projector",
                lora_store,
                Some("projector."),
                &mut rows,
            ),
            "train16" => train_step(&args, &mut rows),
            "train-lora" => lora_train_step(&args, &mut rows),
            other => panic!(
                "--only {other}: expected full, lora, lora-idle-projector, train16 or train-lora"
            ),
        }
        for row in rows.iter().filter(|r| r.case == case) {
            println!("{}", row.json(args.device));
        }
    }
    eprintln!("\n| case | variant | tensors | median s | min s | max s | tokens/s | first loss |");
    eprintln!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let (median, min, max) = row.seconds;
        let tokens = row
            .tokens
            .map(|t| format!("{:.0}", t as f64 / median))
            .unwrap_or_default();
        let loss = row
            .first_loss
            .map(|l| format!("{l:.5}"))
            .unwrap_or_default();
        eprintln!(
            "| {} | {} | {} | {median:.4} | {min:.4} | {max:.4} | {tokens} | {loss} |",
            row.case, row.optimizer, row.tensors
        );
    }
    if let Some(path) = &args.json_out {
        let all: Vec<_> = rows.iter().map(|r| r.json(args.device)).collect();
        let json = serde_json::to_string_pretty(&all).unwrap();
        rsllm_core::artefact::write_atomic(path, json.as_bytes())
            .unwrap_or_else(|e| panic!("--json-out {}: {e}", path.display()));
    }
}
