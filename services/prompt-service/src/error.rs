//! Errors: [`ServiceError`] for requests (mapped to a gRPC status in exactly one place) and
//! [`StartError`] for startup.

use std::path::PathBuf;

use rsllm_prompt::PromptError;
use tonic::{Code, Status};

/// Why a request failed. Messages name the field and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The domain is not served by this replica.
    #[error("domain {domain:?} is not served here (served: {served})")]
    UnknownDomain { domain: String, served: String },
    /// A bad request field.
    #[error("{0}")]
    Invalid(String),
    /// Domains are still loading.
    #[error("the prompt-service is still loading; retry shortly")]
    Loading,
    /// Neither Redis nor the embedding-service could give the slot vectors.
    #[error("embedding-service unavailable for recommender {recommender}: {detail}")]
    EmbeddingUnavailable { recommender: String, detail: String },
    /// A bug, or a template the tokenizer cannot encode; `detail` is logged, not sent.
    #[error("internal error while {context}")]
    Internal {
        context: &'static str,
        detail: String,
    },
}

impl ServiceError {
    pub fn internal(context: &'static str, detail: impl ToString) -> ServiceError {
        ServiceError::Internal {
            context,
            detail: detail.to_string(),
        }
    }

    /// The prompt library's errors: bad input is the caller's, the rest is ours.
    pub fn from_prompt(e: PromptError) -> ServiceError {
        match e {
            PromptError::EmptyHistory
            | PromptError::NoCandidates
            | PromptError::TooManyCandidates { .. }
            | PromptError::UnknownItem { .. }
            | PromptError::DuplicateCandidate { .. }
            | PromptError::TargetNotInCandidates { .. }
            | PromptError::TemplateIndexOutOfRange { .. }
            | PromptError::InvalidOption { .. } => ServiceError::Invalid(e.to_string()),
            PromptError::UnknownDomain { .. }
            | PromptError::TemplateFile { .. }
            | PromptError::Template { .. }
            | PromptError::TemplateDomainMismatch { .. }
            | PromptError::CatalogMismatch { .. }
            | PromptError::Encoder { .. } => ServiceError::internal("building the prompt", e),
        }
    }

    /// The gRPC code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::UnknownDomain { .. } => Code::NotFound,
            ServiceError::Invalid(_) => Code::InvalidArgument,
            ServiceError::Loading | ServiceError::EmbeddingUnavailable { .. } => Code::Unavailable,
            ServiceError::Internal { .. } => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        if let ServiceError::Internal { context, detail } = &e {
            tracing::error!(context, detail, "internal error");
        }
        Status::new(e.code(), e.to_string())
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("domain {domain}: {reason}")]
    Domain { domain: String, reason: String },
    #[error("item-vector reader: {0}")]
    Reader(#[from] rsllm_itemvec::ReaderError),
    #[error(transparent)]
    Reflection(#[from] rsllm_common::reflection::ReflectionError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("loading panicked: {0}")]
    LoadPanicked(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_invalid_argument_and_library_faults_are_internal() {
        let e = ServiceError::from_prompt(PromptError::DuplicateCandidate {
            item: 7,
            first: 0,
            second: 2,
        });
        let status = Status::from(e);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("candidates[2] = 7"),
            "{}",
            status.message()
        );
        let e = ServiceError::from_prompt(PromptError::Encoder {
            text: "x".into(),
            message: "boom".into(),
        });
        let status = Status::from(e);
        assert_eq!(status.code(), Code::Internal);
        assert!(
            !status.message().contains("boom"),
            "details stay in the log"
        );
        assert_eq!(
            Status::from(ServiceError::UnknownDomain {
                domain: "x".into(),
                served: "movielens".into()
            })
            .code(),
            Code::NotFound
        );
    }
}
