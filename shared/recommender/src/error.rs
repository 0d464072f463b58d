//! The one error type of rsllm-recommender.

#[derive(Debug, thiserror::Error)]
pub enum RecError {
    #[error(transparent)]
    Data(#[from] rsllm_core::DataError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
