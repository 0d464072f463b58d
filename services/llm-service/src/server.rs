//! Server assembly: health, reflection, the API, model loading on the model thread, metrics
//! and graceful shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rsllm_common::health::Readiness;
use rsllm_common::metrics::Registry;
use rsllm_itemvec::{RedisCache, RedisOptions};
use rsllm_proto::v1::LLM_SERVICE_NAME;
use rsllm_proto::v1::embedding_service_client::EmbeddingServiceClient;
use rsllm_proto::v1::llm_service_server::LlmServiceServer;
use rsllm_proto::v1::prompt_service_client::PromptServiceClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;
use crate::engine::{self, EngineConfig};
use crate::error::StartError;
use crate::grpc::{ApiState, Limits, LlmApi};
use crate::jobs::Jobs;

/// Largest response (a Recommend with 100 titled items is a few KB; generous headroom).
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// A lazily connecting channel to a dependency. A stopped dependency refuses the connection
/// at once; the connect timeout only bounds an unreachable one, and it is the whole call's
/// bound rather than something shorter: when the model's threads hold both cores, the
/// runtime can be starved past a 1 s connect timeout with the dependency healthy.
fn channel(
    what: &'static str,
    endpoint: &str,
    connect_timeout: Duration,
) -> Result<Channel, StartError> {
    Endpoint::from_shared(endpoint.to_owned())
        .map(|e| {
            e.connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .connect_lazy()
        })
        .map_err(|source| StartError::Endpoint {
            what,
            endpoint: endpoint.to_owned(),
            source,
        })
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight calls. The model
/// loads and warms on its own thread after the listener is up; health is NOT_SERVING until
/// then, and again from the moment shutdown begins. A load failure stops the server and is
/// returned.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    config.validate()?;
    let device = config.tch_device()?;
    let model_path = config
        .model
        .clone()
        .or_else(rsllm_llm::default_model_path)
        .ok_or_else(|| {
            StartError::Config("--model: no default (set HOME or RSLLM_CACHE_DIR)".into())
        })?;
    let prompt = PromptServiceClient::new(channel(
        "prompt-service",
        &config.prompt_endpoint,
        config.dependency_timeout(),
    )?)
    .max_decoding_message_size(MAX_RESPONSE_BYTES);
    let embedding = EmbeddingServiceClient::new(channel(
        "embedding-service",
        &config.embedding_endpoint,
        config.dependency_timeout(),
    )?);
    let redis = if config.redis_url.is_empty() {
        None
    } else {
        Some(
            RedisCache::new(RedisOptions::new(config.redis_url.clone()))
                .map_err(|e| StartError::Redis(e.to_string()))?,
        )
    };
    let registry = Registry::new();
    let state: Arc<OnceLock<Arc<ApiState>>> = Arc::new(OnceLock::new());
    let api = LlmServiceServer::new(LlmApi::new(state.clone(), &registry))
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let (readiness, health) = Readiness::new(&[LLM_SERVICE_NAME]).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = config.metrics_addr() {
        let mut stop = stop_rx.clone();
        rsllm_common::metrics::spawn_endpoint(addr, registry.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    }

    let engine_config = EngineConfig {
        model_path: model_path.clone(),
        device,
        kind: config.dtype.kind(),
        max_batch: config.max_batch,
        max_wait: Duration::from_millis(config.max_wait_ms),
        queue_capacity: config.queue_capacity,
        max_new_tokens: config.max_new_tokens,
        adapters: config.adapter_sources()?,
        test_delay: Duration::from_millis(config.test_delay_ms),
    };
    let limits = Limits {
        max_candidates: config.max_candidates,
        max_history_len: config.max_history_len,
        dependency_timeout: config.dependency_timeout(),
    };
    let jobs_dir = config.resolved_jobs_dir();
    let load_error: Arc<Mutex<Option<StartError>>> = Arc::new(Mutex::new(None));
    {
        let (readiness, stop_tx, load_error) =
            (readiness.clone(), stop_tx.clone(), load_error.clone());
        let registry = registry.clone();
        tokio::spawn(async move {
            tracing::info!(model = %model_path.display(), "loading the model");
            let engine_registry = registry.clone();
            let started =
                tokio::task::spawn_blocking(move || engine::start(engine_config, &engine_registry))
                    .await
                    .unwrap_or_else(|e| Err(format!("loading panicked: {e}")));
            match started {
                Ok(engine) => {
                    let jobs = Jobs::new(
                        jobs_dir,
                        model_path,
                        device,
                        config.dtype.kind(),
                        engine.clone(),
                        &registry,
                    );
                    let _ = state.set(Arc::new(ApiState::new(
                        engine, jobs, prompt, embedding, redis, limits, &registry,
                    )));
                    if *stop_tx.borrow() {
                        return;
                    }
                    readiness.serving().await;
                    if *stop_tx.borrow() {
                        readiness.not_serving().await;
                        return;
                    }
                    tracing::info!("serving");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the model; shutting down");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(StartError::Model(e));
                    let _ = stop_tx.send(true);
                }
            }
        });
    }

    let reflection_v1 = rsllm_common::reflection::v1(&[LLM_SERVICE_NAME])?;
    let reflection_v1alpha = rsllm_common::reflection::v1alpha(&[LLM_SERVICE_NAME])?;
    let served = rsllm_common::server::serve_with_drain(
        listener,
        readiness,
        shutdown,
        stop_tx,
        config.drain_timeout(),
        |incoming, begin_shutdown| {
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(api)
                .serve_with_incoming_shutdown(incoming, begin_shutdown)
        },
    )
    .await;
    if let Some(e) = load_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds `config.listen`, logs `listening on ADDR`, and serves until SIGTERM or ctrl-c.
pub async fn run(config: Config) -> Result<(), StartError> {
    let addr = config.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    tracing::info!(addr = %bound, "listening on {bound}");
    serve(config, listener, rsllm_common::shutdown::signal()).await
}
