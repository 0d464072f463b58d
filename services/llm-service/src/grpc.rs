//! The `rsllm.v1.LlmService` handlers: Recommend's request path (retrieval, prompt, projected
//! vectors, the model thread), Score, and the training-job RPCs.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rsllm_common::metrics::{Counter, Registry, RpcMetrics};
use rsllm_itemvec::RedisCache;
use rsllm_proto::v1 as pb;
use rsllm_proto::v1::embedding_service_client::EmbeddingServiceClient;
use rsllm_proto::v1::llm_service_server::LlmService;
use rsllm_proto::v1::prompt_service_client::PromptServiceClient;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::engine::{AdapterInfo, EngineHandle, Job, JobOutput, SlotInput, SlotVector, Task};
use crate::error::ServiceError;
use crate::jobs::Jobs;

/// Candidates retrieved when a request gives none (LLaRA's 20).
pub const DEFAULT_NUM_CANDIDATES: u32 = 20;

/// Request limits from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_candidates: usize,
    pub max_history_len: usize,
    pub dependency_timeout: Duration,
}

/// Shared by every handler.
pub struct ApiState {
    pub engine: EngineHandle,
    pub jobs: Jobs,
    pub prompt: PromptServiceClient<Channel>,
    pub embedding: EmbeddingServiceClient<Channel>,
    pub redis: Option<RedisCache>,
    pub limits: Limits,
    /// Projected-vector lookups by outcome (`hit`, `miss`, `error`).
    projection_cache: Counter,
}

impl ApiState {
    pub fn new(
        engine: EngineHandle,
        jobs: Jobs,
        prompt: PromptServiceClient<Channel>,
        embedding: EmbeddingServiceClient<Channel>,
        redis: Option<RedisCache>,
        limits: Limits,
        registry: &Registry,
    ) -> ApiState {
        ApiState {
            engine,
            jobs,
            prompt,
            embedding,
            redis,
            limits,
            projection_cache: registry.counter(
                "rsllm_llm_projection_cache_total",
                "Projected ID-vector lookups in Redis by outcome (hit, miss, error).",
                &["outcome"],
            ),
        }
    }
}

/// The tonic service. Its state is set once the model is loaded and warm; until then every
/// call is UNAVAILABLE.
#[derive(Clone)]
pub struct LlmApi {
    state: Arc<OnceLock<Arc<ApiState>>>,
    metrics: RpcMetrics,
}

/// What Recommend and Score share: a validated request resolved to an adapter, candidates and
/// a prompt.
struct Prepared {
    adapter: AdapterInfo,
    candidates: Vec<u32>,
    prompt: pb::BuildPromptResponse,
    retrieval_version: String,
}

fn no_duplicates(field: &str, ids: &[u32]) -> Result<(), ServiceError> {
    let mut seen = std::collections::HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        if let Some(first) = seen.insert(*id, i) {
            return Err(ServiceError::Invalid(format!(
                "{field}[{i}] = {id} repeats {field}[{first}]"
            )));
        }
    }
    Ok(())
}

impl LlmApi {
    pub fn new(state: Arc<OnceLock<Arc<ApiState>>>, registry: &Registry) -> LlmApi {
        LlmApi {
            state,
            metrics: RpcMetrics::new(registry, pb::LLM_SERVICE_NAME),
        }
    }

    /// The state, once the model is loaded; UNAVAILABLE before.
    fn loaded(&self) -> Result<&Arc<ApiState>, ServiceError> {
        self.state.get().ok_or_else(|| {
            ServiceError::Unavailable("the model is still loading; retry shortly".into())
        })
    }

    fn timeout(&self, metadata: &tonic::metadata::MetadataMap) -> Duration {
        rsllm_common::server::bounded(
            self.loaded()
                .map_or(Duration::from_secs(5), |s| s.limits.dependency_timeout),
            metadata,
        )
    }

