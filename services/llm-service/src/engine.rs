//! The model thread: one base LLM with a live set of adapter tensors (LoRA, projector, heads),
//! fed by a bounded queue and batching concurrent requests dynamically.
//!
//! Why one thread: tch tensors and the KV caches are not shared across threads, and on a CPU
//! (or one GPU) running two forwards at once only splits the same cores. Requests queue in a
//! bounded channel; the thread takes the first, then whatever else arrives within
//! `max_wait` up to `max_batch`, groups them by (adapter, task) and runs each group as one
//! batched forward: ranking as [`rsllm_llm::score_batch`] (each prompt with its candidates
//! packed in one row), generation as [`rsllm_llm::generate_with`] (left-padded batch).
//!
//! Several domains' adapters share the base model: the live variables are overwritten with a
//! group's adapter tensors when it differs from the last one used (a few MB copied; the base
//! weights never move). A full queue is answered at once (RESOURCE_EXHAUSTED upstream), so
//! overload shows as fast refusals rather than timeouts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rsllm_common::metrics::{Gauge, Histogram, Registry};
use rsllm_llm::{GenerateOptions, LoadedModel, LoraConfig, Sampling, ScoreRequest, SlotOverrides};
use rsllm_trainer::RsllmHeads;
use rsllm_trainer::stage::{CHECKPOINT_DIR, read_spec};
use tch::{Device, Kind, Tensor, nn};
use tokio::sync::oneshot;

/// What the engine is told at startup.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    pub device: Device,
    pub kind: Kind,
    /// Most requests in one batched forward (1 turns batching off).
    pub max_batch: usize,
    /// How long the first request of a batch waits for company.
    pub max_wait: Duration,
    /// Requests waiting beyond the one running; more are refused.
    pub queue_capacity: usize,
    /// Generation cap (generative mode).
    pub max_new_tokens: usize,
    /// Adapters to load at startup: (domain, stage directory).
    pub adapters: Vec<(String, AdapterSource)>,
    /// Test hook (`--test-delay-ms`): a pause before each batch. Zero in production.
    pub test_delay: Duration,
}

/// Where a domain's adapter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterSource {
    /// A stage output directory of `rsllm train` (its latest checkpoint).
    StageDir(PathBuf),
    /// No fine-tuning: the base model with zero LoRA updates and text-only prompts.
    ZeroShot,
}

/// A loaded adapter, as the gRPC side sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub domain: String,
    /// sha256 of the checkpoint's trained tensors, or `zero-shot`.
    pub version: String,
    /// 0 for zero-shot, else the training stage (1 text-only, 2 unified).
    pub stage: u8,
    pub step: u64,
    pub job_id: String,
    /// The recommender (model name on the embedding-service) that retrieves candidates and,
    /// for stage 2, whose vectors the projector was trained on.
    pub recommender: String,
    /// Whether Recommend uses it for its domain by default.
    pub serving: bool,
    /// The prompt mode it was trained with, and so is served with.
    pub prompt_mode: rsllm_prompt::PromptMode,
}

/// One ID slot of a prompt, with its vector either already projected (from the Redis cache)
/// or raw (to project here).
#[derive(Debug, Clone)]
pub struct SlotInput {
    pub position: usize,
    pub item: u32,
    pub vector: SlotVector,
}

#[derive(Debug, Clone)]
pub enum SlotVector {
    /// An item's vector already through this adapter's projector (from Redis).
    Projected(Vec<f32>),
    /// An item's recommender vector, projected here; the projection is handed back for the
    /// cache.
    Raw(Vec<f32>),
    /// The recommender's user state at a user slot: projected here like `Raw`, never handed
    /// back for the cache (it belongs to one request's history, not to an item).
    UserState(Vec<f32>),
}

/// What to do with a prompt.
#[derive(Debug, Clone)]
pub enum Task {
    /// Score each continuation (a candidate's answer tokens).
    Rank { continuations: Vec<Vec<u32>> },
    /// Generate the answer greedily (first line).
    Generate,
}

impl Task {
    fn is_rank(&self) -> bool {
        matches!(self, Task::Rank { .. })
    }
}

