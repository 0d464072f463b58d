//! rsllm-itemvec: the fleet's shared copy of recommender item vectors in Redis.
//!
//! The embedding-service publishes the item vectors of every model it loads; the
//! prompt-service (and anything else that needs ID vectors) reads them with one Redis round
//! trip instead of a gRPC hop. Redis is only a cache: the embedding-service answers
//! `GetItemEmbeddings` from memory, and [`Reader`] falls back to that call on a miss or when
//! Redis is down, then back-fills Redis.
//!
//! # Key schema
//!
//! | key | value |
//! |---|---|
//! | `rsllm:itemvec:{model_version}:{item_id}` | the item's vector: `dim` f32 values, little-endian, 4·dim bytes, no header |
//! | `rsllm:itemvec:{model_version}:meta` | JSON [`Meta`]: `{"model","version","dim","count"}`; written after all vectors |
//! | `rsllm:model:{model_name}` | the version currently published for that name; written last |
//! | `rsllm:projvec:{adapter_version}:{item_id}` | the llm-service's projected vector (LLM width, f32 LE), cached on first use |
//!
//! `model_version` is the model's content hash (sha256 hex of its weights file), so a
//! retrained model never serves stale vectors and old versions simply stop being read. Keys
//! have no TTL: run Redis with an eviction policy (`maxmemory-policy allkeys-lru`); an evicted
//! key is a miss that the reader back-fills, an evicted `meta` key makes the service republish.
//! `item_id` is the decimal dataset item id.
//!
//! # Failure behaviour
//!
//! Every Redis call has bounded connect and response timeouts ([`RedisOptions`]), and after
//! a connection-level failure the client skips Redis for [`RedisOptions::retry_after`] (a small
//! circuit breaker), so a dead Redis costs a reader one timeout, not one per call.

mod conn;
mod publisher;
mod reader;

pub use conn::{CacheError, RedisCache, RedisOptions};
pub use publisher::Publisher;
pub use reader::{
    ItemVectors, MetadataHook, Reader, ReaderConfig, ReaderError, ReaderStats, Source,
};
pub use redis::RedisError;

use serde::{Deserialize, Serialize};

/// Prefix of every item-vector key.
pub const ITEMVEC_PREFIX: &str = "rsllm:itemvec";
/// Prefix of the model-name → version pointers.
pub const MODEL_PREFIX: &str = "rsllm:model";

/// Prefix of the llm-service's projected ID vectors.
pub const PROJVEC_PREFIX: &str = "rsllm:projvec";

/// `rsllm:projvec:{adapter_version}:{item_id}`: an item's ID vector after an adapter's
/// projector (LLM hidden width, f32 LE). Keyed by the adapter version, which changes whenever
/// the projector or the recommender it was trained on does.
pub fn projected_key(adapter_version: &str, item_id: u32) -> String {
    format!("{PROJVEC_PREFIX}:{adapter_version}:{item_id}")
}

/// `rsllm:itemvec:{version}:{item_id}`.
pub fn item_key(version: &str, item_id: u32) -> String {
    format!("{ITEMVEC_PREFIX}:{version}:{item_id}")
}

/// `rsllm:itemvec:{version}:meta`.
pub fn meta_key(version: &str) -> String {
    format!("{ITEMVEC_PREFIX}:{version}:meta")
}

/// `rsllm:model:{name}`: holds the version currently published for `name`.
pub fn model_key(name: &str) -> String {
    format!("{MODEL_PREFIX}:{name}")
}

/// True when `model` looks like a version (64 lower-case hex digits, a sha256) rather than a
/// model name, so it can be used in keys directly.
pub fn is_version(model: &str) -> bool {
    model.len() == 64
        && model
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One vector as stored in Redis: f32 little-endian.
pub fn encode_vector(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Appends the f32 values of `bytes` (little-endian) to `out`; `None` when the length is not a
/// multiple of 4.
pub fn decode_vector_into(bytes: &[u8], out: &mut Vec<f32>) -> Option<()> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Some(())
}

/// The `meta` record of one published model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// Model name (artefact directory name).
    pub model: String,
    /// Model version (same as in the key).
    pub version: String,
    /// Vector width.
    pub dim: u32,
    /// Number of items: ids `0..count` are published.
    pub count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_schema() {
        assert_eq!(item_key("abc", 7), "rsllm:itemvec:abc:7");
        assert_eq!(meta_key("abc"), "rsllm:itemvec:abc:meta");
        assert_eq!(
            model_key("movielens-llara-sasrec"),
            "rsllm:model:movielens-llara-sasrec"
        );
    }

    #[test]
    fn vectors_round_trip_as_little_endian_f32() {
        let v = [1.0f32, -2.5, f32::MIN_POSITIVE, 0.0];
        let bytes = encode_vector(&v);
        assert_eq!(bytes.len(), 16);
        assert_eq!(&bytes[..4], &1.0f32.to_le_bytes());
        let mut out = Vec::new();
        decode_vector_into(&bytes, &mut out).unwrap();
        assert_eq!(out, v);
        assert!(decode_vector_into(&bytes[..5], &mut out).is_none());
    }

    #[test]
    fn versions_are_told_from_names() {
        assert!(is_version(&"a".repeat(64)));
        assert!(!is_version("movielens-llara-sasrec"));
        assert!(!is_version(&"A".repeat(64)));
        assert!(!is_version(&"a".repeat(63)));
    }
}