    /// Validation, adapter, retrieval (when no candidates), then the prompt.
    async fn prepare(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        domain: &str,
        history: &[u32],
        mut candidates: Vec<u32>,
        num_candidates: Option<u32>,
        adapter_version: Option<&str>,
    ) -> Result<Prepared, ServiceError> {
        let loaded = self.loaded()?.clone();
        let limits = loaded.limits;
        if domain.is_empty() {
            return Err(ServiceError::Invalid("domain is empty".into()));
        }
        if history.is_empty() {
            return Err(ServiceError::Invalid(
                "history is empty: at least one item is needed".into(),
            ));
        }
        if history.len() > limits.max_history_len {
            return Err(ServiceError::Invalid(format!(
                "history has {} items, more than the limit of {}",
                history.len(),
                limits.max_history_len
            )));
        }
        if candidates.len() > limits.max_candidates {
            return Err(ServiceError::Invalid(format!(
                "candidates has {} items, more than the limit of {}",
                candidates.len(),
                limits.max_candidates
            )));
        }
        no_duplicates("candidates", &candidates)?;
        let adapter = loaded
            .engine
            .adapter(domain, adapter_version)
            .ok_or_else(|| match adapter_version {
                Some(v) => ServiceError::NotFound(format!(
                    "adapter_version = {v:?}: no such adapter for domain {domain:?}"
                )),
                None => ServiceError::NotFound(format!(
                    "domain = {domain:?}: not served here (served: {})",
                    loaded.engine.domains()
                )),
            })?;
        let mut retrieval_version = String::new();
        if candidates.is_empty() {
            let n = num_candidates.unwrap_or(DEFAULT_NUM_CANDIDATES);
            if n == 0 || n as usize > limits.max_candidates {
                return Err(ServiceError::Invalid(format!(
                    "num_candidates = {n}: must be 1..={}",
                    limits.max_candidates
                )));
            }
            let mut request = Request::new(pb::TopKRequest {
                model: adapter.recommender.clone(),
                history: history.to_vec(),
                k: n,
                exclude_history: true,
            });
            request.set_timeout(self.timeout(metadata));
            rsllm_common::telemetry::inject(&mut request);
            let top = loaded
                .embedding
                .clone()
                .top_k(request)
                .await
                .map_err(|s| ServiceError::from_dependency("embedding-service", &s))?
                .into_inner();
            candidates = top.items.iter().map(|i| i.item_id).collect();
            retrieval_version = top.model_version;
            if candidates.is_empty() {
                return Err(ServiceError::Invalid(
                    "retrieval found no candidates outside the history".into(),
                ));
            }
        }
        let mode = match adapter.prompt_mode {
            rsllm_prompt::PromptMode::TextOnly => pb::PromptMode::TextOnly,
            rsllm_prompt::PromptMode::Unified => pb::PromptMode::Unified,
            rsllm_prompt::PromptMode::IdOnly => pb::PromptMode::IdOnly,
            rsllm_prompt::PromptMode::UnifiedWithUser => pb::PromptMode::UnifiedWithUser,
            rsllm_prompt::PromptMode::UnifiedWithUserLast => pb::PromptMode::UnifiedWithUserLast,
        };
        let mut request = Request::new(pb::BuildPromptRequest {
            domain: domain.to_owned(),
            history: history.to_vec(),
            candidates: candidates.clone(),
            mode: mode as i32,
            template_index: None,
        });
        request.set_timeout(self.timeout(metadata));
        rsllm_common::telemetry::inject(&mut request);
        let prompt = loaded
            .prompt
            .clone()
            .build_prompt(request)
            .await
            .map_err(|s| ServiceError::from_dependency("prompt-service", &s))?
            .into_inner();
        if prompt.continuations.len() != candidates.len() {
            return Err(ServiceError::internal(
                "reading the prompt",
                "continuations do not match the candidates",
            ));
        }
        Ok(Prepared {
            adapter,
            candidates,
            prompt,
            retrieval_version,
        })
    }

