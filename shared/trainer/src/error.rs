//! The one error type of rsllm-trainer.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Llm(#[from] rsllm_llm::LlmError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A checkpoint that cannot be used: names the file and the reason.
    #[error("{path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("invalid training setting: {0}")]
    Invalid(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
