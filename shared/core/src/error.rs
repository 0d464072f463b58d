//! The one error type of rsllm-core.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset file is absent: names the files expected and where the publisher offers them.
    #[error("dataset {dataset}: missing {missing:?} under {dir}; {hint}")]
    Missing {
        dataset: String,
        dir: PathBuf,
        missing: Vec<String>,
        hint: String,
    },
    /// A file exists but a line cannot be parsed.
    #[error("{path}:{line}: {reason}")]
    Parse {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// Anything else about the content being wrong (unknown item id, empty split ...).
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