/// One request for the model thread.
pub struct Job {
    pub adapter: String,
    pub input_ids: Vec<u32>,
    pub slots: Vec<SlotInput>,
    pub task: Task,
    pub reply: oneshot::Sender<Result<JobOutput, EngineError>>,
}

/// The model thread's answer.
#[derive(Debug, Clone, Default)]
pub struct JobOutput {
    /// Ranking: (sum, mean) log-likelihood per continuation, in order.
    pub scores: Vec<(f64, f64)>,
    /// Generation: the text written.
    pub text: String,
    /// Slot vectors projected for this job (item, projected vector), to cache.
    pub projected: Vec<(u32, Vec<f32>)>,
    /// Requests in the batch this one ran in.
    pub batch_size: usize,
}

/// Why the model thread could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("the queue is full ({capacity} requests waiting)")]
    QueueFull { capacity: usize },
    #[error("the model is shutting down")]
    Stopped,
    #[error("adapter {0} is not loaded")]
    UnknownAdapter(String),
    #[error("{0}")]
    Invalid(String),
    #[error("model failure: {0}")]
    Model(String),
}

enum Message {
    Job(Job),
    LoadAdapter {
        domain: String,
        source: AdapterSource,
        job_id: String,
        reply: oneshot::Sender<Result<AdapterInfo, String>>,
    },
}

/// Facts about the loaded base model.
#[derive(Debug, Clone)]
pub struct BaseInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub device: String,
    pub dtype: String,
    pub eos_id: Option<u32>,
}

/// Metrics the engine keeps.
#[derive(Clone)]
struct EngineMetrics {
    queue_depth: Gauge,
    batch_size: Histogram,
}

/// The async side's handle: submit jobs, look up adapters. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Message>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    adapters: Arc<RwLock<Vec<AdapterInfo>>>,
    base: Arc<BaseInfo>,
    metrics: EngineMetrics,
}

impl EngineHandle {
    /// Queues a job; a full queue is refused at once.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        // Counted before the send: the model thread may take the job and count it out before
        // `try_send` even returns here, and the count must never go below zero (it wrapped
        // to usize::MAX once, under a fleet test's load).
        let depth = self.depth.fetch_add(1, Ordering::SeqCst).saturating_add(1);
        match self.tx.try_send(Message::Job(job)) {
            Ok(()) => {
                self.metrics.queue_depth.set(&[], depth as f64);
                Ok(())
            }
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => EngineError::QueueFull {
                        capacity: self.capacity,
                    },
                    TrySendError::Disconnected(_) => EngineError::Stopped,
                })
            }
        }
    }

    /// Loads an adapter (a finished training job's output) and makes it its domain's serving
    /// adapter. Waits for room in the queue.
    pub async fn load_adapter(
        &self,
        domain: String,
        dir: PathBuf,
        job_id: String,
    ) -> Result<AdapterInfo, String> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.clone();
        let message = Message::LoadAdapter {
            domain,
            source: AdapterSource::StageDir(dir),
            job_id,
            reply,
        };
        tokio::task::spawn_blocking(move || tx.send(message))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "the model is shutting down".to_owned())?;
        rx.await
            .map_err(|_| "the model thread stopped".to_owned())?
    }

    /// The adapter for `domain`, or the one with `version` (which must be of that domain).
    pub fn adapter(&self, domain: &str, version: Option<&str>) -> Option<AdapterInfo> {
        let adapters = self.adapters.read().unwrap_or_else(|p| p.into_inner());
        adapters
            .iter()
            .find(|a| {
                a.domain == domain
                    && match version {
                        Some(v) => a.version == v,
                        None => a.serving,
                    }
            })
            .cloned()
    }

    pub fn adapters(&self) -> Vec<AdapterInfo> {
        let mut all = self
            .adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        all.sort_by(|a, b| (&a.domain, &a.version).cmp(&(&b.domain, &b.version)));
        all
    }

    /// The domains with a serving adapter, comma separated.
    pub fn domains(&self) -> String {
        let mut d: Vec<String> = self.adapters().into_iter().map(|a| a.domain).collect();
        d.dedup();
        d.join(", ")
    }

    pub fn base(&self) -> &BaseInfo {
        &self.base
    }
}

