//! Ranking metrics on candidate sets, with 95% intervals.

use serde::{Deserialize, Serialize};

/// Two-sided 95% normal quantile.
const Z95: f64 = 1.96;

/// 0-based rank of `scores[target]` among `scores`, pessimistic on ties (every other candidate
/// scoring >= the target ranks above it), so a constant scorer gets HR@1 = 0, not 1.
/// NaN scores rank last: a NaN target is beaten by every other candidate, a NaN elsewhere
/// beats nothing. A `target` outside `scores` gets rank `scores.len()` (a miss everywhere).
pub fn rank_of_target(scores: &[f32], target: usize) -> usize {
    let Some(&target_score) = scores.get(target) else {
        return scores.len();
    };
    if target_score.is_nan() {
        return scores.len() - 1;
    }
    // `>=` is false for NaN, so NaN candidates never count as ranking above the target.
    scores
        .iter()
        .enumerate()
        .filter(|&(index, &score)| index != target && score >= target_score)
        .count()
}

/// A mean with its 95% interval (Wilson for proportions, normal approximation for NDCG).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanCi {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

impl MeanCi {
    const ZERO: MeanCi = MeanCi {
        mean: 0.0,
        low: 0.0,
        high: 0.0,
    };
}

/// HR@1, HR@5, NDCG@5 over `n` rows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankingMetrics {
    pub n: usize,
    pub hr1: MeanCi,
    pub hr5: MeanCi,
    pub ndcg5: MeanCi,
}

/// A proportion `successes / n` with its Wilson score 95% interval, which stays inside [0, 1]
/// and is sensible at 0 and n successes (unlike the normal approximation). `n = 0` gives all
/// zeros rather than NaN. Used for HR@k here and for ValidRatio by the LLM evaluation.
pub fn wilson(successes: usize, n: usize) -> MeanCi {
    if n == 0 {
        return MeanCi::ZERO;
    }
    let n_f = n as f64;
    let p = successes.min(n) as f64 / n_f;
    let z2 = Z95 * Z95;
    let denominator = 1.0 + z2 / n_f;
    let centre = (p + z2 / (2.0 * n_f)) / denominator;
    let half = Z95 * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt() / denominator;
    MeanCi {
        mean: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
    }
}

/// Mean with a normal-approximation 95% interval (sample standard deviation), clamped to
/// [0, 1] because every per-row value here is in [0, 1]. One row gives a zero-width interval.
fn mean_ci_unit(values: &[f64]) -> MeanCi {
    if values.is_empty() {
        return MeanCi::ZERO;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = if values.len() > 1 {
        values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    let half = Z95 * variance.sqrt() / n.sqrt();
    MeanCi {
        mean,
        low: (mean - half).clamp(0.0, 1.0),
        high: (mean + half).clamp(0.0, 1.0),
    }
}

/// NDCG@k of one row with a single relevant item at 0-based `rank`.
pub fn ndcg_at(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0 / ((rank + 2) as f64).log2()
    } else {
        0.0
    }
}

/// Metrics from the 0-based rank of the target in each row.
pub fn ranking_metrics(ranks: &[usize]) -> RankingMetrics {
    let n = ranks.len();
    let hits_at = |k: usize| ranks.iter().filter(|&&rank| rank < k).count();
    let ndcg: Vec<f64> = ranks.iter().map(|&rank| ndcg_at(rank, 5)).collect();
    RankingMetrics {
        n,
        hr1: wilson(hits_at(1), n),
        hr5: wilson(hits_at(5), n),
        ndcg5: mean_ci_unit(&ndcg),
    }
}

/// Two methods' hits on the same rows, compared row by row: the rows only the first gets
/// right, the rows only the second does, and the exact McNemar test's two-sided p over those
/// discordant rows. At the 95-200 test rows of LLaRA's splits the Wilson intervals of two
/// methods overlap even when one is right far more often where they differ: this is the
/// comparison that can tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub only_first: usize,
    pub only_second: usize,
    pub p: f64,
}

/// [`Paired`] for two hit lists over the same rows, or None when their lengths differ (they
/// are not the same rows).
pub fn paired(first: &[bool], second: &[bool]) -> Option<Paired> {
    if first.len() != second.len() {
        return None;
    }
    let count = |a: bool, b: bool| {
        first
            .iter()
            .zip(second)
            .filter(|&(&x, &y)| x == a && y == b)
            .count()
    };
    let (only_first, only_second) = (count(true, false), count(false, true));
    Some(Paired {
        only_first,
        only_second,
        p: exact_mcnemar_p(only_first, only_second),
    })
}

