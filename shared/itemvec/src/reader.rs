//! Reading item vectors: one Redis round trip, gRPC fallback, back-fill.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rsllm_proto::v1::embedding_service_client::EmbeddingServiceClient;
use rsllm_proto::v1::{GetItemEmbeddingsRequest, GetUserStateRequest};
use tonic::transport::{Channel, Endpoint};

use crate::conn::{CacheError, RedisCache, RedisOptions};
use crate::publisher::Publisher;
use crate::{decode_vector_into, is_version, item_key, model_key};

/// Largest gRPC response the reader accepts (4096 ids of dim 4096 would be 64 MiB).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How to reach Redis and the embedding-service.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// Redis to read from; `None` reads over gRPC only.
    pub redis: Option<RedisOptions>,
    /// The embedding-service, e.g. `http://127.0.0.1:50051`.
    pub endpoint: String,
    /// Bound on connecting to the embedding-service.
    pub grpc_connect_timeout: Duration,
    /// Bound on one fallback `GetItemEmbeddings` call.
    pub grpc_timeout: Duration,
    /// Write vectors fetched over gRPC back to Redis (in a background task, best effort).
    pub backfill: bool,
    /// Called on every outgoing `GetItemEmbeddings` request's metadata (e.g. to carry the
    /// caller's trace context).
    pub decorate: Option<MetadataHook>,
}

/// A function that adds entries to an outgoing request's metadata.
pub type MetadataHook = fn(&mut tonic::metadata::MetadataMap);

impl ReaderConfig {
    /// Redis at `redis_url` (default timeouts, see [`RedisOptions::new`]; an empty URL means no
    /// Redis), the service at `endpoint`, 1 s connect and 2 s call timeouts, back-fill on.
    pub fn new(redis_url: &str, endpoint: impl Into<String>) -> ReaderConfig {
        ReaderConfig {
            redis: (!redis_url.is_empty()).then(|| RedisOptions::new(redis_url)),
            endpoint: endpoint.into(),
            grpc_connect_timeout: Duration::from_secs(1),
            grpc_timeout: Duration::from_secs(2),
            backfill: true,
            decorate: None,
        }
    }
}

/// Where a [`Reader::get`] answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Every vector came from Redis (one round trip).
    Redis,
    /// Some from Redis, the missing ones from the embedding-service.
    Mixed,
    /// All from the embedding-service (Redis down, disabled, or the model not published).
    Grpc,
}

/// Vectors for the requested ids, in request order.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemVectors {
    /// Version of the model the vectors belong to.
    pub model_version: String,
    /// Vector width.
    pub dim: usize,
    /// Row-major `ids.len() x dim`: row i is the vector of the i-th requested id.
    pub values: Vec<f32>,
    /// Where they came from.
    pub source: Source,
}

