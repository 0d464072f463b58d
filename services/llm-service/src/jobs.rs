//! Training jobs over gRPC: the same stage `rsllm train` runs, on a thread of its own.
//!
//! At most one job runs at a time (one model's worth of training memory, and on one GPU two
//! jobs would only share it): a StartTraining while one runs is RESOURCE_EXHAUSTED. A job
//! trains its own copy of the base model; the serving model is not touched until the job
//! succeeds, when its adapter is loaded into the serving engine as its domain's serving
//! adapter (earlier adapters stay selectable by version). Progress goes to watchers through a
//! `watch` channel per job; CancelJob sets a flag the trainer checks after each step, which
//! then checkpoints that step and stops.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rsllm_common::metrics::{Gauge, Registry};
use rsllm_common::panic::panic_message;
use rsllm_core::{DatasetName, Paths, Protocol};
use rsllm_llm::LoraConfig;
use rsllm_proto::v1 as pb;
use rsllm_proto::v1::JobState;
use rsllm_trainer::losses::{UiNegatives, UiSimilarity};
use rsllm_trainer::stage::{StageSpec, TrainSubset, run_stage};
use rsllm_trainer::{AdamWConfig, LossConfig, TrainConfig};
use tokio::sync::watch;

use crate::engine::EngineHandle;
use crate::error::ServiceError;

/// Bounds on a job spec's sizes: beyond them a spec is refused up front, not left to run out
/// of memory or to hold the one job slot for days. The warm-up runs before the first training
/// step, where CancelJob is checked: 10,000 steps (ten times the runs in docs/results.md) take
/// seconds on a GPU and about 4 minutes on a 2-core CPU.
const MAX_MICRO_BATCH: u32 = 4096;
const MAX_GRAD_ACCUM: u32 = 4096;
const MAX_PROJECTOR_WARMUP_STEPS: u32 = 10_000;

struct JobRecord {
    id: String,
    spec: pb::JobSpec,
    status: watch::Sender<pb::WatchJobResponse>,
    cancel: Arc<AtomicBool>,
    out: PathBuf,
}

/// The jobs of this replica.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Mutex<Vec<JobRecord>>>,
    dir: PathBuf,
    model_path: PathBuf,
    device: tch::Device,
    kind: tch::Kind,
    engine: EngineHandle,
    runtime: tokio::runtime::Handle,
    throughput: Gauge,
}

