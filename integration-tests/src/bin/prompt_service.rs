//! The prompt-service, built in this package for the integration tests (see Cargo.toml).

fn main() -> std::process::ExitCode {
    rsllm_prompt_service::cli_main()
}
