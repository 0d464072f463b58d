//! `prompt-service`: see the crate docs of `rsllm_prompt_service` and `docs/fleet.md`.

fn main() -> std::process::ExitCode {
    rsllm_prompt_service::cli_main()
}
