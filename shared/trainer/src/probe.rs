//! The alignment heads' ceiling (ours: a diagnostic beside METHOD.md, not part of the method).
//!
//! On the H100 the alignment heads rank below the recommender whose vectors they read
//! (MovieLens HR@1 0.295 against SASRec's 0.453, docs/results.md). Two things can hold them
//! there: the LLM, which has to carry the user's taste from the prompt to its last hidden
//! state `h`, and the heads themselves (the projector, `W_u`, `W_v`, L_ui's similarity,
//! temperature and negatives, the title vector added to the item side). This probe takes the
//! LLM out and trains the rest exactly as a stage does, so what it reaches is what the heads'
//! design allows when the user side is handed the recommender's knowledge:
//!
//! - user side `u = W_u x`, with `x` either `P(s_u)` ([`ProbeUser::State`]: the frozen
//!   recommender's user state through the projector, what a user slot holds before the
//!   transformer) or the mean of `P(e_j)` over the history ([`ProbeUser::HistoryMean`]: no
//!   sequence model at all, a floor);
//! - item side `v_i = W_v (P(e_i) + t_i)`, or `W_v P(e_i)` without the title vector;
//! - loss: L_ui (InfoNCE, a row's 19 drawn candidates and the batch's other targets as
//!   negatives) plus `lambda_it` L_it, as the objective computes them; AdamW with LLaRA's
//!   warm-up and cosine schedule.
//!
//! It costs no transformer pass: thousands of steps take seconds on a CPU. The evaluation
//! ranks the split's stored candidates by the heads' similarity and, on the same rows, by the
//! recommender's own dot product and cosine.

use std::collections::{BTreeSet, VecDeque};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rsllm_core::dataset::candidates::draw_candidates;
use rsllm_core::metrics::{RankingMetrics, rank_of_target, ranking_metrics};
use rsllm_core::{ItemId, SeqExample};
use rsllm_llm::Llama;
use rsllm_recommender::RecModel;
use rsllm_recommender::eval::{Similarity, evaluate_by, target_ranks_by};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::error::{Result, TrainError};
use crate::losses::{UiNegatives, UiSimilarity, similarity_logits, symmetric_info_nce};
use crate::objective::{ItemTable, RsllmHeads, catalog_ui_loss, ui_loss};
use crate::optim::{AdamW, AdamWConfig, descend};
use crate::schedule::LrSchedule;
use crate::warmup::all_text_vectors;

/// The report's last loss is the mean over this many final steps (one step's loss is noisy).
const LAST_STEPS: usize = 100;

/// What the probe's user side is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeUser {
    /// `P(s_u)`: the recommender's user state after the history.
    State,
    /// The mean of `P(e_j)` over the history's items: a bag of items, no order.
    HistoryMean,
}

/// The probe's settings; [`ProbeConfig::default`] mirrors a stage's L_ui.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeConfig {
    pub steps: u64,
    /// Training rows per step.
    pub batch: usize,
    /// Peak learning rate (warm-up over 5 % of the steps, then cosine decay).
    pub peak_lr: f64,
    pub tau: f64,
    pub similarity: UiSimilarity,
    pub negatives: UiNegatives,
    /// L_it's weight relative to L_ui's (the stage weighs both 0.1, so 1).
    pub lambda_it: f64,
    /// Add the title vector `t_i` to the item side, as the stage does.
    pub item_text: bool,
    pub user: ProbeUser,
    /// Candidates drawn per training row (the target included), as in training.
    pub num_candidates: usize,
    pub seed: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            steps: 2000,
            batch: 64,
            peak_lr: 1e-3,
            tau: 0.07,
            similarity: UiSimilarity::Cosine,
            negatives: UiNegatives::Candidates,
            lambda_it: 1.0,
            item_text: true,
            user: ProbeUser::State,
            num_candidates: 20,
            seed: 1234,
        }
    }
}