    /// The slot inputs: projected vectors from Redis where cached, raw ones otherwise.
    async fn slots(&self, p: &Prepared) -> Result<Vec<SlotInput>, ServiceError> {
        let prompt = &p.prompt;
        if prompt.slots.is_empty() {
            return Ok(Vec::new());
        }
        let dim = prompt.slot_dim as usize;
        if dim == 0 || prompt.slot_vectors.len() != dim * prompt.slots.len() {
            return Err(ServiceError::internal(
                "reading the prompt",
                format!(
                    "{} slot values for {} slots of width {dim}",
                    prompt.slot_vectors.len(),
                    prompt.slots.len()
                ),
            ));
        }
        // Only item slots are cached (a user slot's vector belongs to this request's history).
        let item_slots: Vec<&pb::IdSlot> = prompt.slots.iter().filter(|s| !s.user).collect();
        let mut cached = self
            .cached_projections(&p.adapter.version, &item_slots)
            .await
            .into_iter();
        Ok(prompt
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let raw = || prompt.slot_vectors[i * dim..(i + 1) * dim].to_vec();
                SlotInput {
                    position: s.position as usize,
                    item: s.item_id,
                    vector: if s.user {
                        SlotVector::UserState(raw())
                    } else {
                        match cached.next().flatten() {
                            Some(v) => SlotVector::Projected(v),
                            None => SlotVector::Raw(raw()),
                        }
                    },
                }
            })
            .collect())
    }

    /// One MGET of the projected vectors; with Redis down or disabled, all None.
    async fn cached_projections(
        &self,
        version: &str,
        slots: &[&pb::IdSlot],
    ) -> Vec<Option<Vec<f32>>> {
        let Some(redis) = self.state.get().and_then(|s| s.redis.as_ref()) else {
            return vec![None; slots.len()];
        };
        let keys: Vec<String> = slots
            .iter()
            .map(|s| rsllm_itemvec::projected_key(version, s.item_id))
            .collect();
        let got = redis
            .run(|mut conn| async move {
                redis::cmd("MGET")
                    .arg(&keys)
                    .query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                    .await
            })
            .await;
        match got {
            Ok(values) => values
                .into_iter()
                .map(|v| {
                    let bytes = v?;
                    let mut out = Vec::new();
                    rsllm_itemvec::decode_vector_into(&bytes, &mut out)?;
                    Some(out)
                })
                .inspect(|v| {
                    let outcome = if v.is_some() { "hit" } else { "miss" };
                    if let Some(loaded) = self.state.get() {
                        loaded.projection_cache.inc(&[outcome]);
                    }
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, "projected-vector cache unavailable");
                if let Some(loaded) = self.state.get() {
                    loaded.projection_cache.inc(&["error"]);
                }
                vec![None; slots.len()]
            }
        }
    }

    /// Writes newly projected vectors to Redis in the background (best effort).
    fn backfill(&self, version: &str, projected: Vec<(u32, Vec<f32>)>) {
        let Some(redis) = self.state.get().and_then(|s| s.redis.clone()) else {
            return;
        };
        if projected.is_empty() {
            return;
        }
        let version = version.to_owned();
        tokio::spawn(async move {
            let written = redis
                .run(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    for (item, v) in &projected {
                        pipe.set(
                            rsllm_itemvec::projected_key(&version, *item),
                            rsllm_itemvec::encode_vector(v),
                        )
                        .ignore();
                    }
                    pipe.query_async::<()>(&mut conn).await
                })
                .await;
            if let Err(e) = written {
                tracing::debug!(error = %e, "projected-vector back-fill failed");
            }
        });
    }

    /// Queues the job on the model thread and waits (bounded by the caller's deadline).
    async fn run_model(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        p: &Prepared,
        task: Task,
    ) -> Result<JobOutput, ServiceError> {
        let slots = self.slots(p).await?;
        let (reply, rx) = oneshot::channel();
        self.loaded()?.engine.submit(Job {
            adapter: p.adapter.version.clone(),
            input_ids: p.prompt.input_ids.clone(),
            slots,
            task,
            reply,
        })?;
        let wait = rsllm_common::server::remaining(metadata);
        let out = match wait {
            Some(left) => tokio::time::timeout(left, rx)
                .await
                .map_err(|_| ServiceError::Deadline("waiting for the model"))?,
            None => rx.await,
        }
        .map_err(|_| ServiceError::Unavailable("the model thread stopped".into()))??;
        Ok(out)
    }

    fn versions(&self, p: &Prepared) -> pb::ModelVersions {
        pb::ModelVersions {
            base_model: self
                .state
                .get()
                .map(|s| s.engine.base().sha256.clone())
                .unwrap_or_default(),
            adapter: p.adapter.version.clone(),
            recommender: if p.prompt.recommender_version.is_empty() {
                p.retrieval_version.clone()
            } else {
                p.prompt.recommender_version.clone()
            },
        }
    }

    async fn recommend_inner(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<pb::RecommendResponse, ServiceError> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let mode = match pb::RecommendMode::try_from(req.mode) {
            Ok(pb::RecommendMode::Ranking) => pb::RecommendMode::Ranking,
            Ok(pb::RecommendMode::Generative) => pb::RecommendMode::Generative,
            Ok(pb::RecommendMode::Unspecified) | Err(_) => {
                return Err(ServiceError::Invalid(format!(
                    "mode = {}: expected RECOMMEND_MODE_RANKING or RECOMMEND_MODE_GENERATIVE",
                    req.mode
                )));
            }
        };
        if req.k == 0 {
            return Err(ServiceError::Invalid("k = 0: must be at least 1".into()));
        }
        if !req.candidates.is_empty() && req.k as usize > req.candidates.len() {
            return Err(ServiceError::Invalid(format!(
                "k = {} is more than the {} candidates given",
                req.k,
                req.candidates.len()
            )));
        }
        if req.candidates.is_empty() && req.k > req.num_candidates.unwrap_or(DEFAULT_NUM_CANDIDATES)
        {
            return Err(ServiceError::Invalid(format!(
                "k = {} is more than num_candidates = {}",
                req.k,
                req.num_candidates.unwrap_or(DEFAULT_NUM_CANDIDATES)
            )));
        }
        let p = self
            .prepare(
                &metadata,
                &req.domain,
                &req.history,
                req.candidates,
                req.num_candidates,
                req.adapter_version.as_deref(),
            )
            .await?;
        let titles: Vec<(u32, String)> = p
            .prompt
            .continuations
            .iter()
            .map(|c| (c.item_id, c.title.clone()))
            .collect();
        let k = req.k as usize;
        let (items, text) = match mode {
            pb::RecommendMode::Generative => {
                let out = self.run_model(&metadata, &p, Task::Generate).await?;
                self.backfill(&p.adapter.version, out.projected);
                let titled: Vec<(u32, &str)> =
                    titles.iter().map(|(c, t)| (*c, t.as_str())).collect();
                let judged = rsllm_trainer::eval::judge_titles(&out.text, &titled, None);
                let items = judged
                    .matches
                    .iter()
                    .take(k)
                    .map(|&id| pb::RecommendedItem {
                        item_id: id,
                        score: 1.0,
                        title: titles
                            .iter()
                            .find(|(c, _)| *c == id)
                            .map(|(_, t)| t.clone())
                            .unwrap_or_default(),
                    })
                    .collect();
                (items, out.text)
            }
            pb::RecommendMode::Ranking | pb::RecommendMode::Unspecified => {
                let continuations = p
                    .prompt
                    .continuations
                    .iter()
                    .map(|c| c.token_ids.clone())
                    .collect();
                let out = self
                    .run_model(&metadata, &p, Task::Rank { continuations })
                    .await?;
                self.backfill(&p.adapter.version, out.projected);
                let mut order: Vec<usize> = (0..out.scores.len()).collect();
                // Best first; ties by prompt order (stable sort).
                order.sort_by(|&a, &b| out.scores[b].0.total_cmp(&out.scores[a].0));
                let items = order
                    .into_iter()
                    .take(k)
                    .map(|i| pb::RecommendedItem {
                        item_id: titles[i].0,
                        score: out.scores[i].0 as f32,
                        title: titles[i].1.clone(),
                    })
                    .collect();
                (items, String::new())
            }
        };
        Ok(pb::RecommendResponse {
            items,
            generated_text: text,
            versions: Some(self.versions(&p)),
            candidates: p.candidates.clone(),
        })
    }

    async fn score_inner(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<pb::ScoreResponse, ServiceError> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        if req.candidates.is_empty() {
            return Err(ServiceError::Invalid(
                "candidates is empty: at least one item is needed".into(),
            ));
        }
        let p = self
            .prepare(
                &metadata,
                &req.domain,
                &req.history,
                req.candidates,
                None,
                req.adapter_version.as_deref(),
            )
            .await?;
        let continuations = p
            .prompt
            .continuations
            .iter()
            .map(|c| c.token_ids.clone())
            .collect();
        let out = self
            .run_model(&metadata, &p, Task::Rank { continuations })
            .await?;
        self.backfill(&p.adapter.version, out.projected);
        Ok(pb::ScoreResponse {
            scores: out.scores.iter().map(|s| s.0 as f32).collect(),
            mean_scores: out.scores.iter().map(|s| s.1 as f32).collect(),
            versions: Some(self.versions(&p)),
        })
    }

    fn list_models_inner(&self) -> Result<pb::LlmServiceListModelsResponse, ServiceError> {
        let loaded = self.loaded()?;
        let base = loaded.engine.base();
        Ok(pb::LlmServiceListModelsResponse {
            base_model: base.path.display().to_string(),
            base_model_version: base.sha256.clone(),
            device: base.device.clone(),
            dtype: base.dtype.clone(),
            adapters: loaded
                .engine
                .adapters()
                .into_iter()
                .map(|a| pb::AdapterInfo {
                    domain: a.domain,
                    version: a.version,
                    stage: u32::from(a.stage),
                    step: a.step,
                    serving: a.serving,
                    job_id: a.job_id,
                })
                .collect(),
            jobs: loaded.jobs.list(),
        })
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>>;

#[tonic::async_trait]
impl LlmService for LlmApi {
    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let span = self.metrics.span("Recommend", request.metadata());
        let handled = self.recommend_inner(request);
        self.metrics
            .observe("Recommend", span, handled)
            .await
            .map(Response::new)
    }

    async fn score(
        &self,
        request: Request<pb::ScoreRequest>,
    ) -> Result<Response<pb::ScoreResponse>, Status> {
        let span = self.metrics.span("Score", request.metadata());
        let handled = self.score_inner(request);
        self.metrics
            .observe("Score", span, handled)
            .await
            .map(Response::new)
    }

    async fn start_training(
        &self,
        request: Request<pb::StartTrainingRequest>,
    ) -> Result<Response<pb::StartTrainingResponse>, Status> {
        let span = self.metrics.span("StartTraining", request.metadata());
        let handled = async move {
            match request.into_inner().spec {
                None => Err(ServiceError::Invalid("spec is missing".into())),
                Some(spec) => self
                    .loaded()
                    .and_then(|loaded| loaded.jobs.start(spec))
                    .map(|job_id| pb::StartTrainingResponse { job_id }),
            }
        };
        self.metrics
            .observe("StartTraining", span, handled)
            .await
            .map(Response::new)
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let span = self.metrics.span("WatchJob", request.metadata());
        let handled = async move {
            let id = request.into_inner().job_id;
            self.loaded()
                .and_then(|loaded| loaded.jobs.watch(&id))
                .map(|mut rx| {
                    let (tx, out) = tokio::sync::mpsc::channel(16);
                    tokio::spawn(async move {
                        loop {
                            let update = rx.borrow_and_update().clone();
                            let done = Jobs::is_terminal(update.state);
                            if tx.send(Ok(update)).await.is_err() || done {
                                return;
                            }
                            if rx.changed().await.is_err() {
                                return;
                            }
                        }
                    });
                    Box::pin(tokio_stream::wrappers::ReceiverStream::new(out)) as WatchStream
                })
        };
        self.metrics
            .observe("WatchJob", span, handled)
            .await
            .map(Response::new)
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let span = self.metrics.span("CancelJob", request.metadata());
        let handled = async move {
            let id = request.into_inner().job_id;
            let mut rx = self.loaded().and_then(|loaded| loaded.jobs.cancel(&id))?;
            // The job stops after its current step; wait for that (bounded), so the answer is
            // the state it ended in.
            let _ = tokio::time::timeout(
                Duration::from_secs(60),
                rx.wait_for(|s| Jobs::is_terminal(s.state)),
            )
            .await;
            let state = rx.borrow().state;
            Ok::<_, ServiceError>(pb::CancelJobResponse { state })
        };
        self.metrics
            .observe("CancelJob", span, handled)
            .await
            .map(Response::new)
    }

    async fn list_models(
        &self,
        request: Request<pb::LlmServiceListModelsRequest>,
    ) -> Result<Response<pb::LlmServiceListModelsResponse>, Status> {
        let span = self.metrics.span("ListModels", request.metadata());
        let handled = async { self.list_models_inner() };
        self.metrics
            .observe("ListModels", span, handled)
            .await
            .map(Response::new)
    }
}
