//! Evaluation on the stored candidate sets: each row's candidates are scored by the model and
//! the target's rank among them gives HR@1, HR@5 and NDCG@5 (rsllm_core::metrics, pessimistic
//! on ties).

use rsllm_core::SeqExample;
use rsllm_core::metrics::{RankingMetrics, rank_of_target, ranking_metrics};

use crate::{RecError, RecModel};

/// HR@1, HR@5 and NDCG@5 with 95% intervals over `rows`.
pub fn evaluate(model: &RecModel, rows: &[SeqExample]) -> Result<RankingMetrics, RecError> {
    Ok(ranking_metrics(&target_ranks(model, rows)?))
}

/// The 0-based rank of each row's target among its stored candidates. Rows must have
/// candidates that include the target.
pub fn target_ranks(model: &RecModel, rows: &[SeqExample]) -> Result<Vec<usize>, RecError> {
    let mut target_positions = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        target_positions.push(target_position(index, row)?);
    }
    let histories: Vec<&[u32]> = rows.iter().map(|row| row.history.as_slice()).collect();
    let candidates: Vec<&[u32]> = rows.iter().map(|row| row.candidates.as_slice()).collect();
    let scores = model.candidate_scores(&histories, &candidates)?;
    Ok(scores
        .iter()
        .zip(target_positions)
        .map(|(row_scores, position)| rank_of_target(row_scores, position))
        .collect())
}

/// Fraction of rows whose target ranks first among its candidates (0 for no rows).
pub fn hit_rate_at_1(model: &RecModel, rows: &[SeqExample]) -> Result<f64, RecError> {
    if rows.is_empty() {
        return Ok(0.0);
    }
    let hits = target_ranks(model, rows)?
        .iter()
        .filter(|&&rank| rank == 0)
        .count();
    Ok(hits as f64 / rows.len() as f64)
}

/// Where the target sits in the row's candidate list.
fn target_position(index: usize, row: &SeqExample) -> Result<usize, RecError> {
    if row.candidates.is_empty() {
        return Err(RecError::Invalid(format!(
            "row {index} (user {}): no stored candidates to rank",
            row.user
        )));
    }
    row.candidates
        .iter()
        .position(|&id| id == row.target)
        .ok_or_else(|| {
            RecError::Invalid(format!(
                "row {index} (user {}): target {} is not among its candidates",
                row.user, row.target
            ))
        })
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::ModelKind;
    use crate::model::tests::tiny_config;

    fn row(history: Vec<u32>, target: u32, candidates: Vec<u32>) -> SeqExample {
        SeqExample {
            user: 0,
            history,
            target,
            candidates,
        }
    }

    #[test]
    fn ranks_agree_with_candidate_scores() {
        let _rng = crate::test_rng_lock();
        let model =
            RecModel::new_untrained(ModelKind::Gru4rec, tiny_config(), "t", 30, Device::Cpu)
                .unwrap();
        let rows = vec![
            row(vec![1, 2], 3, vec![7, 3, 9, 11]),
            row(vec![], 4, vec![4, 5]),
        ];
        let ranks = target_ranks(&model, &rows).unwrap();
        let scores = model
            .score_candidates(&[vec![1, 2]], &[vec![7, 3, 9, 11]])
            .unwrap();
        assert_eq!(ranks[0], rank_of_target(&scores[0], 1));
        assert!(ranks[1] <= 1);
        let metrics = evaluate(&model, &rows).unwrap();
        assert_eq!(metrics.n, 2);
    }

    #[test]
    fn rows_without_their_target_among_candidates_are_rejected() {
        let _rng = crate::test_rng_lock();
        let model =
            RecModel::new_untrained(ModelKind::Caser, tiny_config(), "t", 30, Device::Cpu).unwrap();
        let err = target_ranks(&model, &[row(vec![1], 3, vec![4, 5])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("target 3 is not among"), "{err}");
        let err = target_ranks(&model, &[row(vec![1], 3, vec![])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no stored candidates"), "{err}");
        let err = target_ranks(&model, &[row(vec![1], 31, vec![31])])
            .unwrap_err()
            .to_string();
        assert!(err.contains("item id 31"), "{err}");
    }
}
