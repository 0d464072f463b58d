//! rsllm-prompt-service: the gRPC front (`rsllm.v1.PromptService`) over `rsllm-prompt`.
//!
//! `BuildPrompt` assembles one prompt of a domain (LLaRA's templates, the dataset's titles)
//! with the model's tokenizer: token ids, ID-slot positions, candidate title spans and each
//! candidate's answer tokens. In unified mode it also returns the raw recommender vectors of
//! the slot items, read from Redis in one round trip (the keys the embedding-service
//! publishes), or from the embedding-service's `GetItemEmbeddings` on a miss or with Redis
//! down (then written back to Redis). The llm-service projects them into the LLM's space.
//!
//! No libtorch: the tokenizer and prompt assembly are plain Rust, so this service's image is
//! small and it scales out on CPU nodes.
//!
//! Input rules: an unknown domain is NOT_FOUND; an empty history or candidate list, unknown
//! or repeated ids, an unset mode, a bad template index, or more than `--max-history-len` /
//! `--max-candidates` items is INVALID_ARGUMENT naming the field and value; with the
//! embedding-service unreachable and Redis missing the vectors, UNAVAILABLE naming it.

pub mod config;
pub mod domains;
pub mod error;
pub mod grpc;
pub mod server;

pub use config::Config;
pub use error::{ServiceError, StartError};
pub use server::{run, serve};

use std::process::ExitCode;

/// The `prompt-service` binary: parse flags (with `RSLLM_PROMPT_*` fallbacks), set up logging,
/// serve until SIGTERM/ctrl-c; exit 0 after a clean drain, 1 on a startup error.
pub fn cli_main() -> ExitCode {
    use clap::Parser;
    let config = Config::parse();
    rsllm_common::server::cli_main("prompt-service", config.json_logs, run(config))
}
