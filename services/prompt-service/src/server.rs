//! Server assembly: health, reflection, the API, domain loading, metrics and graceful shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex};

use rsllm_common::health::Readiness;
use rsllm_common::metrics::Registry;
use rsllm_core::Paths;
use rsllm_itemvec::{Reader, ReaderConfig};
use rsllm_proto::v1::PROMPT_SERVICE_NAME;
use rsllm_proto::v1::prompt_service_server::PromptServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::domains::Domains;
use crate::error::StartError;
use crate::grpc::{ApiState, Limits, PromptApi};

/// Serves on `listener` until `shutdown` resolves, then drains. The tokenizer and the domains
/// load on a blocking thread after the listener is up (health NOT_SERVING until then); a load
/// failure stops the server and is returned.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    config.validate()?;
    let specs = config.domain_specs()?;
    let tokenizer = config
        .tokenizer
        .clone()
        .or_else(rsllm_prompt::tokenizer::default_model_path)
        .ok_or_else(|| {
            StartError::Config("--tokenizer: no default (set HOME or RSLLM_CACHE_DIR)".into())
        })?;
    let paths = match &config.data_dir {
        Some(dir) => Paths::new(dir, default_cache_dir()),
        None => Paths::from_env().map_err(|e| StartError::Config(e.to_string()))?,
    };

    let mut reader_config = ReaderConfig::new(&config.redis_url, config.embedding_endpoint.clone());
    reader_config.grpc_timeout = config.embedding_timeout();
    if let Some(redis) = reader_config.redis.as_mut() {
        redis.connect_timeout = config.redis_timeout();
        redis.response_timeout = config.redis_timeout();
    }
    reader_config.decorate = Some(rsllm_common::telemetry::inject_into);
    let reader = Reader::new(reader_config)?;
    let registry = Registry::new();
    let state = Arc::new(ApiState::new(
        reader,
        Limits {
            max_history_len: config.max_history_len,
            max_candidates: config.max_candidates,
        },
        &registry,
    ));
    let (readiness, health) = Readiness::new(&[PROMPT_SERVICE_NAME]).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = config.metrics_addr()? {
        let mut stop = stop_rx.clone();
        rsllm_common::metrics::spawn_endpoint(addr, registry.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    }

    let load_error: Arc<Mutex<Option<StartError>>> = Arc::new(Mutex::new(None));
    {
        let (state, readiness, stop_tx, load_error) = (
            state.clone(),
            readiness.clone(),
            stop_tx.clone(),
            load_error.clone(),
        );
        tokio::spawn(async move {
            tracing::info!(tokenizer = %tokenizer.display(), "loading tokenizer and domains");
            let loaded =
                tokio::task::spawn_blocking(move || Domains::load(&tokenizer, &specs, &paths))
                    .await
                    .unwrap_or_else(|e| Err(StartError::LoadPanicked(e.to_string())));
            match loaded {
                Ok(domains) => {
                    state.set_domains(Arc::new(domains));
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
                    tracing::error!(error = %e, "cannot load; shutting down");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = stop_tx.send(true);
                }
            }
        });
    }

    let api = PromptServiceServer::new(PromptApi::new(state))
        .max_decoding_message_size(config.max_request_bytes);
    let reflection_v1 = rsllm_common::reflection::v1(&[PROMPT_SERVICE_NAME])?;
    let reflection_v1alpha = rsllm_common::reflection::v1alpha(&[PROMPT_SERVICE_NAME])?;
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

fn default_cache_dir() -> std::path::PathBuf {
    rsllm_core::paths::cache_dir_from_env()
        .unwrap_or_else(|| std::path::PathBuf::from(".cache/rsllm"))
}
