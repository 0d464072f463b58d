//! Ranking metrics on candidate sets, with 95% intervals.

use serde::{Deserialize, Serialize};

/// 0-based rank of `scores[target]` among `scores`, pessimistic on ties (every other candidate
/// scoring >= the target ranks above it), so a constant scorer gets HR@1 = 0, not 1.
/// NaN scores rank last.
pub fn rank_of_target(scores: &[f32], target: usize) -> usize {
    let _ = (scores, target);
    todo!("helper A")
}

/// A mean with its 95% interval (Wilson for proportions, normal approximation for NDCG).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanCi {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

/// HR@1, HR@5, NDCG@5 over `n` rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankingMetrics {
    pub n: usize,
    pub hr1: MeanCi,
    pub hr5: MeanCi,
    pub ndcg5: MeanCi,
}

/// Metrics from the 0-based rank of the target in each row.
pub fn ranking_metrics(ranks: &[usize]) -> RankingMetrics {
    let _ = ranks;
    todo!("helper A")
}
