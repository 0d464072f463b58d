//! rsllm-proto: the generated tonic/prost code for the fleet's gRPC contract.
//!
//! The `.proto` sources live in `proto/rsllm/v1/` at the workspace root (package `rsllm.v1`);
//! `build.rs` compiles them with `tonic-prost-build` into `OUT_DIR` on every build, so nothing
//! generated is committed. Breaking changes go to a new package (`rsllm.v2`) next to v1.
//!
//! - [`v1`]: messages, and per service (`EmbeddingService`, `PromptService`, `LlmService`) a
//!   client (`embedding_service_client::EmbeddingServiceClient`, ...) and a server trait with
//!   its tower service (`embedding_service_server::{EmbeddingService, EmbeddingServiceServer}`).
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors of all rsllm protos, for reflection.

/// Package `rsllm.v1`.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::wildcard_enum_match_arm,
    missing_docs,
    rustdoc::all
)]
pub mod v1 {
    tonic::include_proto!("rsllm.v1");

    /// Fully qualified name of the embedding service, as health and reflection know it.
    pub const EMBEDDING_SERVICE_NAME: &str = embedding_service_server::SERVICE_NAME;
    /// Fully qualified name of the prompt service.
    pub const PROMPT_SERVICE_NAME: &str = prompt_service_server::SERVICE_NAME;
    /// Fully qualified name of the LLM service.
    pub const LLM_SERVICE_NAME: &str = llm_service_server::SERVICE_NAME;
}

/// Encoded `FileDescriptorSet` of every proto under `proto/` (for tonic-reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rsllm_descriptor");

/// The fully qualified names of every public gRPC service in [`v1`].
pub const V1_SERVICES: &[&str] = &[
    v1::EMBEDDING_SERVICE_NAME,
    v1::PROMPT_SERVICE_NAME,
    v1::LLM_SERVICE_NAME,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_set_names_the_service() {
        for needle in [&b"EmbeddingService"[..], b"PromptService", b"LlmService"] {
            assert!(
                FILE_DESCRIPTOR_SET
                    .windows(needle.len())
                    .any(|w| w == needle)
            );
        }
    }

    #[test]
    fn service_name_matches_generated_code() {
        use tonic::server::NamedService;
        type S = v1::embedding_service_server::EmbeddingServiceServer<Dummy>;
        struct Dummy;
        #[tonic::async_trait]
        impl v1::embedding_service_server::EmbeddingService for Dummy {
            async fn get_item_embeddings(
                &self,
                _: tonic::Request<v1::GetItemEmbeddingsRequest>,
            ) -> Result<tonic::Response<v1::GetItemEmbeddingsResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn score_candidates(
                &self,
                _: tonic::Request<v1::ScoreCandidatesRequest>,
            ) -> Result<tonic::Response<v1::ScoreCandidatesResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn top_k(
                &self,
                _: tonic::Request<v1::TopKRequest>,
            ) -> Result<tonic::Response<v1::TopKResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn get_user_state(
                &self,
                _: tonic::Request<v1::GetUserStateRequest>,
            ) -> Result<tonic::Response<v1::GetUserStateResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
            async fn list_models(
                &self,
                _: tonic::Request<v1::ListModelsRequest>,
            ) -> Result<tonic::Response<v1::ListModelsResponse>, tonic::Status> {
                Err(tonic::Status::unimplemented(""))
            }
        }
        assert_eq!(<S as NamedService>::NAME, v1::EMBEDDING_SERVICE_NAME);
    }
}