/// The probe's ranking of one evaluation part beside the recommender's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbePart {
    pub part: String,
    pub heads: RankingMetrics,
    /// The recommender on the same rows: `s_u . e_i`, and `cos(s_u, e_i)`.
    pub recommender_dot: RankingMetrics,
    pub recommender_cosine: RankingMetrics,
    /// Each row's target rank (0: first) by the heads and by the recommender's dot product,
    /// for paired comparisons between probes and with the recommender.
    pub heads_ranks: Vec<usize>,
    pub recommender_ranks: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub config: ProbeConfig,
    pub train_rows: usize,
    /// L_ui (plus `lambda_it` L_it) at the first step, and its mean over the last 100 steps.
    pub loss_first: f64,
    pub loss_last: f64,
    pub parts: Vec<ProbePart>,
}

/// Everything the probe reads, frozen, on one device.
struct Frozen<'a> {
    /// `[num_items, d_id]` recommender item vectors, f32.
    vectors: Tensor,
    /// `[num_items, d_llm]` title vectors `t_i`.
    text: Tensor,
    recommender: &'a RecModel,
    device: Device,
}

impl Frozen<'_> {
    /// `[N, d_llm]` inputs of the user head for `rows` (gradients flow into the projector).
    fn user_inputs(
        &self,
        heads: &RsllmHeads,
        rows: &[&SeqExample],
        user: ProbeUser,
    ) -> Result<Tensor> {
        match user {
            ProbeUser::State => {
                let histories: Vec<&[ItemId]> = rows.iter().map(|r| r.history.as_slice()).collect();
                let states = self
                    .recommender
                    .user_states(&histories)
                    .map_err(|e| TrainError::Invalid(format!("heads probe: {e}")))?
                    .f_to_device(self.device)?
                    .f_to_kind(Kind::Float)?;
                Ok(heads.projector.forward(&states)?.f_to_kind(Kind::Float)?)
            }
            ProbeUser::HistoryMean => {
                let (mut items, mut owners, mut counts) = (Vec::new(), Vec::new(), Vec::new());
                for (row, example) in rows.iter().enumerate() {
                    if example.history.is_empty() {
                        return Err(TrainError::Invalid(format!(
                            "heads probe: user {} has an empty history",
                            example.user
                        )));
                    }
                    items.extend(example.history.iter().map(|&i| i64::from(i)));
                    owners.extend(std::iter::repeat_n(row as i64, example.history.len()));
                    counts.push(example.history.len() as f32);
                }
                let to_device = |v: &[i64]| -> Result<Tensor> {
                    Ok(Tensor::f_from_slice(v)?.f_to_device(self.device)?)
                };
                let projected = heads
                    .projector
                    .forward(&self.vectors.f_index_select(0, &to_device(&items)?)?)?
                    .f_to_kind(Kind::Float)?;
                let width = projected.size()[1];
                let sums = Tensor::f_zeros([rows.len() as i64, width], (Kind::Float, self.device))?
                    .f_index_add(0, &to_device(&owners)?, &projected)?;
                let counts = Tensor::f_from_slice(&counts)?
                    .f_to_device(self.device)?
                    .f_unsqueeze(1)?;
                Ok(sums.f_div(&counts)?)
            }
        }
    }

    /// Every item id, `[num_items]` on the device.
    fn all_items(&self) -> Result<Tensor> {
        let n = self.vectors.size()[0];
        Ok(Tensor::f_arange(n, (Kind::Int64, self.device))?)
    }

    /// `[K, d_llm]` inputs of the item head for `ids`, and `P(e_i)` (for L_it).
    fn item_inputs(
        &self,
        heads: &RsllmHeads,
        ids: &Tensor,
        item_text: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let projected = heads
            .projector
            .forward(&self.vectors.f_index_select(0, ids)?)?
            .f_to_kind(Kind::Float)?;
        let text = self.text.f_index_select(0, ids)?;
        let inputs = if item_text {
            projected.f_add(&text)?
        } else {
            projected.shallow_clone()
        };
        Ok((inputs, projected, text))
    }
}

