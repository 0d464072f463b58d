//! Errors: [`ServiceError`] for requests (mapped to a gRPC status in exactly one place) and
//! [`StartError`] for startup.

use std::path::PathBuf;

use tonic::{Code, Status};

/// Why a request failed. Messages name the field and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The `model` field was empty.
    #[error("model is empty: give a model name (e.g. movielens-llara-sasrec) or a version")]
    EmptyModel,
    /// No loaded model has that name or version.
    #[error("model {model:?} is not loaded (loaded: {loaded})")]
    UnknownModel { model: String, loaded: String },
    /// A required list was empty.
    #[error("{field} is empty")]
    EmptyField { field: &'static str },
    /// A list was longer than the server's limit.
    #[error("{field} has {len} items, more than the limit of {limit}")]
    TooMany {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    /// An item id is not in `0..item_count`.
    #[error(
        "{field}[{index}] = {value} is out of range: model {model} has {item_count} items \
         (valid ids 0..{item_count})"
    )]
    ItemOutOfRange {
        field: &'static str,
        index: usize,
        value: u32,
        model: String,
        item_count: usize,
    },
    /// `k` is not in `1..=item_count`.
    #[error(
        "k = {k} is out of range: must be 1..={item_count} (model {model} has {item_count} items)"
    )]
    KOutOfRange {
        k: u32,
        model: String,
        item_count: usize,
    },
    /// The models are still loading.
    #[error("models are still loading; retry shortly")]
    Loading,
    /// Too many scoring calls queued on one model.
    #[error("model {model} already has {limit} scoring calls queued; retry shortly")]
    Overloaded { model: String, limit: usize },
    /// A bug or a tch failure; `detail` is logged, never sent.
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
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let code = match &e {
            ServiceError::UnknownModel { .. } => Code::NotFound,
            ServiceError::EmptyModel
            | ServiceError::EmptyField { .. }
            | ServiceError::TooMany { .. }
            | ServiceError::ItemOutOfRange { .. }
            | ServiceError::KOutOfRange { .. } => Code::InvalidArgument,
            ServiceError::Loading => Code::Unavailable,
            ServiceError::Overloaded { .. } => Code::ResourceExhausted,
            ServiceError::Internal { context, detail } => {
                tracing::error!(context, detail, "internal error");
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot read the models directory {dir}: {source}")]
    ModelsDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no model artefacts in {dir} (expected <name>/manifest.json and the weights file it \
         names; train one with `rsllm rec train` or set --models-dir)"
    )]
    NoModels { dir: PathBuf },
    #[error("--models names {name:?}, but {dir} has no artefact of that name (found: {found})")]
    MissingModel {
        name: String,
        dir: PathBuf,
        found: String,
    },
    #[error("cannot load model {name} from {dir}: {source}")]
    Load {
        name: String,
        dir: PathBuf,
        source: rsllm_recommender::RecError,
    },
    #[error("loading the models panicked: {0}")]
    LoadPanicked(String),
    #[error("model {name}: {detail}")]
    BadModel { name: String, detail: String },
    #[error("invalid --redis-url {url:?}: {source}")]
    RedisUrl {
        url: String,
        source: rsllm_itemvec::RedisError,
    },
    #[error(transparent)]
    Reflection(#[from] rsllm_common::reflection::ReflectionError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_status_code() {
        let cases = [
            (ServiceError::EmptyModel, Code::InvalidArgument),
            (
                ServiceError::UnknownModel {
                    model: "x".into(),
                    loaded: "y".into(),
                },
                Code::NotFound,
            ),
            (
                ServiceError::EmptyField { field: "history" },
                Code::InvalidArgument,
            ),
            (
                ServiceError::TooMany {
                    field: "item_ids",
                    len: 5,
                    limit: 4,
                },
                Code::InvalidArgument,
            ),
            (
                ServiceError::ItemOutOfRange {
                    field: "item_ids",
                    index: 1,
                    value: 99,
                    model: "m".into(),
                    item_count: 50,
                },
                Code::InvalidArgument,
            ),
            (
                ServiceError::KOutOfRange {
                    k: 0,
                    model: "m".into(),
                    item_count: 50,
                },
                Code::InvalidArgument,
            ),
            (ServiceError::Loading, Code::Unavailable),
            (
                ServiceError::Overloaded {
                    model: "m".into(),
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                ServiceError::internal("scoring", "secret tch detail"),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret"), "{}", status.message());
        }
    }

    #[test]
    fn messages_name_the_field_and_value() {
        let s = Status::from(ServiceError::ItemOutOfRange {
            field: "candidates",
            index: 2,
            value: 1234,
            model: "tiny".into(),
            item_count: 50,
        });
        assert!(
            s.message().contains("candidates[2] = 1234"),
            "{}",
            s.message()
        );
    }
}