/// Exact two-sided McNemar p: twice the binomial(b + c, 1/2) tail at min(b, c), at most 1.
/// Summed in log space, so thousands of discordant rows do not underflow.
pub fn exact_mcnemar_p(b: usize, c: usize) -> f64 {
    let n = b + c;
    let k = b.min(c);
    let n_ln2 = n as f64 * std::f64::consts::LN_2;
    // ln C(n, i), built up from ln C(n, 0) = 0.
    let mut ln_choose = 0.0;
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose - n_ln2).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-4
    }

    #[test]
    fn ties_are_pessimistic() {
        assert_eq!(rank_of_target(&[1.0, 1.0, 1.0], 0), 2);
        assert_eq!(rank_of_target(&[0.5, 0.9, 0.1], 0), 1);
        assert_eq!(rank_of_target(&[0.5, 0.5, 0.1], 1), 1);
        assert_eq!(rank_of_target(&[0.9, 0.5, 0.1], 0), 0);
        assert_eq!(rank_of_target(&[3.0], 0), 0);
    }

    #[test]
    fn nan_ranks_last() {
        assert_eq!(rank_of_target(&[f32::NAN, 0.1, 0.2], 0), 2);
        assert_eq!(rank_of_target(&[0.3, f32::NAN, 0.2], 0), 0);
        assert_eq!(rank_of_target(&[f32::NAN, f32::NAN], 1), 1);
        assert_eq!(rank_of_target(&[0.3, 0.2], 5), 2);
    }

    #[test]
    fn ndcg_values() {
        assert!(close(ndcg_at(0, 5), 1.0));
        assert!(close(ndcg_at(1, 5), 1.0 / 3f64.log2()));
        assert!(close(ndcg_at(4, 5), 1.0 / 6f64.log2()));
        assert_eq!(ndcg_at(5, 5), 0.0);
        let m = ranking_metrics(&[0, 1, 7, 4]);
        assert_eq!(m.n, 4);
        assert!(close(m.hr1.mean, 0.25));
        assert!(close(m.hr5.mean, 0.75));
        let expected = (1.0 + 1.0 / 3f64.log2() + 0.0 + 1.0 / 6f64.log2()) / 4.0;
        assert!(close(m.ndcg5.mean, expected));
        assert!(m.ndcg5.low <= expected && expected <= m.ndcg5.high);
    }

    #[test]
    fn exact_mcnemar_matches_the_binomial_tail() {
        // 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c), computed exactly in Python.
        assert!(close(exact_mcnemar_p(27, 6), 0.000_324_1));
        assert!(close(exact_mcnemar_p(3, 9), 0.145_996));
        assert!(close(exact_mcnemar_p(7, 5), 0.774_414));
        assert!(close(exact_mcnemar_p(0, 11), 0.000_976_6));
        assert_eq!(exact_mcnemar_p(4, 4), 1.0, "capped at 1");
        assert_eq!(exact_mcnemar_p(0, 0), 1.0, "no discordant row: no evidence");
        // Large counts stay finite (0.5^3000 underflows without the log space).
        let p = exact_mcnemar_p(1400, 1600);
        assert!(p > 0.0 && p < 0.001, "{p}");
    }

    #[test]
    fn paired_counts_the_rows_where_the_two_differ() {
        let first = [true, true, false, false, true];
        let second = [true, false, true, false, false];
        let p = paired(&first, &second).unwrap();
        assert_eq!((p.only_first, p.only_second), (2, 1));
        assert!(close(p.p, 1.0));
        assert_eq!(paired(&first, &second[..4]), None, "not the same rows");
    }

    #[test]
    fn wilson_bounds() {
        // Textbook value: 5 of 10 -> [0.2366, 0.7634].
        let half = wilson(5, 10);
        assert!(close(half.mean, 0.5) && close(half.low, 0.2366) && close(half.high, 0.7634));
        let none = wilson(0, 95);
        assert_eq!(none.low, 0.0);
        assert!(none.high > 0.0 && none.high < 0.05);
        let all = wilson(95, 95);
        assert_eq!(all.high, 1.0);
        assert!(all.low > 0.95 && all.low < 1.0);
        assert_eq!(
            wilson(0, 0),
            MeanCi {
                mean: 0.0,
                low: 0.0,
                high: 0.0
            }
        );
    }

    #[test]
    fn empty_and_single_rows_have_no_nan() {
        let m = ranking_metrics(&[]);
        assert_eq!(m.n, 0);
        for ci in [m.hr1, m.hr5, m.ndcg5] {
            assert_eq!(
                ci,
                MeanCi {
                    mean: 0.0,
                    low: 0.0,
                    high: 0.0
                }
            );
        }
        let one = ranking_metrics(&[0]);
        assert_eq!(
            one.ndcg5,
            MeanCi {
                mean: 1.0,
                low: 1.0,
                high: 1.0
            }
        );
        assert!(!one.hr1.low.is_nan());
    }

    #[test]
    fn ndcg_interval_is_clamped() {
        let m = ranking_metrics(&[0, 0, 0, 9]);
        assert!(m.ndcg5.high <= 1.0 && m.ndcg5.low >= 0.0);
    }
}
