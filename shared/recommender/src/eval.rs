//! Evaluation on the stored candidate sets: each row's candidates are scored by the model and
//! the target's rank among them gives HR@1, HR@5 and NDCG@5 (rsllm_core::metrics, pessimistic
//! on ties).

use rsllm_core::SeqExample;
use rsllm_core::metrics::{RankingMetrics, rank_of_target, ranking_metrics};
use tch::{Device, Kind, Tensor};

use crate::{RecError, RecModel};

/// How a candidate is scored against the user state `s_u`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Similarity {
    /// `s_u . e_i`: how the recommender is trained and how it scores.
    #[default]
    Dot,
    /// `cos(s_u, e_i)`, item norms ignored: how RSLLM's alignment heads rank. A diagnostic of
    /// what ranking by the cosine costs the recommender itself.
    Cosine,
}

/// HR@1, HR@5 and NDCG@5 with 95% intervals over `rows`.
pub fn evaluate(model: &RecModel, rows: &[SeqExample]) -> Result<RankingMetrics, RecError> {
    evaluate_by(model, rows, Similarity::Dot)
}

/// [`evaluate`] with the candidates scored by `similarity`.
pub fn evaluate_by(
    model: &RecModel,
    rows: &[SeqExample],
    similarity: Similarity,
) -> Result<RankingMetrics, RecError> {
    Ok(ranking_metrics(&target_ranks_by(model, rows, similarity)?))
}

/// The 0-based rank of each row's target among its stored candidates. Rows must have
/// candidates that include the target.
pub fn target_ranks(model: &RecModel, rows: &[SeqExample]) -> Result<Vec<usize>, RecError> {
    target_ranks_by(model, rows, Similarity::Dot)
}

/// [`target_ranks`] with the candidates scored by `similarity`.
pub fn target_ranks_by(
    model: &RecModel,
    rows: &[SeqExample],
    similarity: Similarity,
) -> Result<Vec<usize>, RecError> {
    let mut target_positions = Vec::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        target_positions.push(target_position(index, row)?);
    }
    let histories: Vec<&[u32]> = rows.iter().map(|row| row.history.as_slice()).collect();
    let candidates: Vec<&[u32]> = rows.iter().map(|row| row.candidates.as_slice()).collect();
    let mut scores = model.candidate_scores(&histories, &candidates)?;
    if similarity == Similarity::Cosine {
        // The dot products divided by both norms (ids were checked by candidate_scores).
        let norms = |t: Tensor| -> Result<Vec<f32>, RecError> {
            Ok(Vec::<f32>::try_from(
                t.f_to_kind(Kind::Float)?
                    .f_norm_scalaropt_dim(2, [-1i64].as_slice(), false)?
                    .f_to_device(Device::Cpu)?,
            )?)
        };
        let user = norms(model.user_states(&histories)?)?;
        let item = norms(model.item_embedding_tensor()?)?;
        for ((row_scores, row_candidates), user_norm) in
            scores.iter_mut().zip(&candidates).zip(&user)
        {
            for (score, &id) in row_scores.iter_mut().zip(row_candidates.iter()) {
                let norms = user_norm * item[id as usize];
                *score = if norms > 0.0 { *score / norms } else { 0.0 };
            }
        }
    }
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

    /// Cosine ranks by `s_u . e_i / |e_i|`: an item made long (its vector scaled up) climbs
    /// the dot-product ranking to the top, and stays where it was in the cosine one.
    #[test]
    fn cosine_ranking_ignores_item_norms() {
        let _rng = crate::test_rng_lock();
        let model = RecModel::new_untrained(ModelKind::Sasrec, tiny_config(), "t", 30, Device::Cpu)
            .unwrap();
        let history = vec![1u32, 2, 3];
        let candidates: Vec<u32> = (4..16).collect();
        let dots = model
            .score_candidates(
                std::slice::from_ref(&history),
                std::slice::from_ref(&candidates),
            )
            .unwrap()
            .remove(0);
        // The target: the lowest of the candidates the user state points towards.
        let target = (0..candidates.len())
            .filter(|&i| dots[i] > 0.0)
            .min_by(|&a, &b| dots[a].total_cmp(&dots[b]))
            .expect("a candidate with a positive score");
        let rows = vec![row(history, candidates[target], candidates.clone())];
        let cosine_before = target_ranks_by(&model, &rows, Similarity::Cosine).unwrap();
        assert_ne!(target_ranks(&model, &rows).unwrap(), vec![0]);
        tch::no_grad(|| {
            let mut vector = model.net.item_table().get(i64::from(candidates[target]));
            let _ = vector.g_mul_scalar_(1000.0);
        });
        assert_eq!(
            target_ranks(&model, &rows).unwrap(),
            vec![0],
            "dot: now first"
        );
        assert_eq!(
            target_ranks_by(&model, &rows, Similarity::Cosine).unwrap(),
            cosine_before,
            "cosine: unmoved by the length"
        );
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