impl ItemVectors {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` (the vector of the i-th requested id).
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        self.values.get(i * self.dim..(i + 1) * self.dim)
    }
}

/// Counters since the reader was built (calls, except where noted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Answered entirely from Redis.
    pub hits: u64,
    /// Redis answered but lacked some or all keys (or the model's version pointer).
    pub misses: u64,
    /// Redis failed, timed out, or was skipped because it failed recently.
    pub redis_errors: u64,
    /// `GetItemEmbeddings` calls made to the embedding-service.
    pub fallbacks: u64,
    /// Item vectors written back to Redis (items, not calls).
    pub backfilled_items: u64,
    /// Back-fill writes that failed.
    pub backfill_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    redis_errors: AtomicU64,
    fallbacks: AtomicU64,
    backfilled_items: AtomicU64,
    backfill_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Why [`Reader::get`] failed: only when the embedding-service itself could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// The embedding-service answered with an error status (code kept, e.g. NOT_FOUND for an
    /// unknown model, INVALID_ARGUMENT for a bad id) or could not be reached (UNAVAILABLE).
    #[error("embedding-service {rpc}: {status}")]
    Grpc {
        rpc: &'static str,
        status: tonic::Status,
    },
    /// The configured endpoint is not a valid URI.
    #[error("invalid embedding-service endpoint {endpoint:?}: {source}")]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    /// The Redis URL could not be parsed.
    #[error("invalid redis url: {0}")]
    RedisUrl(#[from] redis::RedisError),
    /// The service's answer does not fit the request.
    #[error("malformed {rpc} response: {detail}")]
    Malformed { rpc: &'static str, detail: String },
}

impl ReaderError {
    /// The gRPC code a caller should map this to.
    pub fn code(&self) -> tonic::Code {
        match self {
            ReaderError::Grpc { status, .. } => status.code(),
            ReaderError::Endpoint { .. } | ReaderError::RedisUrl(_) => tonic::Code::Internal,
            ReaderError::Malformed { .. } => tonic::Code::Internal,
        }
    }
}

/// Reads item vectors for a model by name or version. Cheap to clone (shared state), safe to
/// use from many tasks at once.
///
/// [`Reader::get`] makes one Redis round trip in the steady state: a pipeline of
/// `GET rsllm:model:{name}` (to notice a newly published version) and `MGET` of the item keys
/// under the last version seen for that name (with a version instead of a name, just the
/// `MGET`). Missing keys are fetched from the embedding-service's `GetItemEmbeddings`, and
/// with Redis down or disabled every call goes there. Whatever came over gRPC is written back
/// to Redis in the background.
#[derive(Debug, Clone)]
pub struct Reader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    redis: Option<RedisCache>,
    backfill: Option<Publisher>,
    client: EmbeddingServiceClient<Channel>,
    grpc_timeout: Duration,
    decorate: Option<MetadataHook>,
    /// Model name → last version seen (from Redis or from the service).
    versions: RwLock<HashMap<String, String>>,
    counters: Counters,
}

enum RedisRead {
    /// Every id found: `(version, dim, values)`.
    Hit(String, usize, Vec<f32>),
    /// Some ids found under `version`; `rows[i]` is `None` for a missing one.
    Partial(String, Vec<Option<Vec<f32>>>),
    /// Nothing usable (no version known, nothing found, or inconsistent values).
    Miss,
}

impl Reader {
    /// Builds the reader; no I/O happens here (Redis and gRPC connect lazily). Must be called
    /// inside a tokio runtime.
    pub fn new(config: ReaderConfig) -> Result<Reader, ReaderError> {
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|source| ReaderError::Endpoint {
                endpoint: config.endpoint.clone(),
                source,
            })?
            .connect_timeout(config.grpc_connect_timeout)
            .timeout(config.grpc_timeout)
            .tcp_nodelay(true);
        let client = EmbeddingServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_RESPONSE_BYTES);
        let redis = config.redis.map(RedisCache::new).transpose()?;
        let backfill = redis
            .as_ref()
            .filter(|_| config.backfill)
            .cloned()
            .map(Publisher::new);
        Ok(Reader {
            inner: Arc::new(Inner {
                redis,
                backfill,
                client,
                grpc_timeout: config.grpc_timeout,
                decorate: config.decorate,
                versions: RwLock::new(HashMap::new()),
                counters: Counters::default(),
            }),
        })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReaderStats {
        let c = &self.inner.counters;
        ReaderStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            redis_errors: c.redis_errors.load(Ordering::Relaxed),
            fallbacks: c.fallbacks.load(Ordering::Relaxed),
            backfilled_items: c.backfilled_items.load(Ordering::Relaxed),
            backfill_errors: c.backfill_errors.load(Ordering::Relaxed),
        }
    }

    /// The gRPC client the fallback uses (shares its connection).
    pub fn client(&self) -> EmbeddingServiceClient<Channel> {
        self.inner.client.clone()
    }

    /// The vectors of `ids` (in order; duplicates allowed) for `model`, a model name
    /// (e.g. `movielens-llara-sasrec`) or a version (sha256 hex).
    ///
    /// Fails only when the vectors are not in Redis and the embedding-service cannot provide
    /// them; the error keeps the service's status code.
    pub async fn get(&self, model: &str, ids: &[u32]) -> Result<ItemVectors, ReaderError> {
        let c = &self.inner.counters;
        if ids.is_empty() {
            // Let the service decide (it rejects an empty list with INVALID_ARGUMENT).
            return self.fetch_all(model, ids).await;
        }
        let Some(redis) = &self.inner.redis else {
            return self.fetch_all(model, ids).await;
        };
        match self.read_redis(redis, model, ids).await {
            Ok(RedisRead::Hit(model_version, dim, values)) => {
                bump(&c.hits, 1);
                Ok(ItemVectors {
                    model_version,
                    dim,
                    values,
                    source: Source::Redis,
                })
            }
            Ok(RedisRead::Partial(version, rows)) => {
                bump(&c.misses, 1);
                self.fill_missing(model, ids, version, rows).await
            }
            Ok(RedisRead::Miss) => {
                bump(&c.misses, 1);
                self.fetch_all(model, ids).await
            }
            Err(e) => {
                bump(&c.redis_errors, 1);
                tracing::debug!(error = %e, "redis read failed, falling back to gRPC");
                self.fetch_all(model, ids).await
            }
        }
    }

    fn known_version(&self, name: &str) -> Option<String> {
        match self.inner.versions.read() {
            Ok(m) => m.get(name).cloned(),
            Err(p) => p.into_inner().get(name).cloned(),
        }
    }

    fn remember_version(&self, name: &str, version: &str) {
        if is_version(name) || self.known_version(name).as_deref() == Some(version) {
            return;
        }
        let mut map = match self.inner.versions.write() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.insert(name.to_owned(), version.to_owned());
    }

    async fn read_redis(
        &self,
        redis: &RedisCache,
        model: &str,
        ids: &[u32],
    ) -> Result<RedisRead, CacheError> {
        if is_version(model) {
            let values = mget(redis, model, ids).await?;
            return Ok(classify(model, values));
        }
        let pointer = model_key(model);
        let (published, values) = match self.known_version(model) {
            Some(known) => {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(pointer);
                pipe.add_command(mget_cmd(&known, ids));
                let (published, values) = redis
                    .run(|mut conn| async move {
                        pipe.query_async::<(Option<String>, Vec<Option<Vec<u8>>>)>(&mut conn)
                            .await
                    })
                    .await?;
                match published {
                    // A newer version was published under this name: read that one instead.
                    Some(p) if p != known => {
                        let values = mget(redis, &p, ids).await?;
                        (p, values)
                    }
                    // Same version, or no pointer (Redis lost it; the versioned keys are
                    // still correct for the version we know).
                    Some(_) | None => (known, values),
                }
            }
            None => {
                let published = redis
                    .run(|mut conn| async move {
                        redis::cmd("GET")
                            .arg(pointer)
                            .query_async::<Option<String>>(&mut conn)
                            .await
                    })
                    .await?;
                let Some(p) = published else {
                    return Ok(RedisRead::Miss);
                };
                let values = mget(redis, &p, ids).await?;
                (p, values)
            }
        };
        self.remember_version(model, &published);
        Ok(classify(&published, values))
    }

    /// Fetches the missing rows of a partial Redis read and merges them in.
    async fn fill_missing(
        &self,
        model: &str,
        ids: &[u32],
        version: String,
        rows: Vec<Option<Vec<f32>>>,
    ) -> Result<ItemVectors, ReaderError> {
        let missing: Vec<u32> = ids
            .iter()
            .zip(&rows)
            .filter(|(_, r)| r.is_none())
            .map(|(&id, _)| id)
            .collect();
        let fetched = self.call_grpc(model, &missing).await?;
        if fetched.model_version != version {
            // The service has moved to another version: Redis' rows are stale, take it all.
            return self.fetch_all(model, ids).await;
        }
        let dim = fetched.dim;
        if rows.iter().flatten().any(|r| r.len() != dim) {
            return self.fetch_all(model, ids).await;
        }
        self.spawn_backfill(&version, missing, dim, fetched.values.clone());
        let mut values = Vec::with_capacity(ids.len() * dim);
        let mut from_grpc = fetched.values.chunks_exact(dim);
        for row in &rows {
            match row {
                Some(r) => values.extend_from_slice(r),
                None => values.extend_from_slice(from_grpc.next().unwrap_or_default()),
            }
        }
        Ok(ItemVectors {
            model_version: version,
            dim,
            values,
            source: Source::Mixed,
        })
    }

    /// Everything over gRPC, then back-fill.
    async fn fetch_all(&self, model: &str, ids: &[u32]) -> Result<ItemVectors, ReaderError> {
        let fetched = self.call_grpc(model, ids).await?;
        self.spawn_backfill(
            &fetched.model_version,
            ids.to_vec(),
            fetched.dim,
            fetched.values.clone(),
        );
        Ok(fetched)
    }

    /// The recommender's user state after `history` (oldest first), from the embedding-service
    /// (never cached: it belongs to one history), with the version of the model that computed
    /// it. Same timeout and request decoration as the item-vector fallback.
    pub async fn user_state(
        &self,
        model: &str,
        history: &[u32],
    ) -> Result<(String, Vec<f32>), ReaderError> {
        let request = self.request(GetUserStateRequest {
            model: model.to_owned(),
            history: history.to_vec(),
        });
        let response = self
            .inner
            .client
            .clone()
            .get_user_state(request)
            .await
            .map_err(|status| ReaderError::Grpc {
                rpc: "GetUserState",
                status,
            })?
            .into_inner();
        if response.values.is_empty() {
            return Err(ReaderError::Malformed {
                rpc: "GetUserState",
                detail: format!("an empty user state from model {model}"),
            });
        }
        self.remember_version(model, &response.model_version);
        Ok((response.model_version, response.values))
    }

    /// A request to the embedding-service with the reader's timeout and decoration.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.inner.grpc_timeout);
        if let Some(decorate) = self.inner.decorate {
            decorate(request.metadata_mut());
        }
        request
    }

    async fn call_grpc(&self, model: &str, ids: &[u32]) -> Result<ItemVectors, ReaderError> {
        bump(&self.inner.counters.fallbacks, 1);
        let request = self.request(GetItemEmbeddingsRequest {
            model: model.to_owned(),
            item_ids: ids.to_vec(),
        });
        let response = self
            .inner
            .client
            .clone()
            .get_item_embeddings(request)
            .await
            .map_err(|status| ReaderError::Grpc {
                rpc: "GetItemEmbeddings",
                status,
            })?
            .into_inner();
        let dim = usize::try_from(response.dim).unwrap_or(usize::MAX);
        if ids.is_empty() && response.values.is_empty() {
            // Nothing asked, nothing to check.
        } else if dim == 0 || Some(response.values.len()) != ids.len().checked_mul(dim) {
            return Err(ReaderError::Malformed {
                rpc: "GetItemEmbeddings",
                detail: format!(
                    "{} values for {} ids of dim {}",
                    response.values.len(),
                    ids.len(),
                    response.dim
                ),
            });
        }
        self.remember_version(model, &response.model_version);
        Ok(ItemVectors {
            model_version: response.model_version,
            dim,
            values: response.values,
            source: Source::Grpc,
        })
    }

    fn spawn_backfill(&self, version: &str, ids: Vec<u32>, dim: usize, values: Vec<f32>) {
        let Some(publisher) = self.inner.backfill.clone() else {
            return;
        };
        if ids.is_empty() || !publisher.cache().is_available() {
            return;
        }
        let reader = self.inner.clone();
        let version = version.to_owned();
        tokio::spawn(async move {
            match publisher.write_items(&version, &ids, dim, &values).await {
                Ok(()) => bump(&reader.counters.backfilled_items, ids.len() as u64),
                Err(e) => {
                    bump(&reader.counters.backfill_errors, 1);
                    tracing::debug!(error = %e, "redis back-fill failed");
                }
            }
        });
    }
}

/// `MGET` of the item keys of `ids` under `version`, built without one allocation per key.
fn mget_cmd(version: &str, ids: &[u32]) -> redis::Cmd {
    use std::fmt::Write;
    let mut cmd = redis::cmd("MGET");
    let mut key = item_key(version, 0);
    let prefix_len = key.len() - 1;
    for &id in ids {
        key.truncate(prefix_len);
        let _ = write!(key, "{id}");
        cmd.arg(key.as_bytes());
    }
    cmd
}

async fn mget(
    redis: &RedisCache,
    version: &str,
    ids: &[u32],
) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
    let cmd = mget_cmd(version, ids);
    redis
        .run(|mut conn| async move { cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await })
        .await
}

/// Sorts an MGET answer into hit / partial / miss. Values of inconsistent or impossible
/// lengths are treated as missing.
fn classify(version: &str, values: Vec<Option<Vec<u8>>>) -> RedisRead {
    let Some(bytes_per_row) = values.iter().flatten().map(Vec::len).next() else {
        return RedisRead::Miss;
    };
    if bytes_per_row == 0 || !bytes_per_row.is_multiple_of(4) {
        return RedisRead::Miss;
    }
    let dim = bytes_per_row / 4;
    if values.iter().all(Option::is_some) {
        let mut out = Vec::with_capacity(values.len() * dim);
        for v in values.iter().flatten() {
            if v.len() != bytes_per_row || decode_vector_into(v, &mut out).is_none() {
                return RedisRead::Miss;
            }
        }
        return RedisRead::Hit(version.to_owned(), dim, out);
    }
    let mut rows = Vec::with_capacity(values.len());
    for v in values {
        match v {
            Some(b) if b.len() == bytes_per_row => {
                let mut row = Vec::with_capacity(dim);
                if decode_vector_into(&b, &mut row).is_none() {
                    return RedisRead::Miss;
                }
                rows.push(Some(row));
            }
            Some(_) => return RedisRead::Miss,
            None => rows.push(None),
        }
    }
    RedisRead::Partial(version.to_owned(), rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode_vector;

    #[test]
    fn classify_sorts_hits_partials_and_misses() {
        let a = encode_vector(&[1.0, 2.0]);
        let b = encode_vector(&[3.0, 4.0]);
        match classify("v", vec![Some(a.clone()), Some(b.clone())]) {
            RedisRead::Hit(v, dim, values) => {
                assert_eq!((v.as_str(), dim), ("v", 2));
                assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0]);
            }
            RedisRead::Partial(..) | RedisRead::Miss => panic!("expected a hit"),
        }
        match classify("v", vec![Some(a.clone()), None]) {
            RedisRead::Partial(_, rows) => assert_eq!(rows, vec![Some(vec![1.0, 2.0]), None]),
            RedisRead::Hit(..) | RedisRead::Miss => panic!("expected a partial read"),
        }
        assert!(matches!(classify("v", vec![None, None]), RedisRead::Miss));
        // A row of another width means the keys are not what we think: read it all again.
        let odd = encode_vector(&[1.0]);
        assert!(matches!(
            classify("v", vec![Some(a), Some(odd)]),
            RedisRead::Miss
        ));
        assert!(matches!(
            classify("v", vec![Some(vec![1, 2, 3])]),
            RedisRead::Miss
        ));
    }

    #[test]
    fn mget_cmd_names_the_versioned_keys() {
        let packed = mget_cmd("v1", &[0, 17, 3]).get_packed_command();
        let expected = redis::cmd("MGET")
            .arg("rsllm:itemvec:v1:0")
            .arg("rsllm:itemvec:v1:17")
            .arg("rsllm:itemvec:v1:3")
            .get_packed_command();
        assert_eq!(packed, expected);
    }

    #[tokio::test]
    async fn reader_builds_without_any_server() {
        let reader = Reader::new(ReaderConfig::new(
            "redis://127.0.0.1:1",
            "http://127.0.0.1:1",
        ))
        .expect("lazy reader");
        assert_eq!(reader.stats(), ReaderStats::default());
        assert!(Reader::new(ReaderConfig::new("not a url", "http://127.0.0.1:1")).is_err());
    }
}
