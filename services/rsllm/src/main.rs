//! `rsllm`: the command line over the project's libraries. Each subcommand is a thin shell over
//! a library call, so a batch job, the services and the main job can never disagree about the
//! method.

mod data_cmd;
mod eval_cmd;
mod job_cmd;
mod llm_cmd;
mod pipeline_cmd;
mod plot;
mod probe_cmd;
mod rec_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rsllm",
    version,
    about = "RSLLM: recommendation as a language of the LLM"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "RSLLM_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Datasets: prepare splits with stored candidate sets, print their statistics.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// The LLM on a split's stored candidates (generative and ranking): zero-shot, or a trained
    /// stage with --stage-dir.
    Eval(eval_cmd::EvalArgs),
    /// The whole method: data, SASRec, stage 1, stage 2, evaluation, report.
    Pipeline(pipeline_cmd::PipelineArgs),
    /// The alignment heads' ceiling: L_ui's heads trained on the recommender's user states with
    /// the LLM taken out, ranked beside the recommender on the same rows (a diagnostic).
    ProbeHeads(probe_cmd::ProbeArgs),
    /// What a frozen LLM's last hidden state still carries of the user state the heads probe
    /// reads: a ridge readout and refit user heads, ranked on the same rows (a diagnostic).
    ProbeTransport(probe_cmd::TransportArgs),
    /// One RSLLM fine-tuning stage (1: text-only, 2: unified Text-ID), resumable.
    Train(train_cmd::TrainArgs),
    /// The LLM engine: model info, generation, continuation scoring.
    Llm {
        #[command(subcommand)]
        command: llm_cmd::LlmCommand,
    },
    /// Training jobs on a running llm-service: submit, watch, cancel, list.
    Job {
        #[command(flatten)]
        endpoint: job_cmd::Endpoint,
        #[command(subcommand)]
        command: job_cmd::JobCommand,
    },
    /// The ID-based sequential recommenders (SASRec, GRU4Rec, Caser): train and evaluate.
    Rec {
        #[command(subcommand)]
        command: rec_cmd::RecCommand,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    match cli.command {
        Command::Data { command } => data_cmd::run(command),
        Command::Rec { command } => rec_cmd::run(command),
        Command::Llm { command } => llm_cmd::run(command),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Pipeline(args) => pipeline_cmd::run(args),
        Command::ProbeHeads(args) => probe_cmd::run(args),
        Command::ProbeTransport(args) => probe_cmd::run_transport(args),
        Command::Job { endpoint, command } => job_cmd::run(command, endpoint),
    }
}

/// Logs go to stderr so that `--json` output on stdout stays machine-readable.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
