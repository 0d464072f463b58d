//! rsllm-llm-service: the gRPC front (`rsllm.v1.LlmService`) over the RSLLM model.
//!
//! `Recommend`, end to end: validate -> (no candidates) embedding-service `TopK` retrieves
//! them -> prompt-service `BuildPrompt` gives the tokens, ID-slot positions and raw recommender
//! vectors -> projected vectors are read from Redis (`rsllm:projvec:{adapter}:{item}`, one
//! MGET) and the rest are projected on the model thread and written back -> the model thread
//! ranks the candidates (likelihood of each title as the answer) or generates the answer.
//! Deadlines propagate to each hop; a dependency failure is UNAVAILABLE naming it.
//!
//! The model runs on one thread behind a bounded queue with dynamic batching ([`engine`]);
//! training jobs run the trainer on their own thread ([`jobs`]).

pub mod config;
pub mod engine;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod server;

pub use config::Config;
pub use error::{ServiceError, StartError};
pub use server::{run, serve};

use std::process::ExitCode;

/// The `llm-service` binary: parse flags (with `RSLLM_LLM_*` fallbacks), set up logging, serve
/// until SIGTERM/ctrl-c; exit 0 after a clean drain, 1 on a startup error.
pub fn cli_main() -> ExitCode {
    use clap::Parser;
    let config = Config::parse();
    rsllm_common::server::cli_main("llm-service", config.json_logs, run(config))
}
