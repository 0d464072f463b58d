//! `rsllm job submit|watch|cancel|list`: the batch-job client of the llm-service's training
//! RPCs (StartTraining, WatchJob, CancelJob, ListModels).
//!
//! Exit status: `submit --watch` and `watch` exit 0 when the job succeeded, 1 when it failed
//! or was cancelled, so a Kubernetes Job or CI step can run them as is.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rsllm_proto::v1 as pb;
use rsllm_proto::v1::llm_service_client::LlmServiceClient;
use tonic::transport::Channel;

#[derive(Debug, Args)]
pub struct Endpoint {
    /// The llm-service.
    #[arg(
        long,
        global = true,
        env = "RSLLM_LLM_ENDPOINT",
        default_value = "http://127.0.0.1:50053"
    )]
    endpoint: String,
    /// One JSON object per line on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Starts a training job (one RSLLM stage) on the llm-service; prints its id.
    Submit(SubmitArgs),
    /// Streams a job's progress until it ends.
    Watch { job_id: String },
    /// Asks a job to stop after its current step (its last checkpoint is kept).
    Cancel { job_id: String },
    /// The jobs the llm-service knows, and its adapters.
    List,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// 1: text-only prompts; 2: unified Text-ID prompts.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2))]
    stage: u32,
    #[arg(long, env = "RSLLM_DATASET", default_value = "movielens")]
    dataset: String,
    /// A finished job whose adapter this stage starts from (stage 1's for stage 2).
    #[arg(long)]
    init_from_job: Option<String>,
    /// Recommender artefact name for stage 2 (default `<dataset>-llara-sasrec`).
    #[arg(long)]
    recommender: Option<String>,
    #[arg(long)]
    train_limit: Option<u32>,
    #[arg(long)]
    max_steps: Option<u32>,
    #[arg(long)]
    micro_batch: Option<u32>,
    #[arg(long)]
    grad_accum: Option<u32>,
    #[arg(long)]
    lr: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate on the first N test rows at the end.
    #[arg(long)]
    eval_limit: Option<u32>,
    /// Stage 2: prompts with a user slot holding the recommender's user state.
    #[arg(long)]
    user_slot: bool,
    /// Stage 2: the user slot as the prompt's last token (implies --user-slot).
    #[arg(long)]
    user_slot_last: bool,
    /// Stage 2: steps of projector warm-up before the first training step (0: none).
    #[arg(long, default_value_t = 0)]
    projector_warmup_steps: u32,
    /// L_ui's similarity (see `rsllm train --ui-similarity`; the service's default: cosine).
    #[arg(long)]
    ui_similarity: Option<crate::train_cmd::UiSimilarityArg>,
    /// L_ui's negatives (see `rsllm train --ui-negatives`; the service's default: candidates).
    #[arg(long)]
    ui_negatives: Option<crate::train_cmd::UiNegativesArg>,
    /// Stream the job's progress until it ends (exit 1 unless it succeeded).
    #[arg(long)]
    watch: bool,
}

pub fn run(command: JobCommand, endpoint: Endpoint) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run_async(command, endpoint))
}

async fn connect(endpoint: &Endpoint) -> anyhow::Result<LlmServiceClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.endpoint.clone())
        .with_context(|| format!("--endpoint {:?} is not a URL", endpoint.endpoint))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to the llm-service at {}", endpoint.endpoint))?;
    Ok(LlmServiceClient::new(channel))
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

fn state_name(state: i32) -> &'static str {
    pb::JobState::try_from(state).map_or("UNKNOWN", |s| s.as_str_name())
}