fn terminal(state: i32) -> bool {
    [JobState::Succeeded, JobState::Failed, JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

impl Jobs {
    pub fn new(
        dir: PathBuf,
        model_path: PathBuf,
        device: tch::Device,
        kind: tch::Kind,
        engine: EngineHandle,
        registry: &Registry,
    ) -> Jobs {
        Jobs {
            inner: Arc::default(),
            dir,
            model_path,
            device,
            kind,
            engine,
            runtime: tokio::runtime::Handle::current(),
            throughput: registry.gauge(
                "rsllm_training_rows_per_second",
                "Training rows per second over the last optimiser step of the running job.",
                &[],
            ),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<JobRecord>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the spec, refuses when a job is running, and starts the job.
    pub fn start(&self, spec: pb::JobSpec) -> Result<String, ServiceError> {
        let paths = Paths::from_env().map_err(|e| ServiceError::internal("finding the data", e))?;
        let plan = self.plan(&spec, &paths)?;
        let mut jobs = self.lock();
        if let Some(running) = jobs.iter().find(|j| !terminal(j.status.borrow().state)) {
            return Err(ServiceError::Exhausted(format!(
                "training job {} is still running; one job runs at a time (watch it, or cancel it)",
                running.id
            )));
        }
        // The random part keeps ids (and so output directories) apart across replicas that
        // share the jobs volume and start a job in the same second.
        let id = format!(
            "job-{}-{}-{:08x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            jobs.len() + 1,
            rand::random::<u32>()
        );
        let out = self.dir.join(&id);
        let (status, _) = watch::channel(pb::WatchJobResponse {
            job_id: id.clone(),
            state: JobState::Queued as i32,
            message: format!("output {}", out.display()),
            ..Default::default()
        });
        let cancel = Arc::new(AtomicBool::new(false));
        jobs.push(JobRecord {
            id: id.clone(),
            spec: spec.clone(),
            status: status.clone(),
            cancel: cancel.clone(),
            out: out.clone(),
        });
        drop(jobs);
        let this = self.clone();
        let job_id = id.clone();
        std::thread::Builder::new()
            .name(format!("train-{id}"))
            .spawn(move || this.run(&job_id, plan, spec, &paths, &out, &status, &cancel))
            .map_err(|e| ServiceError::internal("starting the job thread", e))?;
        tracing::info!(job = %id, "training job started");
        Ok(id)
    }

    /// Validates a spec into what the job thread needs.
    fn plan(&self, spec: &pb::JobSpec, paths: &Paths) -> Result<Plan, ServiceError> {
        let invalid = ServiceError::Invalid;
        if !(1..=2).contains(&spec.stage) {
            return Err(invalid(format!(
                "spec.stage = {}: must be 1 or 2",
                spec.stage
            )));
        }
        if spec.user_slot && spec.stage != 2 {
            return Err(invalid(format!(
                "spec.user_slot = true with spec.stage = {}: the user slot is a stage-2 setting",
                spec.stage
            )));
        }
        if spec.user_slot_last && !spec.user_slot {
            return Err(invalid(
                "spec.user_slot_last = true without spec.user_slot: it places the user slot".into(),
            ));
        }
        if spec.projector_warmup_steps > 0 && spec.stage != 2 {
            return Err(invalid(format!(
                "spec.projector_warmup_steps = {} with spec.stage = {}: the warm-up is a stage-2 setting",
                spec.projector_warmup_steps, spec.stage
            )));
        }
        let dataset: DatasetName = spec
            .dataset
            .parse()
            .map_err(|e| invalid(format!("spec.dataset = {:?}: {e}", spec.dataset)))?;
        let init_from = if spec.init_from_job.is_empty() {
            None
        } else {
            let jobs = self.lock();
            let Some(j) = jobs.iter().find(|j| j.id == spec.init_from_job) else {
                return Err(ServiceError::NotFound(format!(
                    "spec.init_from_job = {:?}: no such job",
                    spec.init_from_job
                )));
            };
            if j.status.borrow().state != JobState::Succeeded as i32 {
                return Err(invalid(format!(
                    "spec.init_from_job = {:?} has not succeeded",
                    spec.init_from_job
                )));
            }
            Some(j.out.clone())
        };
        let recommender = if spec.stage == 2 {
            let name = if spec.recommender.is_empty() {
                format!("{dataset}-llara-sasrec")
            } else {
                spec.recommender.clone()
            };
            if name.contains('/') || name.contains("..") {
                return Err(invalid(format!(
                    "spec.recommender = {name:?}: not an artefact name"
                )));
            }
            let dir = paths.models_dir().join("rec").join(&name);
            if !dir.join("manifest.json").is_file() {
                return Err(invalid(format!(
                    "spec.recommender = {name:?}: no trained recommender at {} (run `rsllm rec train`)",
                    dir.display()
                )));
            }
            Some(dir)
        } else {
            None
        };
        let positive = |field: &str, v: Option<u32>| match v {
            Some(0) => Err(invalid(format!("spec.{field} = 0: must be positive"))),
            other => Ok(other),
        };
        let at_most = |field: &str, v: Option<u32>, max: u32| match v {
            Some(v) if v > max => Err(invalid(format!("spec.{field} = {v}: at most {max}"))),
            other => Ok(other),
        };
        at_most("micro_batch", spec.micro_batch, MAX_MICRO_BATCH)?;
        at_most("grad_accum", spec.grad_accum, MAX_GRAD_ACCUM)?;
        at_most(
            "projector_warmup_steps",
            Some(spec.projector_warmup_steps),
            MAX_PROJECTOR_WARMUP_STEPS,
        )?;
        let ui_similarity = match pb::UiSimilarity::try_from(spec.ui_similarity) {
            Ok(pb::UiSimilarity::Unspecified | pb::UiSimilarity::Cosine) => UiSimilarity::Cosine,
            Ok(pb::UiSimilarity::UserNormalised) => UiSimilarity::UserNormalised,
            Err(_) => {
                return Err(invalid(format!(
                    "spec.ui_similarity = {}: not a UiSimilarity",
                    spec.ui_similarity
                )));
            }
        };
        let ui_negatives = match pb::UiNegatives::try_from(spec.ui_negatives) {
            Ok(pb::UiNegatives::Unspecified | pb::UiNegatives::Candidates) => {
                UiNegatives::Candidates
            }
            Ok(pb::UiNegatives::Catalog) => UiNegatives::Catalog,
            Err(_) => {
                return Err(invalid(format!(
                    "spec.ui_negatives = {}: not a UiNegatives",
                    spec.ui_negatives
                )));
            }
        };
        let lr = spec.learning_rate.unwrap_or(2e-4);
        if !(lr.is_finite() && lr > 0.0 && lr < 1.0) {
            return Err(invalid(format!(
                "spec.learning_rate = {lr}: must be in (0, 1)"
            )));
        }
        Ok(Plan {
            dataset,
            init_from,
            recommender,
            train_limit: positive("train_limit", spec.train_limit)?,
            max_steps: positive("max_steps", spec.max_steps)?,
            micro_batch: positive("micro_batch", spec.micro_batch)?.unwrap_or(4),
            grad_accum: positive("grad_accum", spec.grad_accum)?.unwrap_or(4),
            lr: f64::from(lr),
            seed: spec.seed.unwrap_or(42),
            user_slot: spec.user_slot,
            user_slot_last: spec.user_slot_last,
            projector_warmup_steps: u64::from(spec.projector_warmup_steps),
            eval_limit: spec.eval_limit.unwrap_or(0),
            ui_similarity,
            ui_negatives,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        id: &str,
        plan: Plan,
        spec: pb::JobSpec,
        paths: &Paths,
        out: &Path,
        status: &watch::Sender<pb::WatchJobResponse>,
        cancel: &AtomicBool,
    ) {
        status.send_modify(|s| s.state = JobState::Running as i32);
        // A panic inside libtorch or the trainer must end this job as FAILED: a job left
        // RUNNING would hold the one job slot until the process restarts.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.train(&plan, &spec, paths, out, status, cancel)
        }))
        .unwrap_or_else(|panic| Err(format!("training panicked: {}", panic_message(&*panic))));
        self.throughput.set(&[], 0.0);
        match result {
            Ok(JobEnd::Cancelled) => {
                tracing::info!(job = %id, "training job cancelled");
                status.send_modify(|s| {
                    s.state = JobState::Cancelled as i32;
                    s.message = format!("cancelled; last checkpoint kept in {}", out.display());
                });
            }
            Ok(JobEnd::Finished(evaluation)) => {
                let loaded = self.runtime.block_on(self.engine.load_adapter(
                    spec.dataset.clone(),
                    out.to_owned(),
                    id.to_owned(),
                ));
                let (evaluation, eval_note) = match evaluation {
                    Ok(e) => (e, String::new()),
                    Err(e) => {
                        tracing::warn!(job = %id, error = %e, "evaluation after training failed");
                        (None, format!("; the evaluation failed: {e}"))
                    }
                };
                status.send_modify(|s| {
                    s.evaluation = evaluation;
                    match loaded {
                        Ok(info) => {
                            s.state = JobState::Succeeded as i32;
                            s.adapter_version = info.version;
                            s.message =
                                format!("adapter loaded; output {}{eval_note}", out.display());
                        }
                        Err(e) => {
                            s.state = JobState::Failed as i32;
                            s.message = format!("trained, but the adapter cannot be served: {e}");
                        }
                    }
                });
                tracing::info!(job = %id, "training job finished");
            }
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "training job failed");
                status.send_modify(|s| {
                    s.state = JobState::Failed as i32;
                    s.message = e;
                });
            }
        }
    }

    fn train(
        &self,
        plan: &Plan,
        spec: &pb::JobSpec,
        paths: &Paths,
        out: &Path,
        status: &watch::Sender<pb::WatchJobResponse>,
        cancel: &AtomicBool,
    ) -> Result<JobEnd, String> {
        let s = |e: &dyn std::fmt::Display| e.to_string();
        let (data, _) = rsllm_core::dataset::prepare_or_reuse(
            plan.dataset,
            Protocol::Llara,
            &rsllm_core::dataset::PrepareOptions::default(),
            paths,
        )
        .map_err(|e| s(&e))?;
        let mut base =
            rsllm_llm::load(&self.model_path, self.device, self.kind).map_err(|e| s(&e))?;
        let pad_id = base.tokenizer.pad_id.unwrap_or(0);
        let stage_spec = StageSpec {
            stage: spec.stage as u8,
            dataset: plan.dataset.to_string(),
            base_model: base.path.clone(),
            base_model_sha256: base.weights_sha256().map_err(|e| s(&e))?,
            recommender: plan.recommender.clone(),
            init_from: plan.init_from.clone(),
            train_limit: plan.train_limit.map(|n| n as usize),
            train_subset: TrainSubset::Spread,
            num_candidates: 20,
            lora: LoraConfig::default(),
            train: TrainConfig {
                epochs: 1,
                max_steps: plan.max_steps.map(u64::from),
                micro_batch: plan.micro_batch as usize,
                grad_accum: plan.grad_accum as usize,
                peak_lr: plan.lr,
                warmup_fraction: 0.05,
                max_grad_norm: 1.0,
                seed: plan.seed,
                checkpoint_every: 50,
                keep_last: 2,
                pad_id,
                loss: LossConfig {
                    use_lm: true,
                    lambda_ui: 0.1,
                    lambda_it: 0.1,
                    tau: 0.07,
                    ui_similarity: plan.ui_similarity,
                    ui_negatives: plan.ui_negatives,
                    ..LossConfig::default()
                },
                adamw: AdamWConfig::default(),
                curriculum: false,
                full_finetune: false,
                autocast_bf16: true,
                group_by_length: true,
                length_window_steps: 0,
            },
            no_id_slots: false,
            no_titles: false,
            user_slot: plan.user_slot,
            user_slot_last: plan.user_slot_last,
            projector_warmup_steps: plan.projector_warmup_steps,
            heads_from: None,
            freeze_warm_heads: false,
            mixture: Vec::new(),
        };
        let mut last_step = Instant::now();
        let summary = run_stage(
            &stage_spec,
            &mut base,
            &data.catalog,
            &data.train,
            out,
            &mut |r| {
                let secs = last_step.elapsed().as_secs_f64().max(1e-9);
                last_step = Instant::now();
                let rows_per_second = (r.examples as f64 / secs) as f32;
                self.throughput.set(&[], f64::from(rows_per_second));
                status.send_modify(|st| {
                    st.step = r.step;
                    st.total_steps = r.total_steps;
                    st.loss = r.loss as f32;
                    st.learning_rate = r.lr as f32;
                    st.rows_per_second = rows_per_second;
                });
                if cancel.load(Ordering::SeqCst) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            },
        )
        .map_err(|e| s(&e))?;
        if summary.stopped {
            return Ok(JobEnd::Cancelled);
        }
        if plan.eval_limit == 0 {
            return Ok(JobEnd::Finished(Ok(None)));
        }
        drop(base);
        let evaluation = self.evaluate(plan, out, &data, pad_id).map(Some);
        Ok(JobEnd::Finished(evaluation))
    }

    /// The finished stage on the first `plan.eval_limit` test rows, in both modes.
    fn evaluate(
        &self,
        plan: &Plan,
        out: &Path,
        data: &rsllm_core::dataset::PreparedDataset,
        pad_id: u32,
    ) -> Result<pb::JobEvaluation, String> {
        let s = |e: &dyn std::fmt::Display| e.to_string();
        let mut fresh =
            rsllm_llm::load(&self.model_path, self.device, self.kind).map_err(|e| s(&e))?;
        let (spec, rsllm, _) =
            rsllm_trainer::stage::open_stage(&mut fresh, out, &data.catalog).map_err(|e| s(&e))?;
        let mut rows = data.test.clone();
        rows.truncate(plan.eval_limit as usize);
        let builder = rsllm_prompt::PromptBuilder::with_builtin_templates(
            &spec.dataset,
            rsllm_prompt::PromptOptions::new(pad_id),
        )
        .map_err(|e| s(&e))?;
        let report = rsllm_trainer::eval::evaluate(
            &rsllm_trainer::eval::Evaluated {
                model: &fresh.model,
                tokenizer: &fresh.tokenizer,
                heads: Some(&rsllm.heads),
                items: Some(&rsllm.items),
            },
            &builder,
            &data.catalog,
            &rows,
            &rsllm_trainer::eval::EvalOptions {
                prompt_mode: spec.prompt_mode(),
                // JobEvaluation reports the two modes of METHOD.md only.
                alignment: false,
                ..Default::default()
            },
            &mut |_| {},
        )
        .map_err(|e| s(&e))?;
        let mean = |m: Option<rsllm_core::metrics::MeanCi>| m.map_or(0.0, |m| m.mean as f32);
        Ok(pb::JobEvaluation {
            rows: report.n as u32,
            hit_ratio_generative: mean(report.hr1_generative),
            valid_ratio: mean(report.valid_ratio),
            hit_ratio_ranking: mean(report.ranking.map(|r| r.hr1)),
        })
    }

    /// A receiver of the job's updates.
    pub fn watch(&self, id: &str) -> Result<watch::Receiver<pb::WatchJobResponse>, ServiceError> {
        self.lock()
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.status.subscribe())
            .ok_or_else(|| ServiceError::NotFound(format!("job_id = {id:?}: no such job")))
    }

    /// Asks the job to stop; returns its state (CANCELLED once it has stopped, or the final
    /// state it already had).
    pub fn cancel(&self, id: &str) -> Result<watch::Receiver<pb::WatchJobResponse>, ServiceError> {
        let jobs = self.lock();
        let job = jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or_else(|| ServiceError::NotFound(format!("job_id = {id:?}: no such job")))?;
        job.cancel.store(true, Ordering::SeqCst);
        Ok(job.status.subscribe())
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<pb::JobInfo> {
        self.lock()
            .iter()
            .map(|j| pb::JobInfo {
                job_id: j.id.clone(),
                state: j.status.borrow().state,
                spec: Some(j.spec.clone()),
            })
            .collect()
    }

    /// Whether a state ends a job.
    pub fn is_terminal(state: i32) -> bool {
        terminal(state)
    }
}

struct Plan {
    dataset: DatasetName,
    init_from: Option<PathBuf>,
    recommender: Option<PathBuf>,
    train_limit: Option<u32>,
    max_steps: Option<u32>,
    micro_batch: u32,
    grad_accum: u32,
    lr: f64,
    seed: u64,
    eval_limit: u32,
    user_slot: bool,
    user_slot_last: bool,
    projector_warmup_steps: u64,
    ui_similarity: UiSimilarity,
    ui_negatives: UiNegatives,
}

enum JobEnd {
    /// Trained; the evaluation's figures, none when not asked for, or why it failed (the
    /// trained adapter is served either way).
    Finished(Result<Option<pb::JobEvaluation>, String>),
    Cancelled,
}
