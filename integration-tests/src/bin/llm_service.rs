//! The llm-service, built in this package for the integration tests (see Cargo.toml).

fn main() -> std::process::ExitCode {
    rsllm_llm_service::cli_main()
}
