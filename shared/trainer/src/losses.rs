//! The three terms of METHOD.md's objective, `L = L_lm + lambda_ui L_ui + lambda_it L_it`:
//!
//! - [`lm_loss`]: causal-LM cross-entropy on the answer tokens only;
//! - [`info_nce`] / [`symmetric_info_nce`]: L_it, the projected ID vector P(e_i) against the
//!   item's text vector t_i, positives on the diagonal, the batch's other items negatives;
//! - [`masked_info_nce`]: L_ui, the user vector against item vectors where each row may only
//!   be compared with the keys its mask allows (its 20 candidates and the batch's other
//!   targets).
//!
//! Similarities are cosines divided by the temperature tau (METHOD.md default 0.07); L_ui may
//! keep the item side's length instead ([`UiSimilarity`]).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};

/// Mean cross-entropy of `logits` `[N, V]` against `targets` `[N]` (int64): the LM loss over
/// the answer positions the caller gathered.
pub fn lm_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.size().first().copied().unwrap_or(0);
    if n == 0 || targets.size() != [n] {
        return Err(TrainError::Invalid(format!(
            "LM loss: logits {:?} and targets {:?} must be [N, V] and [N] with N > 0",
            logits.size(),
            targets.size()
        )));
    }
    Ok(logits
        .f_to_kind(Kind::Float)?
        .f_log_softmax(-1, Kind::Float)?
        .f_nll_loss::<Tensor>(targets, None, tch::Reduction::Mean, -100)?)
}

/// Rows of `x` scaled to unit L2 norm, in f32 (a zero row stays zero).
pub(crate) fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    let x = x.f_to_kind(Kind::Float)?;
    let norm = x
        .f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?
        .f_clamp_min(1e-8)?;
    Ok(x.f_div(&norm)?)
}

/// `[N, M]` cosines of each query with each key, divided by `tau`.
pub(crate) fn cosine_logits(queries: &Tensor, keys: &Tensor, tau: f64) -> Result<Tensor> {
    similarity_logits(queries, keys, tau, UiSimilarity::Cosine)
}

/// How L_ui (and the alignment heads' ranking) compares the user vector `u` with an item
/// vector `v_i` (our choice; METHOD.md leaves it open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UiSimilarity {
    /// `cos(u, v_i)`: both lengths ignored.
    #[default]
    Cosine,
    /// `(u / |u|) . v_i`: the item side keeps its length. Ranking by it is ranking by the dot
    /// product (a row's `|u|` is one positive factor); an item's length can carry what holds
    /// for every user, as the recommenders' item norms do on MovieLens (docs/results.md).
    UserNormalised,
}

/// Which items L_ui contrasts a row's target with (our choice; METHOD.md: "the other 19
/// candidates and the batch's other targets").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UiNegatives {
    /// The row's other candidates and the batch's other targets (METHOD.md).
    #[default]
    Candidates,
    /// Every item of the catalog: a softmax over all items, as the recommenders are trained.
    Catalog,
}

/// `[N, M]` similarities of each query with each key under `similarity`, divided by `tau`.
pub(crate) fn similarity_logits(
    queries: &Tensor,
    keys: &Tensor,
    tau: f64,
    similarity: UiSimilarity,
) -> Result<Tensor> {
    // Written so that NaN fails too.
    let positive = tau > 0.0;
    if !positive {
        return Err(TrainError::Invalid(format!(
            "InfoNCE temperature {tau} must be > 0"
        )));
    }
    let (q, k) = (queries.size(), keys.size());
    if q.len() != 2 || k.len() != 2 || q[1] != k[1] || q[0] == 0 || k[0] == 0 {
        return Err(TrainError::Invalid(format!(
            "InfoNCE: queries {q:?} and keys {k:?} must be non-empty [N, d] and [M, d]"
        )));
    }
    let keys = match similarity {
        UiSimilarity::Cosine => l2_normalise(keys)?,
        UiSimilarity::UserNormalised => keys.f_to_kind(Kind::Float)?,
    };
    Ok(l2_normalise(queries)?
        .f_matmul(&keys.f_transpose(0, 1)?)?
        .f_div_scalar(tau)?)
}

/// InfoNCE of `queries` `[N, d]` against `keys` `[M, d]`, row i's positive at
/// `positives[i]` (int64 `[N]`), every other key a negative.
pub fn info_nce(queries: &Tensor, keys: &Tensor, positives: &Tensor, tau: f64) -> Result<Tensor> {
    let logits = cosine_logits(queries, keys, tau)?;
    Ok(logits.f_cross_entropy_loss::<Tensor>(positives, None, tch::Reduction::Mean, -100, 0.0)?)
}

/// L_it: `(InfoNCE(a -> b) + InfoNCE(b -> a)) / 2` with row i of `a` matching row i of `b`.
pub fn symmetric_info_nce(a: &Tensor, b: &Tensor, tau: f64) -> Result<Tensor> {
    let n = a.size().first().copied().unwrap_or(0);
    if b.size().first().copied() != Some(n) {
        return Err(TrainError::Invalid(format!(
            "symmetric InfoNCE needs paired rows: {:?} vs {:?}",
            a.size(),
            b.size()
        )));
    }
    let diagonal = Tensor::f_arange(n, (Kind::Int64, a.device()))?;
    let ab = info_nce(a, b, &diagonal, tau)?;
    let ba = info_nce(b, a, &diagonal, tau)?;
    Ok(ab.f_add(&ba)?.f_div_scalar(2.0)?)
}

