//! rsllm-embedding-service: the gRPC front (`rsllm.v1.EmbeddingService`) over the ID
//! recommenders of `rsllm-recommender`.
//!
//! - `GetItemEmbeddings`: raw ID vectors, answered from an in-memory copy (no tch on that
//!   path). The same vectors are published to Redis under versioned keys (see
//!   `rsllm-itemvec`) so other services read them with one round trip.
//! - `ScoreCandidates` / `TopK`: scoring on the tch model, one call at a time per model on a
//!   blocking thread, with a bounded queue (RESOURCE_EXHAUSTED beyond it).
//! - `ListModels`, `grpc.health.v1` (NOT_SERVING until the models are loaded and again once
//!   shutdown begins), reflection (v1 and v1alpha).
//!
//! Input rules (also in `docs/embedding-service.md`): an unknown model is NOT_FOUND; an empty
//! model/id list/history, an id outside `0..item_count`, `k` outside `1..=item_count`, or
//! more than `--max-ids-per-request` ids / `--max-history-len` history items is
//! INVALID_ARGUMENT with a message naming the field and value. A history longer than the
//! model's window is cut to its last `max_history` items.
//!
//! The binary is a thin wrapper over [`cli_main`]; tests and benchmarks embed the server with
//! [`server::serve`].

pub mod config;
pub mod error;
pub mod grpc;
pub mod redis_sync;
pub mod registry;
pub mod server;

pub use config::Config;
pub use error::{ServiceError, StartError};
pub use registry::{LoadedModel, Registry};
pub use server::{ModelSource, run, serve};

use std::process::ExitCode;

/// The `embedding-service` binary: parse flags (with `RSLLM_EMBEDDING_*` fallbacks), set up
/// logging, serve until SIGTERM/ctrl-c, exit 0 after a clean drain, 1 on a startup error.
pub fn cli_main() -> ExitCode {
    use clap::Parser;
    let config = Config::parse();
    rsllm_common::server::cli_main("embedding-service", config.json_logs, run(config))
}
