//! Writing a model's item vectors to Redis.

use crate::conn::{CacheError, RedisCache};
use crate::{Meta, encode_vector, item_key, meta_key, model_key};

/// Items per MSET command inside the publish pipeline.
const MSET_CHUNK: usize = 512;

/// Publishes item vectors under versioned keys (see the crate docs for the schema).
#[derive(Debug, Clone)]
pub struct Publisher {
    cache: RedisCache,
}

impl Publisher {
    pub fn new(cache: RedisCache) -> Publisher {
        Publisher { cache }
    }

    /// The connection this publisher writes through.
    pub fn cache(&self) -> &RedisCache {
        &self.cache
    }

    /// Writes every vector (`vectors` is row-major `count x dim`, row i = item i), then the
    /// `meta` record, then the `rsllm:model:{name}` pointer, as one pipeline (one round trip).
    /// Order matters: a reader that sees the pointer or the meta finds all vectors.
    pub async fn publish(
        &self,
        name: &str,
        version: &str,
        dim: usize,
        vectors: &[f32],
    ) -> Result<Meta, CacheError> {
        if dim == 0 || !vectors.len().is_multiple_of(dim) {
            return Err(CacheError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "item vectors are not a whole number of rows",
                format!("{} values, dim {dim}", vectors.len()),
            ))));
        }
        let count = vectors.len() / dim;
        let meta = Meta {
            model: name.to_owned(),
            version: version.to_owned(),
            dim: u32::try_from(dim).unwrap_or(u32::MAX),
            count: u32::try_from(count).unwrap_or(u32::MAX),
        };
        let meta_json = serde_json::to_string(&meta).map_err(|e| {
            CacheError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "cannot encode meta",
                e.to_string(),
            )))
        })?;

        let mut pipe = redis::pipe();
        let rows: Vec<(u32, &[f32])> = (0u32..).zip(vectors.chunks_exact(dim)).collect();
        for chunk in rows.chunks(MSET_CHUNK) {
            let cmd = pipe.cmd("MSET");
            for (id, row) in chunk {
                cmd.arg(item_key(version, *id)).arg(encode_vector(row));
            }
            cmd.ignore();
        }
        pipe.cmd("SET")
            .arg(meta_key(version))
            .arg(meta_json)
            .ignore();
        pipe.cmd("SET").arg(model_key(name)).arg(version).ignore();
        self.cache
            .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await?;
        Ok(meta)
    }

    /// Whether the `meta` record of `version` is in Redis (false after a Redis restart,
    /// a FLUSHALL or an eviction: time to republish).
    pub async fn is_published(&self, version: &str) -> Result<bool, CacheError> {
        let key = meta_key(version);
        self.cache
            .run(|mut conn| async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<bool>(&mut conn)
                    .await
            })
            .await
    }

    /// Writes some vectors of `version` (`values` row-major, row i = `ids[i]`); used by
    /// readers to back-fill what they fetched over gRPC. Does not touch meta or the pointer.
    pub async fn write_items(
        &self,
        version: &str,
        ids: &[u32],
        dim: usize,
        values: &[f32],
    ) -> Result<(), CacheError> {
        if ids.is_empty() || dim == 0 || values.len() != ids.len() * dim {
            return Ok(());
        }
        let mut cmd = redis::cmd("MSET");
        for (id, row) in ids.iter().zip(values.chunks_exact(dim)) {
            cmd.arg(item_key(version, *id)).arg(encode_vector(row));
        }
        self.cache
            .run(|mut conn| async move { cmd.query_async::<()>(&mut conn).await })
            .await
    }
}
