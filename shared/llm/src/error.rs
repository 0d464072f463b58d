//! The one error type of rsllm-llm.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error(transparent)]
    Gguf(#[from] rsllm_gguf::GgufError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A model file or directory that cannot be used: names the file and what is wrong.
    #[error("{path}: {reason}")]
    BadModel { path: PathBuf, reason: String },
    /// A tokenizer that cannot be built or a text it cannot encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request that is invalid for this model (empty prompt, too long, bad token id, ...).
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl LlmError {
    pub(crate) fn bad_model(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        LlmError::BadModel {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        LlmError::Invalid(reason.into())
    }
}

pub type Result<T, E = LlmError> = std::result::Result<T, E>;

impl From<rsllm_prompt::TokenizerError> for LlmError {
    fn from(e: rsllm_prompt::TokenizerError) -> Self {
        match e {
            rsllm_prompt::TokenizerError::BadFile { path, reason } => {
                LlmError::BadModel { path, reason }
            }
            rsllm_prompt::TokenizerError::Gguf(e) => LlmError::from(e),
            rsllm_prompt::TokenizerError::Tokenizer(m) => LlmError::Tokenizer(m),
        }
    }
}
