//! `embedding-service`: see the crate docs of `rsllm_embedding_service` and
//! `docs/embedding-service.md`.

fn main() -> std::process::ExitCode {
    rsllm_embedding_service::cli_main()
}