/// L_ui: InfoNCE where row i of `queries` is only compared with the keys `allowed[i]`
/// (`[N, M]` bool) marks; the positive must be among them.
pub fn masked_info_nce(
    queries: &Tensor,
    keys: &Tensor,
    positives: &Tensor,
    allowed: &Tensor,
    (tau, similarity): (f64, UiSimilarity),
) -> Result<Tensor> {
    let logits = similarity_logits(queries, keys, tau, similarity)?;
    if allowed.size() != logits.size() {
        return Err(TrainError::Invalid(format!(
            "InfoNCE mask {:?} does not match the similarity matrix {:?}",
            allowed.size(),
            logits.size()
        )));
    }
    let positive_allowed = allowed
        .f_to_kind(Kind::Bool)?
        .f_gather(1, &positives.f_unsqueeze(1)?, false)?
        .f_all()?;
    if !bool::try_from(positive_allowed)? {
        return Err(TrainError::Invalid(
            "an InfoNCE positive is masked out".into(),
        ));
    }
    let masked = logits.f_masked_fill(
        &allowed.f_to_kind(Kind::Bool)?.f_logical_not()?,
        f64::NEG_INFINITY,
    )?;
    Ok(masked.f_cross_entropy_loss::<Tensor>(positives, None, tch::Reduction::Mean, -100, 0.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(values: &[f32], rows: i64) -> Tensor {
        Tensor::from_slice(values).view([rows, -1])
    }

    #[test]
    fn lm_loss_is_the_mean_negative_log_likelihood() {
        let _rng = crate::test_support::rng_lock();
        let logits = t(&[0.0, 0.0, 0.0, 0.0, 10.0, 0.0], 2); // [2, 3]
        let targets = Tensor::from_slice(&[0i64, 1]);
        let loss = lm_loss(&logits, &targets).unwrap().double_value(&[]);
        let first = (3.0f64).ln();
        let second = -(10.0 - (10f64.exp() + 2.0).ln());
        assert!((loss - (first + second) / 2.0).abs() < 1e-5, "{loss}");
        assert!(lm_loss(&logits, &Tensor::from_slice(&[0i64])).is_err());
    }

    #[test]
    fn info_nce_is_low_for_aligned_pairs_and_high_for_shuffled() {
        let _rng = crate::test_support::rng_lock();
        let a = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let aligned = symmetric_info_nce(&a, &(&a * 2.0), 0.07)
            .unwrap()
            .double_value(&[]);
        let shuffled = symmetric_info_nce(&a, &a.roll([1], [0]), 0.07)
            .unwrap()
            .double_value(&[]);
        assert!(aligned < 0.1, "{aligned}");
        assert!(shuffled > 1.0, "{shuffled}");
        // Uniform similarities give log(N).
        let zeros = Tensor::ones([4, 3], (Kind::Float, Device::Cpu));
        let uniform = info_nce(&zeros, &zeros, &Tensor::from_slice(&[0i64, 1, 2, 3]), 1.0)
            .unwrap()
            .double_value(&[]);
        assert!((uniform - 4f64.ln()).abs() < 1e-5);
    }

    #[test]
    fn masked_keys_do_not_count_as_negatives() {
        let _rng = crate::test_support::rng_lock();
        let q = t(&[1.0, 0.0], 1);
        let keys = t(&[1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 3); // key 1 duplicates the positive
        let positive = Tensor::from_slice(&[0i64]);
        let all = Tensor::from_slice(&[true, true, true]).view([1, 3]);
        let without_duplicate = Tensor::from_slice(&[true, false, true]).view([1, 3]);
        let cos = (0.1, UiSimilarity::Cosine);
        let l_all = masked_info_nce(&q, &keys, &positive, &all, cos)
            .unwrap()
            .double_value(&[]);
        let l_masked = masked_info_nce(&q, &keys, &positive, &without_duplicate, cos)
            .unwrap()
            .double_value(&[]);
        assert!(l_all > 0.69 && l_masked < 0.01, "{l_all} {l_masked}");
        let positive_masked = Tensor::from_slice(&[false, true, true]).view([1, 3]);
        let err = masked_info_nce(&q, &keys, &positive, &positive_masked, cos)
            .unwrap_err()
            .to_string();
        assert!(err.contains("positive"), "{err}");
        assert!(info_nce(&q, &keys, &positive, 0.0).is_err());
    }

    #[test]
    fn the_user_normalised_similarity_keeps_the_item_length() {
        let _rng = crate::test_support::rng_lock();
        let q = t(&[3.0, 4.0], 1); // |q| = 5
        let keys = t(&[1.0, 0.0, 10.0, 0.0], 2); // the same direction, lengths 1 and 10
        let logits = |s| {
            Vec::<f32>::try_from(similarity_logits(&q, &keys, 0.5, s).unwrap().view([-1])).unwrap()
        };
        let cosine = logits(UiSimilarity::Cosine);
        assert!((cosine[0] - 0.6 / 0.5).abs() < 1e-6 && (cosine[1] - cosine[0]).abs() < 1e-6);
        let kept = logits(UiSimilarity::UserNormalised);
        assert!((kept[0] - 0.6 / 0.5).abs() < 1e-6, "{kept:?}");
        assert!((kept[1] - 6.0 / 0.5).abs() < 1e-5, "{kept:?}");
        assert!(similarity_logits(&q, &keys, 0.0, UiSimilarity::UserNormalised).is_err());
        // Stage specs written before the option existed read as the cosine.
        let parsed: UiSimilarity = serde_json::from_str("\"user-normalised\"").unwrap();
        assert_eq!(parsed, UiSimilarity::UserNormalised);
    }
}