/// Heads the probe trained, with what it reads and what its training reported.
pub(crate) struct TrainedProbe<'a> {
    /// Holds the heads' variables.
    store: nn::VarStore,
    pub heads: RsllmHeads,
    frozen: Frozen<'a>,
    pub config: ProbeConfig,
    pub train_rows: usize,
    pub loss_first: f64,
    pub loss_last: f64,
}

impl TrainedProbe<'_> {
    /// `[num_items, d_llm]` item vectors `v_i` of every item, without gradients.
    pub fn all_item_vectors(&self) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let all = self.frozen.all_items()?;
        self.heads.item_head(
            &self
                .frozen
                .item_inputs(&self.heads, &all, self.config.item_text)?
                .0,
        )
    }

    /// `[N, d_llm]` user-side inputs of `rows` (the probe's [`ProbeUser`]), without gradients.
    pub fn user_inputs(&self, rows: &[&SeqExample]) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        self.frozen.user_inputs(&self.heads, rows, self.config.user)
    }

    /// The trained variables (projector and heads) under the names a stage's store gives
    /// them, detached, sorted by name.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut named: Vec<(String, Tensor)> = self
            .store
            .variables()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.detach()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// The probe's report: its ranking of each part of `eval` beside the recommender's.
    pub fn report(&self, eval: &[(&str, &[SeqExample])]) -> Result<ProbeReport> {
        let _guard = tch::no_grad_guard();
        let item_vectors = self.all_item_vectors()?;
        let recommender = self.frozen.recommender;
        let mut parts = Vec::with_capacity(eval.len());
        for &(part, rows) in eval {
            let borrowed: Vec<&SeqExample> = rows.iter().collect();
            let u = self.heads.user_vectors(&self.user_inputs(&borrowed)?)?;
            let ranks = candidate_ranks(&u, &item_vectors, rows, part, self.config.similarity)?;
            let recommender_error = |e| TrainError::Invalid(format!("heads probe: {part}: {e}"));
            let recommender_ranks =
                target_ranks_by(recommender, rows, Similarity::Dot).map_err(recommender_error)?;
            parts.push(ProbePart {
                part: part.to_owned(),
                heads: ranking_metrics(&ranks),
                recommender_dot: ranking_metrics(&recommender_ranks),
                recommender_cosine: evaluate_by(recommender, rows, Similarity::Cosine)
                    .map_err(recommender_error)?,
                heads_ranks: ranks,
                recommender_ranks,
            });
        }
        Ok(ProbeReport {
            config: self.config,
            train_rows: self.train_rows,
            loss_first: self.loss_first,
            loss_last: self.loss_last,
            parts,
        })
    }
}

/// Each row's target rank (0: first) among its stored candidates, scored by the similarity of
/// its user vector (`u`, one row per row of `rows`) with `item_vectors` (`[num_items, D]`).
pub(crate) fn candidate_ranks(
    u: &Tensor,
    item_vectors: &Tensor,
    rows: &[SeqExample],
    part: &str,
    similarity: UiSimilarity,
) -> Result<Vec<usize>> {
    let n_items = item_vectors.size()[0];
    // The temperature scales every score of a row alike: it cannot change a ranking.
    let scores = similarity_logits(u, item_vectors, 1.0, similarity)?.f_to_device(Device::Cpu)?;
    let scores = Vec::<Vec<f32>>::try_from(scores)?;
    if scores.len() != rows.len() {
        return Err(TrainError::Invalid(format!(
            "{part}: {} user vectors for {} rows",
            scores.len(),
            rows.len()
        )));
    }
    let mut ranks = Vec::with_capacity(rows.len());
    for (index, (row, row_scores)) in rows.iter().zip(&scores).enumerate() {
        let target = row
            .candidates
            .iter()
            .position(|&c| c == row.target)
            .ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{part} row {index}: the target is not among its stored candidates"
                ))
            })?;
        let mut candidate_scores = Vec::with_capacity(row.candidates.len());
        for &c in &row.candidates {
            let score = row_scores.get(c as usize).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "{part} row {index}: candidate {c} is outside the {n_items} items"
                ))
            })?;
            candidate_scores.push(*score);
        }
        ranks.push(rank_of_target(&candidate_scores, target));
    }
    Ok(ranks)
}

