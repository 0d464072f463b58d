//! A Redis connection that never hangs its caller for long and stops trying while Redis is
//! down.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};

/// Where Redis is and how long to wait for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Bound on opening a TCP connection.
    pub connect_timeout: Duration,
    /// Bound on one command (or pipeline) round trip.
    pub response_timeout: Duration,
    /// After a connection-level failure, skip Redis for this long before trying again.
    pub retry_after: Duration,
}

impl RedisOptions {
    /// Defaults for request paths: 250 ms connect, 250 ms response, retry after 500 ms.
    pub fn new(url: impl Into<String>) -> RedisOptions {
        RedisOptions {
            url: url.into(),
            connect_timeout: Duration::from_millis(250),
            response_timeout: Duration::from_millis(250),
            retry_after: Duration::from_millis(500),
        }
    }
}

/// Why a Redis call did not produce a value.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis failed recently; the call was not attempted.
    #[error("redis is marked down for another {0:?} after a failure")]
    Skipped(Duration),
    /// The call timed out as a whole (connect plus response).
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
    /// Redis (or the connection to it) returned an error.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
}

/// A cloneable handle on one multiplexed Redis connection (a `ConnectionManager`, created
/// lazily, so constructing it never blocks and works while Redis is down) with bounded
/// timeouts and a circuit breaker.
#[derive(Clone)]
pub struct RedisCache {
    inner: Arc<Inner>,
}

struct Inner {
    options: RedisOptions,
    client: redis::Client,
    conn: RwLock<ConnectionManager>,
    /// Milliseconds since `epoch` until which Redis is skipped (0: not skipped).
    down_until_ms: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &self.inner.options.url)
            .field("available", &self.is_available())
            .finish_non_exhaustive()
    }
}

impl RedisCache {
    /// Parses the URL and prepares a lazy connection; no I/O happens here. Must be called
    /// inside a tokio runtime.
    pub fn new(options: RedisOptions) -> RedisResult<RedisCache> {
        let client = redis::Client::open(options.url.as_str())?;
        let conn = lazy_manager(&client, &options)?;
        Ok(RedisCache {
            inner: Arc::new(Inner {
                options,
                client,
                conn: RwLock::new(conn),
                down_until_ms: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        })
    }

    /// The options this handle was built with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// False while the circuit breaker skips Redis after a recent failure.
    pub fn is_available(&self) -> bool {
        self.skip_remaining().is_none()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn skip_remaining(&self) -> Option<Duration> {
        let until = self.inner.down_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    /// Runs one call on the shared connection, bounded by connect + response timeout.
    /// A connection-level failure opens the breaker for `retry_after` and swaps in a fresh
    /// lazy connection, so the next attempt after the pause reconnects.
    pub async fn run<T, F, Fut>(&self, call: F) -> Result<T, CacheError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if let Some(left) = self.skip_remaining() {
            return Err(CacheError::Skipped(left));
        }
        let conn = match self.inner.conn.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let bound = self.inner.options.connect_timeout + self.inner.options.response_timeout;
        match tokio::time::timeout(bound, call(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_connection_failure(&e) {
                    self.trip();
                }
                Err(CacheError::Redis(e))
            }
            Err(_elapsed) => {
                self.trip();
                Err(CacheError::Timeout(bound))
            }
        }
    }

    /// Marks Redis down for `retry_after` and replaces the connection.
    fn trip(&self) {
        let until = self.now_ms() + as_ms(self.inner.options.retry_after);
        self.inner.down_until_ms.store(until, Ordering::Relaxed);
        match lazy_manager(&self.inner.client, &self.inner.options) {
            Ok(fresh) => match self.inner.conn.write() {
                Ok(mut guard) => *guard = fresh,
                Err(poisoned) => *poisoned.into_inner() = fresh,
            },
            Err(e) => tracing::warn!(error = %e, "cannot prepare a new redis connection"),
        }
    }
}

fn as_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lazy_manager(client: &redis::Client, options: &RedisOptions) -> RedisResult<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout))
        // No internal retry loop: a failed connect returns at once and the breaker paces the
        // next attempt.
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client.clone(), config)
}

/// Errors that say "the connection is unusable" (as opposed to a command error such as
/// WRONGTYPE, which says nothing about Redis being up).
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}