async fn run_async(command: JobCommand, endpoint: Endpoint) -> anyhow::Result<()> {
    let mut client = connect(&endpoint).await?;
    match command {
        JobCommand::Submit(a) => {
            let spec = pb::JobSpec {
                stage: a.stage,
                dataset: a.dataset,
                init_from_job: a.init_from_job.unwrap_or_default(),
                recommender: a.recommender.unwrap_or_default(),
                train_limit: a.train_limit,
                max_steps: a.max_steps,
                micro_batch: a.micro_batch,
                grad_accum: a.grad_accum,
                learning_rate: a.lr,
                seed: a.seed,
                eval_limit: a.eval_limit,
                user_slot: a.user_slot || a.user_slot_last,
                user_slot_last: a.user_slot_last,
                projector_warmup_steps: a.projector_warmup_steps,
                ui_similarity: a
                    .ui_similarity
                    .map_or(pb::UiSimilarity::Unspecified, |s| match s {
                        crate::train_cmd::UiSimilarityArg::Cosine => pb::UiSimilarity::Cosine,
                        crate::train_cmd::UiSimilarityArg::UserNormalised => {
                            pb::UiSimilarity::UserNormalised
                        }
                    }) as i32,
                ui_negatives: a
                    .ui_negatives
                    .map_or(pb::UiNegatives::Unspecified, |n| match n {
                        crate::train_cmd::UiNegativesArg::Candidates => pb::UiNegatives::Candidates,
                        crate::train_cmd::UiNegativesArg::Catalog => pb::UiNegatives::Catalog,
                    }) as i32,
            };
            let job_id = client
                .start_training(pb::StartTrainingRequest { spec: Some(spec) })
                .await
                .map_err(status)?
                .into_inner()
                .job_id;
            if endpoint.json {
                println!("{}", serde_json::json!({ "job_id": job_id }));
            } else {
                println!("{job_id}");
            }
            if a.watch {
                watch(&mut client, &job_id, endpoint.json).await?;
            }
        }
        JobCommand::Watch { job_id } => watch(&mut client, &job_id, endpoint.json).await?,
        JobCommand::Cancel { job_id } => {
            let state = client
                .cancel_job(pb::CancelJobRequest {
                    job_id: job_id.clone(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .state;
            if endpoint.json {
                println!(
                    "{}",
                    serde_json::json!({ "job_id": job_id, "state": state_name(state) })
                );
            } else {
                println!("{job_id}: {}", state_name(state));
            }
        }
        JobCommand::List => {
            let models = client
                .list_models(pb::LlmServiceListModelsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for job in &models.jobs {
                let spec = job.spec.clone().unwrap_or_default();
                if endpoint.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "job_id": job.job_id,
                            "state": state_name(job.state),
                            "stage": spec.stage,
                            "dataset": spec.dataset,
                        })
                    );
                } else {
                    println!(
                        "{}  {}  stage {} on {}",
                        job.job_id,
                        state_name(job.state),
                        spec.stage,
                        spec.dataset
                    );
                }
            }
            if !endpoint.json {
                for a in &models.adapters {
                    println!(
                        "adapter {} {} stage {} step {}{}",
                        a.domain,
                        a.version,
                        a.stage,
                        a.step,
                        if a.serving { " (serving)" } else { "" }
                    );
                }
            }
        }
    }
    Ok(())
}

async fn watch(
    client: &mut LlmServiceClient<Channel>,
    job_id: &str,
    json: bool,
) -> anyhow::Result<()> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut last = None;
    while let Some(u) = stream.message().await.map_err(status)? {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "job_id": u.job_id,
                    "state": state_name(u.state),
                    "step": u.step,
                    "total_steps": u.total_steps,
                    "loss": u.loss,
                    "learning_rate": u.learning_rate,
                    "rows_per_second": u.rows_per_second,
                    "evaluation": u.evaluation.as_ref().map(|e| serde_json::json!({
                        "rows": e.rows,
                        "hit_ratio_generative": e.hit_ratio_generative,
                        "valid_ratio": e.valid_ratio,
                        "hit_ratio_ranking": e.hit_ratio_ranking,
                    })),
                    "adapter_version": u.adapter_version,
                    "message": u.message,
                })
            );
        } else {
            eprintln!(
                "{}  {}  step {}/{}  loss {:.4}  lr {:.2e}  {:.2} rows/s  {}",
                u.job_id,
                state_name(u.state),
                u.step,
                u.total_steps,
                u.loss,
                u.learning_rate,
                u.rows_per_second,
                u.message
            );
        }
        last = Some(u);
    }
    match last {
        Some(u) if u.state == pb::JobState::Succeeded as i32 => {
            if !json {
                println!("{job_id} succeeded: adapter {}", u.adapter_version);
            }
            Ok(())
        }
        Some(u) => bail!("{job_id} ended {}: {}", state_name(u.state), u.message),
        None => bail!("{job_id}: the stream ended without an update"),
    }
}
