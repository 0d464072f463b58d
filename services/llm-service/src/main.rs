//! `llm-service`: see the crate docs of `rsllm_llm_service` and `docs/fleet.md`.

fn main() -> std::process::ExitCode {
    rsllm_llm_service::cli_main()
}
