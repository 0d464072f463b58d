//! rsllm's LLM engine: a Llama-family decoder on tch (CPU or CUDA, f32 or bf16), loaded from
//! GGUF or a Hugging Face directory, with its exact tokenizer, KV-cache generation and
//! shared-prefix candidate scoring. The llm-service and the `rsllm llm` CLI both use it.
//!
//! - [`config`]: `config.json` / GGUF metadata to [`LlamaConfig`];
//! - [`model`]: the decoder ([`Llama`]), its [`KvCache`] and ID-slot [`SlotOverrides`];
//! - [`loader`]: [`load`] a GGUF file or HF directory into a [`LoadedModel`];
//! - [`tokenizer`] (re-exported from rsllm-prompt): [`LlmTokenizer`] from tokenizer.json or
//!   GGUF metadata;
//! - [`infer`]: [`generate`] and [`score_continuations`];
//! - [`autocast`]: [`bf16_autocast`], mixed precision in bf16 for training (CUDA, and CPUs
//!   with native bf16).

pub mod autocast;
pub mod config;
pub mod error;
#[cfg(test)]
mod hf_parity;
pub mod infer;
pub mod loader;
pub mod model;
pub mod projector;

pub use autocast::bf16_autocast;
pub use config::{HfLlamaConfig, LlamaConfig};
pub use error::{LlmError, Result};
pub use infer::{
    ContinuationScore, FinishReason, GenerateOptions, Generation, Sampling, ScoreRequest, generate,
    generate_with, score_batch, score_continuations, score_continuations_and_prompt_state,
    score_continuations_with,
};
pub use loader::{LoadedModel, ModelFormat, load, save_hf_dir};
pub use model::{Fusion, KvCache, LORA_TARGETS, Llama, LoraConfig, SlotOverrides};
pub use projector::Projector;
/// The tokenizer lives in rsllm-prompt (no tch), so the prompt-service need not link libtorch.
pub use rsllm_prompt::tokenizer::{self, DEFAULT_MODEL_FILE, LlmTokenizer, default_model_path};

/// The compute dtype, as the CLI and services name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = LlmError;
    fn from_str(s: &str) -> Result<Dtype> {
        match s {
            "f32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            other => Err(LlmError::invalid(format!(
                "dtype {other:?}: expected f32 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        })
    }
}

/// libtorch's random generator is global to the process: tests that seed it and expect the same
/// draws (seeded sampling, seeded tiny models) race with every other test drawing from it in
/// parallel. The crate's tests hold this lock, so they draw one at a time.
#[cfg(test)]
pub(crate) fn test_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