/// Trains fresh heads (projector, `W_u`, `W_v`, seeded by `config.seed`) on `train` and ranks
/// each part of `eval` (name, rows with stored candidates). `items` must hold the recommender
/// whose vectors it holds: the user states come from it.
pub fn probe_heads(
    model: &Llama,
    items: &ItemTable,
    train: &[SeqExample],
    eval: &[(&str, &[SeqExample])],
    config: ProbeConfig,
) -> Result<ProbeReport> {
    train_probe(model, items, train, config)?.report(eval)
}

/// The probe's training: fresh heads on `train`, as [`probe_heads`] describes.
pub(crate) fn train_probe<'a>(
    model: &Llama,
    items: &'a ItemTable,
    train: &[SeqExample],
    config: ProbeConfig,
) -> Result<TrainedProbe<'a>> {
    let Some(recommender) = &items.recommender else {
        return Err(TrainError::Invalid(
            "heads probe: the item table holds no recommender to take user states from".into(),
        ));
    };
    if config.steps == 0 || config.batch == 0 || train.is_empty() {
        return Err(TrainError::Invalid(format!(
            "heads probe: needs steps, batch and training rows ({} steps, batch {}, {} rows)",
            config.steps,
            config.batch,
            train.len()
        )));
    }
    let n_items = items.title_ids.len();
    if items.vectors.size() != [n_items as i64, recommender.dim() as i64] {
        return Err(TrainError::Invalid(format!(
            "heads probe: item vectors {:?} for {n_items} titles and a recommender of width {}",
            items.vectors.size(),
            recommender.dim()
        )));
    }
    let device = model.device();
    let frozen = Frozen {
        vectors: items.vectors.f_to_kind(Kind::Float)?,
        text: all_text_vectors(model, items)?,
        recommender,
        device,
    };
    let store = nn::VarStore::new(device);
    tch::manual_seed(config.seed as i64);
    let heads = RsllmHeads::new(&store.root(), recommender.dim(), model.config.hidden_size);
    let mut optimizer = AdamW::for_var_store(&store, AdamWConfig::default())?;
    let schedule = LrSchedule::llara(config.peak_lr, config.steps, 0.05);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut log = LossLog::default();
    for step in 0..config.steps {
        let mut rows = Vec::with_capacity(config.batch);
        while rows.len() < config.batch {
            if order.is_empty() {
                order = (0..train.len()).collect();
                order.shuffle(&mut rng);
            }
            if let Some(index) = order.pop() {
                rows.push(&train[index]);
            }
        }
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            candidates.push(
                draw_candidates(
                    &row.history,
                    row.target,
                    n_items,
                    config.num_candidates,
                    &mut rng,
                )
                .map_err(|e| TrainError::Invalid(format!("heads probe: {e}")))?,
            );
        }
        let targets: Vec<ItemId> = rows.iter().map(|r| r.target).collect();
        let distinct: Vec<ItemId> = candidates
            .iter()
            .flatten()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let ids: Vec<i64> = distinct.iter().map(|&i| i64::from(i)).collect();
        let ids = Tensor::f_from_slice(&ids)?.f_to_device(device)?;

        optimizer.zero_grad();
        let u = heads.user_vectors(&frozen.user_inputs(&heads, &rows, config.user)?)?;
        let (inputs, projected, text) = frozen.item_inputs(&heads, &ids, config.item_text)?;
        let v = heads.item_head(&inputs)?;
        let mut loss = match config.negatives {
            UiNegatives::Candidates => ui_loss(
                &u,
                &v,
                &distinct,
                (&targets, &candidates),
                (config.tau, config.similarity),
            )?,
            UiNegatives::Catalog => {
                let all = frozen.all_items()?;
                let v_all =
                    heads.item_head(&frozen.item_inputs(&heads, &all, config.item_text)?.0)?;
                catalog_ui_loss(&u, &v_all, &targets, (config.tau, config.similarity))?
            }
        };
        if config.lambda_it > 0.0 {
            let it = symmetric_info_nce(&projected, &text, config.tau)?;
            loss = loss.f_add(&it.f_mul_scalar(config.lambda_it)?)?;
        }
        log.record(descend(
            &mut optimizer,
            &loss,
            schedule.lr(step),
            ("heads probe", step),
        )?);
    }

    Ok(TrainedProbe {
        store,
        heads,
        frozen,
        config,
        train_rows: train.len(),
        loss_first: log.first(),
        loss_last: log.last(),
    })
}

