//! Server assembly: health, reflection, the API, model loading, the Redis publisher, and
//! graceful shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rsllm_common::health::Readiness;
use rsllm_itemvec::{Publisher, RedisCache, RedisOptions};
use rsllm_proto::v1::EMBEDDING_SERVICE_NAME;
use rsllm_proto::v1::embedding_service_server::EmbeddingServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::error::StartError;
use crate::grpc::{ApiState, EmbeddingApi, Limits};
use crate::registry::Registry;

/// Largest response message: 4096 ids of dim 4096 as f32 is 64 MiB.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Where the models come from.
pub enum ModelSource {
    /// Load the artefacts named by the config (`--models-dir`, `--models`) on a blocking
    /// thread after the listener is up; health says NOT_SERVING until they are loaded.
    Config,
    /// Already loaded (tests, benchmarks, embedding in another process): set before the
    /// listener accepts, so the first call is answered.
    Loaded(Registry),
}

/// Serves on `listener` until `shutdown` resolves, then drains in-flight calls (bounded by
/// `--drain-timeout-secs`) and returns. Returns an error if the models cannot be loaded (the
/// server stops at once) or the transport fails.
pub async fn serve(
    config: Config,
    models: ModelSource,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    config.validate()?;
    let device = config.tch_device()?;
    let publisher = if config.redis_url.is_empty() {
        tracing::info!("--redis-url is empty: item vectors will not be published");
        None
    } else {
        let options = RedisOptions {
            url: config.redis_url.clone(),
            connect_timeout: config.redis_timeout(),
            response_timeout: config.redis_timeout(),
            // The check interval paces retries; no extra pause.
            retry_after: Duration::ZERO,
        };
        let cache = RedisCache::new(options).map_err(|source| StartError::RedisUrl {
            url: config.redis_url.clone(),
            source,
        })?;
        Some(Publisher::new(cache))
    };

    let (readiness, health) = Readiness::new(&[EMBEDDING_SERVICE_NAME]).await;
    let state = Arc::new(ApiState::new(
        Limits {
            max_ids: config.max_ids_per_request,
            max_history_len: config.max_history_len,
        },
        Duration::from_millis(config.test_delay_ms),
    ));
    let metrics = rsllm_common::metrics::Registry::new();
    let api = EmbeddingServiceServer::new(EmbeddingApi::with_registry(state.clone(), &metrics))
        .max_decoding_message_size(config.max_request_bytes)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);

    // stop: true once shutdown begins (signal, or failed loading); stops the publisher too.
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = config.metrics_addr()? {
        let mut stop = stop_rx.clone();
        rsllm_common::metrics::spawn_endpoint(addr, metrics.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    }
    let load_error: Arc<Mutex<Option<StartError>>> = Arc::new(Mutex::new(None));
    // A preloaded registry answers from the first accepted call; only loading from the config
    // leaves a window in which calls are UNAVAILABLE.
    let preloaded = match models {
        ModelSource::Loaded(registry) => {
            let registry = Arc::new(registry);
            state.set_registry(registry.clone());
            Some(registry)
        }
        ModelSource::Config => None,
    };

    let loader = {
        let (state, readiness, stop_tx, load_error) = (
            state.clone(),
            readiness.clone(),
            stop_tx.clone(),
            load_error.clone(),
        );
        let (dir, names, max_pending) = (
            config.resolved_models_dir(),
            config.models.clone(),
            config.max_pending_scores,
        );
        let (interval, stop_rx) = (config.redis_check_interval(), stop_rx.clone());
        tokio::spawn(async move {
            let loaded = match preloaded {
                Some(registry) => Ok(registry),
                None => {
                    tracing::info!(dir = %dir.display(), "loading models");
                    tokio::task::spawn_blocking(move || {
                        Registry::load(&dir, &names, device, max_pending).map(Arc::new)
                    })
                    .await
                    .unwrap_or_else(|e| Err(StartError::LoadPanicked(e.to_string())))
                }
            };
            match loaded {
                Ok(registry) => {
                    // No-op for a preloaded registry (already set above).
                    state.set_registry(registry.clone());
                    if *stop_rx.borrow() {
                        return None;
                    }
                    readiness.serving().await;
                    // Shutdown may have begun meanwhile (it sets `stop` before NOT_SERVING):
                    // never leave SERVING behind.
                    if *stop_rx.borrow() {
                        readiness.not_serving().await;
                        return None;
                    }
                    tracing::info!(models = registry.models().len(), "serving");
                    publisher.map(|p| {
                        tokio::spawn(crate::redis_sync::run(p, registry, interval, stop_rx))
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot load models; shutting down");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    let _ = stop_tx.send(true);
                    None
                }
            }
        })
    };

    // Shutdown begins on the signal or on a load failure: health goes NOT_SERVING first, then
    // the server stops accepting and drains.
    let (draining_tx, mut draining_rx) = watch::channel(false);
    let begin_shutdown = {
        let (readiness, stop_tx, mut stop_rx) = (readiness.clone(), stop_tx.clone(), stop_rx);
        async move {
            tokio::select! {
                () = shutdown => {}
                _ = stop_rx.wait_for(|stop| *stop) => {}
            }
            let _ = stop_tx.send(true);
            readiness.not_serving().await;
            let _ = draining_tx.send(true);
            tracing::info!("shutting down: health NOT_SERVING, draining in-flight calls");
        }
    };

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(rsllm_common::reflection::v1(&[EMBEDDING_SERVICE_NAME])?)
        .add_service(rsllm_common::reflection::v1alpha(&[
            EMBEDDING_SERVICE_NAME,
        ])?)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, begin_shutdown);

    let drain_timeout = config.drain_timeout();
    let deadline = async move {
        let _ = draining_rx.wait_for(|d| *d).await;
        tokio::time::sleep(drain_timeout).await;
    };
    let served = tokio::select! {
        r = server => r,
        () = deadline => {
            tracing::warn!(
                secs = drain_timeout.as_secs(),
                "drain timeout: exiting with calls still in flight"
            );
            Ok(())
        }
    };

    let _ = stop_tx.send(true);
    // The loader is done unless shutdown came while models were still loading; then do not
    // wait for it.
    if let Ok(Ok(Some(sync))) = tokio::time::timeout(Duration::from_secs(1), loader).await {
        let _ = tokio::time::timeout(Duration::from_secs(1), sync).await;
    }
    let load_failure = load_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(e) = load_failure {
        return Err(e);
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds `config.listen`, logs `listening on ADDR`, and serves until SIGTERM or ctrl-c.
pub async fn run(config: Config) -> Result<(), StartError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    tracing::info!(%addr, "listening on {addr}");
    serve(
        config,
        ModelSource::Config,
        listener,
        rsllm_common::shutdown::signal(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use rsllm_proto::v1::embedding_service_client::EmbeddingServiceClient;
    use rsllm_proto::v1::{GetItemEmbeddingsRequest, TopKRequest};
    use rsllm_recommender::{ModelKind, RecConfig, RecModel};

    use super::*;
    use crate::registry::LoadedModel;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_a_preloaded_registry_and_stops_on_the_shutdown_future() {
        let mut rc = RecConfig::default_for(ModelKind::Sasrec);
        rc.dim = 8;
        let model =
            RecModel::new_untrained(ModelKind::Sasrec, rc, "t", 20, tch::Device::Cpu).unwrap();
        let expected: Vec<f32> = model.item_embeddings()[3 * 8..4 * 8].to_vec();
        let registry = Registry::from_models(vec![LoadedModel::new("m", model, 4).unwrap()]);

        let mut config = Config::with_models_dir("/nonexistent");
        config.redis_url.clear();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            config,
            ModelSource::Loaded(registry),
            listener,
            async {
                let _ = rx.await;
            },
        ));

        let mut client = EmbeddingServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let got = client
            .get_item_embeddings(GetItemEmbeddingsRequest {
                model: "m".into(),
                item_ids: vec![3],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((got.dim, got.values), (8, expected));
        let top = client
            .top_k(TopKRequest {
                model: "m".into(),
                history: vec![1],
                k: 20,
                exclude_history: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(top.items.len(), 19);

        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
