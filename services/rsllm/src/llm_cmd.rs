//! `rsllm llm info|generate|score`: the LLM engine from the command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use rsllm_llm::{Dtype, GenerateOptions, LoadedModel, Sampling};
use serde_json::json;

use crate::rec_cmd::DeviceArg;

#[derive(Debug, Subcommand)]
pub enum LlmCommand {
    /// Architecture, parameter count, dtype and device of the model.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        json: bool,
    },
    /// Continues a prompt (greedy unless --temperature is given).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text (special-token markers such as <|im_start|> are recognised).
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Sample at this temperature with top-p instead of greedy decoding.
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop at the first newline.
        #[arg(long)]
        stop_on_newline: bool,
        /// Stop once this string appears (repeatable).
        #[arg(long = "stop")]
        stop: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Writes the model as a Hugging Face directory (config.json, f32 model.safetensors,
    /// tokenizer.json), e.g. to hand the GGUF default to transformers. A previous export at
    /// --out is replaced whole; a directory holding other files is refused.
    Export {
        #[command(flatten)]
        model: ModelArgs,
        /// The directory to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Log-likelihood of each continuation after the prompt (prompt encoded once).
    Score {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        /// A continuation to score (repeatable).
        #[arg(long = "continuation", required = true)]
        continuations: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model directory; default: the SmolLM2-135M-Instruct GGUF
    /// that scripts/setup.sh installs in the cache.
    #[arg(long, env = "RSLLM_LLM_MODEL")]
    pub model: Option<PathBuf>,
    /// cpu, cuda or auto (CUDA when present).
    #[arg(long, env = "RSLLM_DEVICE", default_value = "auto")]
    pub device: DeviceArg,
    /// f32 or bf16 (faster on GPUs and on CPUs with AMX; slower on CPUs without bf16 units).
    #[arg(long, env = "RSLLM_LLM_DTYPE", default_value = "f32")]
    pub dtype: Dtype,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<LoadedModel> {
        let path = match &self.model {
            Some(p) => p.clone(),
            None => rsllm_llm::default_model_path().context(
                "no --model given and neither RSLLM_CACHE_DIR nor HOME is set to find the default",
            )?,
        };
        if self.model.is_none() && !path.exists() {
            anyhow::bail!(
                "the default model {} is missing: run `bash scripts/setup.sh` or pass --model",
                path.display()
            );
        }
        let device = self.device.device()?;
        let started = Instant::now();
        let loaded = rsllm_llm::load(&path, device, self.dtype.kind())
            .with_context(|| format!("loading {}", path.display()))?;
        tracing::info!(
            model = %path.display(),
            seconds = started.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(loaded)
    }
}

pub fn run(command: LlmCommand) -> anyhow::Result<()> {
    match command {
        LlmCommand::Info { model, json } => info(&model, json),
        LlmCommand::Export { model, out } => {
            let loaded = model.load()?;
            rsllm_llm::save_hf_dir(&loaded.model, &loaded.vs, &loaded.tokenizer, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        LlmCommand::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            stop_on_newline,
            stop,
            json,
        } => {
            let loaded = model.load()?;
            let prompt_ids = loaded.tokenizer.encode(&prompt)?;
            let options = GenerateOptions {
                max_new_tokens,
                sampling: match temperature {
                    None => Sampling::Greedy,
                    Some(temperature) => Sampling::TopP {
                        temperature,
                        top_p,
                        seed,
                    },
                },
                stop_on_eos: true,
                stop_on_newline,
                stop_strings: stop,
            };
            let started = Instant::now();
            let generation =
                rsllm_llm::generate(&loaded.model, &loaded.tokenizer, &[prompt_ids], &options)?
                    .into_iter()
                    .next()
                    .context("generation returned nothing")?;
            let seconds = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    json!({
                        "prompt_ids": generation.prompt_ids,
                        "token_ids": generation.token_ids,
                        "text": generation.text,
                        "finish_reason": generation.finish_reason,
                        "seconds": seconds,
                    })
                );
            } else {
                println!("{}", generation.text);
                eprintln!(
                    "{} new tokens in {seconds:.2} s ({:?})",
                    generation.token_ids.len(),
                    generation.finish_reason
                );
            }
            Ok(())
        }
        LlmCommand::Score {
            model,
            prompt,
            continuations,
            json,
        } => {
            let loaded = model.load()?;
            let prompt_ids = loaded.tokenizer.encode(&prompt)?;
            let cont_ids = continuations
                .iter()
                .map(|c| loaded.tokenizer.encode(c))
                .collect::<Result<Vec<_>, _>>()?;
            let started = Instant::now();
            let scores = rsllm_llm::score_continuations(&loaded.model, &prompt_ids, &cont_ids)?;
            let seconds = started.elapsed().as_secs_f64();
            if json {
                let rows: Vec<_> = continuations
                    .iter()
                    .zip(&scores)
                    .map(|(text, s)| {
                        json!({
                            "continuation": text,
                            "continuation_ids": s.continuation_ids,
                            "token_logprobs": s.token_logprobs,
                            "sum_logprob": s.sum_logprob,
                            "mean_logprob": s.mean_logprob,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"prompt_ids": prompt_ids, "continuations": rows, "seconds": seconds})
                );
            } else {
                println!("| continuation | tokens | sum log-prob | mean log-prob |");
                println!("|---|---|---|---|");
                for (text, s) in continuations.iter().zip(&scores) {
                    println!(
                        "| {text} | {} | {:.4} | {:.4} |",
                        s.continuation_ids.len(),
                        s.sum_logprob,
                        s.mean_logprob
                    );
                }
            }
            Ok(())
        }
    }
}

fn info(args: &ModelArgs, json: bool) -> anyhow::Result<()> {
    let loaded = args.load()?;
    let c = &loaded.model.config;
    let value = json!({
        "path": loaded.path,
        "format": loaded.format,
        "architecture": "llama",
        "parameters": c.num_parameters(),
        "config": c,
        "stored_dtypes": loaded.stored_dtypes,
        "dtype": args.dtype,
        "device": format!("{:?}", loaded.model.device()),
        "vocab_size_tokenizer": loaded.tokenizer.vocab_size(),
        "bos_id": loaded.tokenizer.bos_id,
        "eos_id": loaded.tokenizer.eos_id,
    });
    if json {
        println!("{value}");
    } else {
        println!("model:       {}", loaded.path.display());
        println!("format:      {:?}", loaded.format);
        println!(
            "architecture: llama, {} layers, hidden {}, {} heads ({} kv), vocab {}",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size
        );
        println!("parameters:  {}", c.num_parameters());
        println!("stored:      {:?}", loaded.stored_dtypes);
        println!("dtype:       {}", args.dtype);
        println!("device:      {:?}", loaded.model.device());
    }
    Ok(())
}
