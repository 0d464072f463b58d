//! A trained recommender on disk and in memory.

use std::path::Path;

use rsllm_core::ItemId;
use serde::{Deserialize, Serialize};

use crate::{ModelKind, RecConfig, RecError};

/// `manifest.json` of a recommender artefact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecManifest {
    pub kind: ModelKind,
    /// e.g. "movielens"
    pub dataset: String,
    /// "llara" or "loo"
    pub protocol: String,
    /// The prepared split's version (SplitManifest::version) it was trained on.
    pub split_version: String,
    pub num_items: usize,
    pub config: RecConfig,
    /// sha256 of model.safetensors: the model version caches and responses carry.
    pub version: String,
    /// Validation/test metrics and training summary (epochs, best epoch, seconds).
    pub metrics: serde_json::Value,
}

/// A loaded recommender: the tch module in eval mode plus its manifest. Not `Sync` (tch
/// tensors are not); the service keeps it behind a mutex or on a worker thread.
pub struct RecModel {
    pub manifest: RecManifest,
    // private: the tch VarStore and module
}

impl RecModel {
    /// Loads `dir/manifest.json` and `dir/model.safetensors` on `device`, checking the file
    /// hash against the manifest's version.
    pub fn load(dir: &Path, device: tch::Device) -> Result<RecModel, RecError> {
        let _ = (dir, device);
        todo!("helper C")
    }

    /// An untrained model with seeded random weights (tests, benchmarks, smoke runs). Its
    /// manifest has empty split_version and metrics until saved by the trainer.
    pub fn new_untrained(
        kind: ModelKind,
        config: RecConfig,
        dataset: &str,
        num_items: usize,
        device: tch::Device,
    ) -> Result<RecModel, RecError> {
        let _ = (kind, config, dataset, num_items, device);
        todo!("helper C")
    }

    /// Writes `dir/model.safetensors` then `dir/manifest.json` (both atomically); sets and
    /// returns the manifest with `version` = sha256 of the safetensors bytes.
    pub fn save(&mut self, dir: &Path) -> Result<RecManifest, RecError> {
        let _ = dir;
        todo!("helper C")
    }

    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    pub fn num_items(&self) -> usize {
        self.manifest.num_items
    }

    /// Width of the item vectors (64).
    pub fn dim(&self) -> usize {
        self.manifest.config.dim
    }

    /// History window; longer histories are cut to their last `max_history` items.
    pub fn max_history(&self) -> usize {
        self.manifest.config.max_history
    }

    /// The raw ID vectors (the item-embedding table rows 0..num_items, no padding row),
    /// row-major `num_items x dim`. This is what the LLM's projector consumes.
    pub fn item_embeddings(&self) -> Vec<f32> {
        todo!("helper C")
    }

    /// Scores every item after each history: `histories.len() x num_items`, row-major.
    /// Histories must be non-empty with ids < num_items (the caller validates); longer ones are
    /// cut to their last `max_history` items.
    pub fn score_all(&self, histories: &[Vec<ItemId>]) -> Result<Vec<Vec<f32>>, RecError> {
        let _ = histories;
        todo!("helper C")
    }

    /// Scores given candidates after each history (`candidates[i]` for `histories[i]`).
    pub fn score_candidates(
        &self,
        histories: &[Vec<ItemId>],
        candidates: &[Vec<ItemId>],
    ) -> Result<Vec<Vec<f32>>, RecError> {
        let _ = (histories, candidates);
        todo!("helper C")
    }
}
