//! Errors: [`ServiceError`] for requests (mapped to a gRPC status in exactly one place) and
//! [`StartError`] for startup.

use std::time::Duration;

use tonic::{Code, Status};

use crate::engine::EngineError;

/// How long a refused caller should wait before retrying (sent as `retry-after-ms`).
pub const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Why a request failed. Messages name the field and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The batching queue is full, or a training job is already running.
    #[error("{0}")]
    Exhausted(String),
    /// A dependency failed or timed out; the message names it.
    #[error("{dependency} unavailable: {detail}")]
    Dependency {
        dependency: &'static str,
        detail: String,
    },
    /// The caller's deadline passed while waiting for the model.
    #[error("deadline exceeded while {0}")]
    Deadline(&'static str),
    /// Loading, or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a model failure; `detail` is logged, not sent.
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

    /// A dependency's status: its verdicts on our input (INVALID_ARGUMENT, NOT_FOUND) pass
    /// through with its name; anything else means it is unavailable to us.
    pub fn from_dependency(dependency: &'static str, status: &Status) -> ServiceError {
        let detail = format!("{}: {}", dependency, status.message());
        // Every other code (UNAVAILABLE, INTERNAL, RESOURCE_EXHAUSTED, ...) means the
        // dependency could not serve us.
        let code = status.code();
        if code == Code::InvalidArgument {
            ServiceError::Invalid(detail)
        } else if code == Code::NotFound {
            ServiceError::NotFound(detail)
        } else if code == Code::DeadlineExceeded {
            ServiceError::Deadline("waiting for a dependency")
        } else {
            ServiceError::Dependency {
                dependency,
                detail: format!("{code:?}: {}", status.message()),
            }
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ServiceError::Invalid(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::Exhausted(_) => Code::ResourceExhausted,
            ServiceError::Dependency { .. } | ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Deadline(_) => Code::DeadlineExceeded,
            ServiceError::Internal { .. } => Code::Internal,
        }
    }
}

impl From<EngineError> for ServiceError {
    fn from(e: EngineError) -> ServiceError {
        match e {
            EngineError::QueueFull { .. } => {
                ServiceError::Exhausted(format!("{e}; retry after {} ms", RETRY_AFTER.as_millis()))
            }
            EngineError::Stopped => ServiceError::Unavailable(e.to_string()),
            EngineError::UnknownAdapter(_) => ServiceError::NotFound(e.to_string()),
            EngineError::Invalid(m) => ServiceError::Invalid(m),
            EngineError::Model(m) => ServiceError::internal("running the model", m),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        if let ServiceError::Internal { context, detail } = &e {
            tracing::error!(context, detail, "internal error");
        }
        let mut status = Status::new(e.code(), e.to_string());
        if e.code() == Code::ResourceExhausted
            && let Ok(v) = RETRY_AFTER.as_millis().to_string().parse()
        {
            status.metadata_mut().insert("retry-after-ms", v);
        }
        status
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
    #[error("loading the model: {0}")]
    Model(String),
    #[error("{what} endpoint {endpoint:?}: {source}")]
    Endpoint {
        what: &'static str,
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("redis url: {0}")]
    Redis(String),
    #[error(transparent)]
    Reflection(#[from] rsllm_common::reflection::ReflectionError),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_resource_exhausted_with_retry_after() {
        let status = Status::from(ServiceError::from(EngineError::QueueFull { capacity: 4 }));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status
                .metadata()
                .get("retry-after-ms")
                .and_then(|v| v.to_str().ok()),
            Some("200")
        );
    }

    #[test]
    fn dependency_statuses_pass_bad_input_through_and_name_the_dependency() {
        let e = ServiceError::from_dependency(
            "prompt-service",
            &Status::invalid_argument("history[0] = 99999 is not an item"),
        );
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.to_string().contains("prompt-service: history[0]"), "{e}");
        let e = ServiceError::from_dependency("embedding-service", &Status::unavailable("refused"));
        assert_eq!(e.code(), Code::Unavailable);
        assert!(
            e.to_string().starts_with("embedding-service unavailable"),
            "{e}"
        );
    }
}