/// Starts the model thread: loads the base model and the configured adapters, warms up with
/// one forward, then serves the queue. Returns once warm (the caller flips health to
/// SERVING), or the load error. The thread ends when every handle is dropped.
pub fn start(config: EngineConfig, registry: &Registry) -> Result<EngineHandle, String> {
    let metrics = EngineMetrics {
        queue_depth: registry.gauge(
            "rsllm_llm_queue_depth",
            "Requests waiting for the model thread.",
            &[],
        ),
        batch_size: registry.histogram(
            "rsllm_llm_batch_size",
            "Requests per batched forward on the model thread, by task.",
            &["task"],
            rsllm_common::metrics::COUNT_BUCKETS,
        ),
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue_capacity);
    let depth = Arc::new(AtomicUsize::new(0));
    let adapters = Arc::new(RwLock::new(Vec::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let (depth, adapters, metrics) = (depth.clone(), adapters.clone(), metrics.clone());
        let config = config.clone();
        std::thread::Builder::new()
            .name("llm-model".into())
            .spawn(move || {
                let mut worker = match Worker::load(&config, adapters, depth, metrics) {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(worker.base.clone()));
                worker.run(&rx);
            })
            .map_err(|e| format!("cannot start the model thread: {e}"))?;
    }
    let base = ready_rx
        .recv()
        .map_err(|_| "the model thread died while loading".to_owned())??;
    Ok(EngineHandle {
        tx,
        depth,
        capacity: config.queue_capacity,
        adapters,
        base: Arc::new(base),
        metrics,
    })
}

struct Adapter {
    info: AdapterInfo,
    tensors: Vec<(String, Tensor)>,
}

struct Worker {
    model: LoadedModel,
    base: BaseInfo,
    live: nn::VarStore,
    heads: RsllmHeads,
    lora: LoraConfig,
    d_id: usize,
    adapters: Vec<Adapter>,
    current: Option<usize>,
    shared: Arc<RwLock<Vec<AdapterInfo>>>,
    depth: Arc<AtomicUsize>,
    metrics: EngineMetrics,
    max_batch: usize,
    max_wait: Duration,
    max_new_tokens: usize,
    test_delay: Duration,
}

/// A stage directory read from disk: its spec, latest checkpoint and that checkpoint's tensors.
type StagedAdapter = (
    rsllm_trainer::stage::StageSpec,
    rsllm_trainer::checkpoint::Checkpoint,
    Vec<(String, Tensor)>,
);

/// The adapter tensors of a stage directory's latest checkpoint, with its spec.
fn read_adapter(dir: &Path) -> Result<StagedAdapter, String> {
    let spec = read_spec(dir).map_err(|e| e.to_string())?;
    let root = dir.join(CHECKPOINT_DIR);
    let ckpt = rsllm_trainer::checkpoint::latest(&root)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{}: no checkpoint", root.display()))?;
    let (tensors, _) = ckpt.load().map_err(|e| e.to_string())?;
    Ok((spec, ckpt, tensors))
}

/// The recommender's model name on the embedding-service: its artefact directory's name.
fn recommender_name(spec: &rsllm_trainer::stage::StageSpec) -> String {
    spec.recommender
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{}-llara-sasrec", spec.dataset))
}

impl Worker {
    fn load(
        config: &EngineConfig,
        shared: Arc<RwLock<Vec<AdapterInfo>>>,
        depth: Arc<AtomicUsize>,
        metrics: EngineMetrics,
    ) -> Result<Worker, String> {
        let started = Instant::now();
        let mut model = rsllm_llm::load(&config.model_path, config.device, config.kind)
            .map_err(|e| format!("{}: {e}", config.model_path.display()))?;
        let sha256 = model.weights_sha256().map_err(|e| e.to_string())?;
        // Read the trained adapters first: the first one fixes the LoRA shape and the ID width.
        let mut staged = Vec::new();
        for (domain, source) in &config.adapters {
            if let AdapterSource::StageDir(dir) = source {
                let (spec, ckpt, tensors) =
                    read_adapter(dir).map_err(|e| format!("adapter for {domain}: {e}"))?;
                staged.push((domain.clone(), dir.clone(), spec, ckpt, tensors));
            }
        }
        let lora = staged
            .first()
            .map_or_else(LoraConfig::default, |s| s.2.lora.clone());
        let d_id = staged
            .first()
            .and_then(|s| {
                s.4.iter()
                    .find(|(n, _)| n == "projector.fc1.weight")
                    .map(|(_, t)| t.size().get(1).map_or(0, |&d| d as usize))
            })
            .unwrap_or(64);
        if d_id == 0 {
            return Err("an adapter's projector.fc1.weight is not a [d_llm, d_id] matrix".into());
        }
        let live = nn::VarStore::new(config.device);
        model
            .model
            .attach_lora(&live.root(), &lora)
            .map_err(|e| e.to_string())?;
        let heads = RsllmHeads::new(&live.root(), d_id, model.model.config.hidden_size);
        model.model.set_training(false);
        let base = BaseInfo {
            path: config.model_path.clone(),
            sha256,
            device: match config.device {
                Device::Cpu => "cpu".to_owned(),
                Device::Cuda(i) => format!("cuda:{i}"),
                Device::Mps => "mps".to_owned(),
                Device::Vulkan => "vulkan".to_owned(),
            },
            dtype: if config.kind == Kind::BFloat16 {
                "bf16"
            } else {
                "f32"
            }
            .to_owned(),
            eos_id: model.tokenizer.eos_id,
        };
        let mut worker = Worker {
            model,
            base,
            live,
            heads,
            lora,
            d_id,
            adapters: Vec::new(),
            current: None,
            shared,
            depth,
            metrics,
            max_batch: config.max_batch.max(1),
            max_wait: config.max_wait,
            max_new_tokens: config.max_new_tokens,
            test_delay: config.test_delay,
        };
        for (domain, source) in &config.adapters {
            if *source == AdapterSource::ZeroShot {
                worker.add_zero_shot(domain)?;
            }
        }
        for (domain, dir, spec, ckpt, tensors) in staged {
            worker.add(&domain, &dir, spec, ckpt, tensors, "")?;
        }
        worker.warm_up()?;
        tracing::info!(
            secs = started.elapsed().as_secs_f64(),
            adapters = worker.adapters.len(),
            "model loaded and warm"
        );
        Ok(worker)
    }

    /// The base model alone: the live tensors as initialised (LoRA B is zero, so the LoRA
    /// update is exactly zero). Text-only prompts; the projector is never used.
    fn add_zero_shot(&mut self, domain: &str) -> Result<(), String> {
        let tensors: Vec<(String, Tensor)> = self
            .live
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().copy()))
            .collect();
        self.register(Adapter {
            info: AdapterInfo {
                domain: domain.to_owned(),
                version: "zero-shot".to_owned(),
                stage: 0,
                step: 0,
                job_id: String::new(),
                recommender: format!("{domain}-llara-sasrec"),
                serving: true,
                prompt_mode: rsllm_prompt::PromptMode::TextOnly,
            },
            tensors,
        });
        Ok(())
    }

    fn add(
        &mut self,
        domain: &str,
        dir: &Path,
        spec: rsllm_trainer::stage::StageSpec,
        ckpt: rsllm_trainer::checkpoint::Checkpoint,
        tensors: Vec<(String, Tensor)>,
        job_id: &str,
    ) -> Result<AdapterInfo, String> {
        let bad = |reason: String| format!("adapter {} ({domain}): {reason}", dir.display());
        if spec.dataset != domain {
            return Err(bad(format!("trained on {}, not {domain}", spec.dataset)));
        }
        if spec.lora != self.lora {
            return Err(bad(format!(
                "LoRA settings {:?} differ from the loaded adapters' {:?}",
                spec.lora, self.lora
            )));
        }
        if spec.base_model_sha256 != self.base.sha256 {
            return Err(bad(format!(
                "trained on base model {}, this service runs {}",
                spec.base_model_sha256, self.base.sha256
            )));
        }
        if tensors
            .iter()
            .any(|(n, _)| n.starts_with(rsllm_trainer::train_loop::BASE_PREFIX))
        {
            return Err(bad(
                "a full fine-tune (it holds the base weights): serve it as a base model, not as an adapter"
                    .into(),
            ));
        }
        // Same names and shapes as the live store (checked once here, not per switch).
        let variables = self.live.variables();
        if variables.len() != tensors.len() {
            return Err(bad(format!(
                "holds {} tensors, the live adapter {}",
                tensors.len(),
                variables.len()
            )));
        }
        for (name, t) in &tensors {
            match variables.get(name) {
                Some(v) if v.size() == t.size() => {}
                Some(v) => {
                    return Err(bad(format!(
                        "{name} has shape {:?}, expected {:?} (ID width {})",
                        t.size(),
                        v.size(),
                        self.d_id
                    )));
                }
                None => return Err(bad(format!("holds {name}, which is not an adapter tensor"))),
            }
        }
        let device = self.model.model.device();
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| t.f_to_device(device).map(|t| (n, t)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?;
        let info = AdapterInfo {
            domain: domain.to_owned(),
            version: ckpt.manifest.trained_sha256.clone(),
            stage: spec.stage,
            step: ckpt.manifest.step,
            job_id: job_id.to_owned(),
            recommender: recommender_name(&spec),
            serving: true,
            prompt_mode: spec.prompt_mode(),
        };
        self.register(Adapter {
            info: info.clone(),
            tensors,
        });
        Ok(info)
    }

    /// Adds an adapter as its domain's serving one (the domain's earlier ones stay loadable
    /// by version).
    fn register(&mut self, adapter: Adapter) {
        for a in &mut self.adapters {
            if a.info.domain == adapter.info.domain {
                a.info.serving = false;
            }
        }
        // Re-registering a domain's version replaces it (zero-shot has one version per domain).
        self.adapters.retain(|a| {
            (&a.info.domain, &a.info.version) != (&adapter.info.domain, &adapter.info.version)
        });
        self.current = None;
        tracing::info!(
            domain = %adapter.info.domain,
            version = %adapter.info.version,
            stage = adapter.info.stage,
            "adapter loaded"
        );
        self.adapters.push(adapter);
        let infos: Vec<AdapterInfo> = self.adapters.iter().map(|a| a.info.clone()).collect();
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = infos;
    }

    /// One tiny forward per path, so the first real request does not pay for lazy init.
    fn warm_up(&mut self) -> Result<(), String> {
        let ids = [1u32, 2, 3, 4];
        let conts = [vec![5u32, 6]];
        let req = [ScoreRequest {
            prompt: &ids,
            continuations: &conts,
        }];
        rsllm_llm::score_batch(&self.model.model, &req, None).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn run(&mut self, rx: &Receiver<Message>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = Vec::new();
            self.accept(first, &mut jobs);
            let deadline = Instant::now() + self.max_wait;
            while jobs.len() < self.max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(m) => self.accept(m, &mut jobs),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
            // Callers that gave up (deadline, cancellation) are not computed for.
            jobs.retain(|j| !j.reply.is_closed());
            // Group by (adapter, task kind), keeping arrival order within a group.
            while let Some(first) = jobs.first() {
                let key = (first.adapter.clone(), first.task.is_rank());
                let (group, rest): (Vec<Job>, Vec<Job>) = jobs
                    .into_iter()
                    .partition(|j| j.adapter == key.0 && j.task.is_rank() == key.1);
                jobs = rest;
                self.run_group(group);
            }
        }
        tracing::info!("model thread stopped");
    }

    fn accept(&mut self, m: Message, jobs: &mut Vec<Job>) {
        match m {
            Message::Job(job) => {
                let depth = self.depth.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
                self.metrics.queue_depth.set(&[], depth as f64);
                jobs.push(job);
            }
            Message::LoadAdapter {
                domain,
                source,
                job_id,
                reply,
            } => {
                // As for batches: a panic fails this load, not the model thread.
                let result =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match source {
                        AdapterSource::ZeroShot => self.add_zero_shot(&domain).and_then(|()| {
                            self.adapters
                                .last()
                                .map(|a| a.info.clone())
                                .ok_or_else(|| "no adapter".to_owned())
                        }),
                        AdapterSource::StageDir(dir) => {
                            read_adapter(&dir).and_then(|(spec, ckpt, tensors)| {
                                self.add(&domain, &dir, spec, ckpt, tensors, &job_id)
                            })
                        }
                    }))
                    .unwrap_or_else(|panic| {
                        self.current = None;
                        Err(format!(
                            "loading the adapter panicked: {}",
                            rsllm_common::panic::panic_message(&*panic)
                        ))
                    });
                let _ = reply.send(result);
            }
        }
    }

    fn switch_to(&mut self, version: &str) -> Result<(), EngineError> {
        let index = self
            .adapters
            .iter()
            .position(|a| a.info.version == version)
            .ok_or_else(|| EngineError::UnknownAdapter(version.to_owned()))?;
        if self.current == Some(index) {
            return Ok(());
        }
        let tensors = self.adapters[index]
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        rsllm_trainer::train_loop::restore(&self.live, tensors, Path::new(version))
            .map_err(|e| EngineError::Model(e.to_string()))?;
        self.current = Some(index);
        Ok(())
    }

    fn run_group(&mut self, group: Vec<Job>) {
        if !self.test_delay.is_zero() {
            std::thread::sleep(self.test_delay);
        }
        let n = group.len();
        let rank = group.first().is_some_and(|j| j.task.is_rank());
        self.metrics
            .batch_size
            .observe(&[if rank { "rank" } else { "generate" }], n as f64);
        // A panic in libtorch or the tokenizer fails this batch, not the only model thread
        // (every later call would be UNAVAILABLE while health still said SERVING). The live
        // adapter weights may be half-restored: the next batch restores them again.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.compute(&group)))
                .unwrap_or_else(|panic| {
                    self.current = None;
                    Err(EngineError::Model(format!(
                        "panicked: {}",
                        rsllm_common::panic::panic_message(&*panic)
                    )))
                });
        match outcome {
            Ok(outputs) => {
                for (job, out) in group.into_iter().zip(outputs) {
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = n, "batch failed");
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn compute(&mut self, group: &[Job]) -> Result<Vec<JobOutput>, EngineError> {
        let Some(first) = group.first() else {
            return Ok(Vec::new());
        };
        self.switch_to(&first.adapter.clone())?;
        let _guard = tch::no_grad_guard();
        let model_err = |e: rsllm_llm::LlmError| match e {
            rsllm_llm::LlmError::Invalid(m) => EngineError::Invalid(m),
            other @ (rsllm_llm::LlmError::Gguf(_)
            | rsllm_llm::LlmError::Torch(_)
            | rsllm_llm::LlmError::Io { .. }
            | rsllm_llm::LlmError::BadModel { .. }
            | rsllm_llm::LlmError::Tokenizer(_)) => EngineError::Model(other.to_string()),
        };
        let (overrides, projected) = self.overrides(group)?;
        let mut outputs: Vec<JobOutput> = projected
            .into_iter()
            .map(|p| JobOutput {
                projected: p,
                batch_size: group.len(),
                ..JobOutput::default()
            })
            .collect();
        if first.task.is_rank() {
            let empty = Vec::new();
            let requests: Vec<ScoreRequest<'_>> = group
                .iter()
                .map(|j| ScoreRequest {
                    prompt: &j.input_ids,
                    continuations: match &j.task {
                        Task::Rank { continuations } => continuations,
                        Task::Generate => &empty,
                    },
                })
                .collect();
            let scores = rsllm_llm::score_batch(&self.model.model, &requests, overrides.as_ref())
                .map_err(model_err)?;
            for (out, s) in outputs.iter_mut().zip(scores) {
                out.scores = s.iter().map(|c| (c.sum_logprob, c.mean_logprob)).collect();
            }
        } else {
            let prompts: Vec<Vec<u32>> = group.iter().map(|j| j.input_ids.clone()).collect();
            let options = GenerateOptions {
                max_new_tokens: self.max_new_tokens,
                sampling: Sampling::Greedy,
                stop_on_eos: true,
                stop_on_newline: true,
                stop_strings: Vec::new(),
            };
            let generated = rsllm_llm::generate_with(
                &self.model.model,
                &self.model.tokenizer,
                &prompts,
                overrides.as_ref(),
                &options,
            )
            .map_err(model_err)?;
            for (out, g) in outputs.iter_mut().zip(generated) {
                out.text = g.text;
            }
        }
        Ok(outputs)
    }

    /// The slot overrides of a batch: cached projections as given, raw vectors projected here
    /// in one pass (and returned per job for the cache).
    #[allow(clippy::type_complexity)]
    fn overrides(
        &self,
        group: &[Job],
    ) -> Result<(Option<SlotOverrides>, Vec<Vec<(u32, Vec<f32>)>>), EngineError> {
        let device = self.model.model.device();
        let hidden = self.model.model.config.hidden_size;
        let mut projected_out: Vec<Vec<(u32, Vec<f32>)>> = vec![Vec::new(); group.len()];
        let (mut rows, mut positions) = (Vec::new(), Vec::new());
        let mut cached: Vec<f32> = Vec::new();
        let mut raw: Vec<f32> = Vec::new();
        // For each slot: Ok(index into cached rows) or Err(index into raw rows).
        let mut source: Vec<Result<usize, usize>> = Vec::new();
        let mut raw_owner: Vec<Option<(usize, u32)>> = Vec::new();
        for (r, job) in group.iter().enumerate() {
            for slot in &job.slots {
                if slot.position >= job.input_ids.len() {
                    return Err(EngineError::Invalid(format!(
                        "slot position {} is beyond the prompt's {} tokens",
                        slot.position,
                        job.input_ids.len()
                    )));
                }
                rows.push(r as i64);
                positions.push(slot.position as i64);
                match &slot.vector {
                    SlotVector::Projected(v) => {
                        if v.len() != hidden {
                            return Err(EngineError::Invalid(format!(
                                "cached projection of item {} has {} values, the model {hidden}",
                                slot.item,
                                v.len()
                            )));
                        }
                        source.push(Ok(cached.len() / hidden));
                        cached.extend_from_slice(v);
                    }
                    SlotVector::Raw(v) | SlotVector::UserState(v) => {
                        let user = matches!(slot.vector, SlotVector::UserState(_));
                        if v.len() != self.d_id {
                            return Err(EngineError::Invalid(format!(
                                "{} has {} values, the projector takes {}",
                                if user {
                                    "the user state".to_owned()
                                } else {
                                    format!("item {}'s recommender vector", slot.item)
                                },
                                v.len(),
                                self.d_id
                            )));
                        }
                        source.push(Err(raw.len() / self.d_id));
                        raw.extend_from_slice(v);
                        raw_owner.push((!user).then_some((r, slot.item)));
                    }
                }
            }
        }
        if rows.is_empty() {
            return Ok((None, projected_out));
        }
        let t = |e: tch::TchError| EngineError::Model(e.to_string());
        let h = hidden as i64;
        let cached_t = Tensor::f_from_slice(&cached)
            .and_then(|x| x.f_view([-1, h]))
            .and_then(|x| x.f_to_device(device))
            .map_err(t)?;
        let projected_t = if raw.is_empty() {
            Tensor::f_zeros([0, h], (Kind::Float, device)).map_err(t)?
        } else {
            let input = Tensor::f_from_slice(&raw)
                .and_then(|x| x.f_view([-1, self.d_id as i64]))
                .and_then(|x| x.f_to_device(device))
                .map_err(t)?;
            let p = self
                .heads
                .projector
                .forward(&input)
                .map_err(|e| EngineError::Model(e.to_string()))?
                .f_to_kind(Kind::Float)
                .map_err(t)?;
            let flat = Vec::<f32>::try_from(
                p.f_to_device(Device::Cpu)
                    .and_then(|x| x.f_flatten(0, -1))
                    .map_err(t)?,
            )
            .map_err(t)?;
            for (i, owner) in raw_owner.iter().enumerate() {
                if let Some((r, item)) = owner {
                    projected_out[*r].push((*item, flat[i * hidden..(i + 1) * hidden].to_vec()));
                }
            }
            p
        };
        let order: Vec<Tensor> = source
            .iter()
            .map(|s| match s {
                Ok(i) => cached_t.get(*i as i64),
                Err(i) => projected_t.get(*i as i64),
            })
            .collect();
        let vectors = Tensor::f_stack(&order, 0)
            .and_then(|x| x.f_to_kind(self.model.model.kind()))
            .map_err(t)?;
        let to_dev = |v: &[i64]| {
            Tensor::f_from_slice(v)
                .and_then(|x| x.f_to_device(device))
                .map_err(t)
        };
        Ok((
            Some(SlotOverrides {
                batch: to_dev(&rows)?,
                position: to_dev(&positions)?,
                vectors,
            }),
            projected_out,
        ))
    }
}
