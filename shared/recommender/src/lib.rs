//! rsllm-recommender: the ID-based sequential recommenders (SASRec, GRU4Rec, Caser) on tch.
//! The embedding-service serves them and the LLM side reads their item vectors (the "ID"
//! half of RSLLM's Text-ID prompts).
//!
//! A trained model is an artefact directory: `model-<sha256 prefix>.safetensors` (HF-style
//! flat names) plus the `manifest.json` that names it; the sha256 of the safetensors file is
//! the model version.
//!
//! - [`train::train`]: trains a kind on a prepared split (cross-entropy over all items, Adam,
//!   early stopping on validation HR@1 over the stored candidates) and writes the artefact.
//! - [`eval::evaluate`]: HR@1, HR@5, NDCG@5 with 95% intervals on stored candidates.
//! - [`RecModel`]: load/save, [`RecModel::item_embeddings`] (the raw item-embedding rows the
//!   LLM projector consumes), [`RecModel::score_all`], [`RecModel::score_candidates`].
//!
//! Histories are oldest-first item ids; the networks see the last `max_history` of them,
//! left-padded with the padding id `num_items`. Scores are the user state dotted with the item
//! vectors (tied output), see [`model`].

pub mod artefact;
pub mod error;
pub mod eval;
pub mod model;
pub mod train;

pub use artefact::{RecManifest, RecModel};
pub use error::RecError;
pub use model::{ModelKind, RecConfig, SeqRecommender};

/// libtorch's random generator is global to the process: a test that seeds it and expects the
/// same draws (an untrained model built twice must be identical) races with every other test
/// drawing from it in parallel. The crate's tests hold this lock, so they draw one at a time.
#[cfg(test)]
pub(crate) fn test_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
