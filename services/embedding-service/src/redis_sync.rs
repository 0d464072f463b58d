//! Keeps the loaded models' item vectors published in Redis.
//!
//! Publishes every model right after loading, then every `--redis-check-ms` checks that each
//! model's `meta` key still exists and republishes when it does not (Redis restarted, was
//! flushed, or evicted it). While Redis is unreachable it logs one warning, keeps answering
//! from memory, and retries on the same schedule; when Redis is back it logs that and
//! republishes.

use std::sync::Arc;
use std::time::Duration;

use rsllm_itemvec::{CacheError, Publisher};
use tokio::sync::watch;

use crate::registry::{LoadedModel, Registry};

/// Runs until `stop` turns true (or its sender is dropped).
pub async fn run(
    publisher: Publisher,
    registry: Arc<Registry>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut down = false;
    loop {
        let mut failure = None;
        for model in registry.models() {
            if let Err(e) = ensure_published(&publisher, model).await {
                failure = Some(e);
                break;
            }
        }
        match (failure, down) {
            (Some(e), false) => {
                tracing::warn!(
                    error = %e,
                    retry_ms = interval.as_millis() as u64,
                    "redis unavailable: item vectors are not published; still serving from \
                     memory, will retry"
                );
                down = true;
            }
            (Some(e), true) => tracing::debug!(error = %e, "redis still unavailable"),
            (None, true) => {
                tracing::info!("redis reachable again; item vectors are published");
                down = false;
            }
            (None, false) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

async fn ensure_published(publisher: &Publisher, model: &LoadedModel) -> Result<(), CacheError> {
    if publisher.is_published(&model.version).await? {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let meta = publisher
        .publish(&model.name, &model.version, model.dim, &model.vectors)
        .await?;
    tracing::info!(
        model = %meta.model,
        version = %meta.version,
        items = meta.count,
        dim = meta.dim,
        ms = started.elapsed().as_millis() as u64,
        "published item vectors to redis"
    );
    Ok(())
}