/// A probe's losses as reported: the first step's, and the mean over the last LAST_STEPS.
#[derive(Debug, Default)]
pub(crate) struct LossLog {
    first: Option<f64>,
    recent: VecDeque<f64>,
}

impl LossLog {
    pub fn record(&mut self, value: f64) {
        self.first.get_or_insert(value);
        self.recent.push_back(value);
        if self.recent.len() > LAST_STEPS {
            self.recent.pop_front();
        }
    }

    pub fn first(&self) -> f64 {
        self.first.unwrap_or(f64::NAN)
    }

    pub fn last(&self) -> f64 {
        self.recent.iter().sum::<f64>() / self.recent.len().max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{probe_rows as rows, rng_lock, setup};

    fn config(user: ProbeUser) -> ProbeConfig {
        ProbeConfig {
            steps: 300,
            batch: 12,
            peak_lr: 1e-2,
            user,
            num_candidates: 6,
            ..ProbeConfig::default()
        }
    }

    #[test]
    fn the_heads_learn_to_rank_from_the_user_side_they_are_given() {
        let _rng = rng_lock();
        let s = setup();
        let rows = rows(6);
        for (user, negatives) in [
            (ProbeUser::State, UiNegatives::Candidates),
            (ProbeUser::HistoryMean, UiNegatives::Candidates),
            (ProbeUser::State, UiNegatives::Catalog),
        ] {
            let c = ProbeConfig {
                negatives,
                ..config(user)
            };
            let report = probe_heads(&s.model, &s.items, &rows, &[("train", &rows)], c).unwrap();
            assert_eq!(report.train_rows, 12);
            assert!(report.loss_last < report.loss_first, "{c:?}: {report:?}");
            let part = &report.parts[0];
            assert_eq!((part.part.as_str(), part.heads.n), ("train", 12));
            // Chance is 1/6; the recommender is untrained, its vectors unrelated to the rows.
            assert!(part.heads.hr1.mean >= 0.75, "{c:?}: {part:?}");
        }
        // Seeded: the same settings give the same report.
        let again = |seed| {
            let c = ProbeConfig {
                steps: 20,
                seed,
                ..config(ProbeUser::State)
            };
            probe_heads(&s.model, &s.items, &rows, &[("train", &rows)], c).unwrap()
        };
        assert_eq!(again(3), again(3));
        assert_ne!(again(3).loss_first, again(4).loss_first);
    }

    #[test]
    fn bad_input_is_refused_with_what_was_wrong() {
        let _rng = rng_lock();
        let s = setup();
        let rows = rows(6);
        let mut missing = rows.clone();
        let target = missing[2].target;
        missing[2].candidates.retain(|&c| c != target);
        let err = probe_heads(
            &s.model,
            &s.items,
            &rows,
            &[("test", &missing)],
            config(ProbeUser::State),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("test row 2") && err.contains("not among"),
            "{err}"
        );
        let none = probe_heads(&s.model, &s.items, &[], &[], config(ProbeUser::State))
            .unwrap_err()
            .to_string();
        assert!(none.contains("0 rows"), "{none}");
        let mut outside = rows.clone();
        outside[0].target = 40;
        let err = probe_heads(&s.model, &s.items, &outside, &[], config(ProbeUser::State))
            .unwrap_err()
            .to_string();
        assert!(err.contains("40"), "{err}");
        let without = ItemTable {
            vectors: s.items.vectors.shallow_clone(),
            title_ids: s.items.title_ids.clone(),
            recommender: None,
        };
        let err = probe_heads(&s.model, &without, &rows, &[], config(ProbeUser::State))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no recommender"), "{err}");
    }
}
