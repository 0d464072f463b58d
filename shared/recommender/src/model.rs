//! Model kinds and hyperparameters.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Sasrec,
    Gru4rec,
    Caser,
}

/// Hyperparameters (LLaRA's defaults: d=64, 1 block, 1 head, history 10, dropout 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecConfig {
    pub dim: usize,
    pub max_history: usize,
    pub dropout: f64,
    pub num_blocks: usize,
    pub num_heads: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation HR@1.
    pub patience: usize,
    pub seed: u64,
}
