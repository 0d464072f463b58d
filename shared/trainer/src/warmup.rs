//! Projector warm-up before stage 2 (our addition beyond METHOD.md, off by default).
//!
//! Stage 2 starts with a projector that stage 1 never trained (text-only prompts carry no
//! slots), so for its first steps the slots hold noise the LLM learns to ignore. On a short
//! device budget that is much of the run. The warm-up trains the projector alone, with no
//! transformer pass, on the two alignments the objective already asks for:
//!
//! - items: L_it over the whole item table, `P(e_i)` against `t_i` (the mean input embedding
//!   of the item's title tokens), symmetric InfoNCE, other items of the batch as negatives;
//! - users (when the prompts have a user slot): `P(s_u)` against the target's `t_i`, every
//!   item of the catalog a negative. The recommender ranks items by `s_u . e_i`; after this,
//!   the user slot looks like the title of the item the recommender expects next, which the
//!   LLM can match against the candidates' titles in its prompt.
//!
//! Everything it reads is frozen (recommender vectors and states, the LLM's input
//! embeddings), so the text side is computed once and a step costs two small matmuls. Seeded:
//! a stage started again from scratch warms up to the same projector.
//!
//! Measured on an H100 (docs/results.md): the hypothesis did not hold. With the warm-up the
//! user-slot model fell from 0.211 to 0.116 HR@1 on MovieLens (paired p = 0.004) and RSLLM
//! did not move: the LM loss, left alone, trains the projector away from the titles (L_it
//! ends near its starting value), and a slot held close to its title tells the LLM nothing
//! the title does not. Hence off by default, kept for experiments.

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rsllm_core::dataset::candidates::draw_candidates;
use rsllm_core::{ItemId, SeqExample};
use rsllm_llm::Llama;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::losses::{info_nce, l2_normalise, symmetric_info_nce};
use crate::objective::{ItemTable, RsllmHeads};
use crate::optim::{AdamW, AdamWConfig, descend};

/// Items and user rows per warm-up step.
const BATCH: usize = 256;
/// A fresh projector in a frozen space: a fixed rate, independent of the stage's schedule.
const LEARNING_RATE: f64 = 1e-3;
/// Every HOLD_OUT-th training row is kept out of the user side's training, to measure it.
const HOLD_OUT: usize = 10;

/// What the warm-up did, written beside the stage as `projector-warmup.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WarmupReport {
    pub steps: u64,
    /// L_it over the step's items, at the first and the last step.
    pub item_loss_first: f64,
    pub item_loss_last: f64,
    /// The user side's InfoNCE at the first and the last step (None without a user slot).
    pub user_loss_first: Option<f64>,
    pub user_loss_last: Option<f64>,
    /// Held-out training rows (every tenth, not trained on) the user side is measured on,
    /// each with `candidates` candidates drawn as for training (the target and negatives
    /// outside the history).
    pub held_out_rows: usize,
    pub candidates: usize,
    /// HR@1 there when the candidate picked is the one whose title vector `t_i` is closest
    /// (cosine) to `P(s_u)`...
    pub user_slot_hr1_by_title: Option<f64>,
    /// ... whose ID slot `P(e_i)` is closest to `P(s_u)` (what the LLM sees side by side in a
    /// prompt) ...
    pub user_slot_hr1_by_slot: Option<f64>,
    /// ... and when the recommender picks (`s_u . e_i`): what the user slot can carry at
    /// most.
    pub recommender_hr1: Option<f64>,
    /// Share of all items whose `P(e_i)` is closer to their own title vector than to any
    /// other item's: how well a slot names its item.
    pub item_own_title_top1: f64,
}

/// `[num_items, d_llm]` text vectors of every item, chunked, without gradients.
pub(crate) fn all_text_vectors(model: &Llama, items: &ItemTable) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let ids: Vec<ItemId> = (0..items.title_ids.len() as ItemId).collect();
    let chunks = ids
        .chunks(512)
        .map(|chunk| items.text_vectors(model, chunk))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_cat(&chunks, 0)?)
}

fn index_tensor(values: &[i64], device: tch::Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?.f_to_device(device)?)
}

/// `k` of `pool` drawn without replacement, as an index tensor on `device`.
fn draw(rng: &mut ChaCha8Rng, pool: &[usize], k: usize, device: tch::Device) -> Result<Tensor> {
    let picked: Vec<i64> = sample(rng, pool.len(), k.min(pool.len()))
        .into_iter()
        .map(|i| pool[i] as i64)
        .collect();
    index_tensor(&picked, device)
}

/// Share of rows whose highest score among their candidates (`candidates` `[N, C]` item
/// ids, the target at column 0) is the target's: `scores` is `[N, items]`.
fn hit_rate_at_1(scores: &Tensor, candidates: &Tensor) -> Result<f64> {
    let hits = scores
        .f_gather(1, candidates, false)?
        .f_argmax(1, false)?
        .f_eq(0)?
        .f_to_kind(Kind::Float)?
        .f_mean(Kind::Float)?;
    Ok(hits.double_value(&[]))
}

/// How long and with what the warm-up runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupConfig {
    pub steps: u64,
    /// Candidates per held-out row when the user side is measured (the target included).
    pub candidates: usize,
    /// InfoNCE temperature (the stage's tau).
    pub tau: f64,
    /// Seeds which items and rows each step draws.
    pub seed: u64,
}

/// Warms `heads.projector` (its variables in `trained`) up on `rows`, the stage's training
/// rows; their user side only when `items` holds the recommender, i.e. the prompts have a
/// user slot.
pub fn warm_up_projector(
    model: &Llama,
    heads: &RsllmHeads,
    trained: &tch::nn::VarStore,
    items: &ItemTable,
    rows: &[SeqExample],
    config: WarmupConfig,
) -> Result<WarmupReport> {
    let WarmupConfig {
        steps,
        candidates,
        tau,
        seed,
    } = config;
    if steps == 0 {
        return Err(TrainError::Invalid(
            "projector warm-up needs at least one step".into(),
        ));
    }
    let device = model.device();
    let n_items = items.title_ids.len();
    if items.vectors.size().first().copied() != Some(n_items as i64) {
        return Err(TrainError::Invalid(format!(
            "projector warm-up: {} item vectors for {n_items} titles",
            items.vectors.size().first().copied().unwrap_or(0)
        )));
    }
    let text = all_text_vectors(model, items)?;
    let vectors = items.vectors.f_to_kind(Kind::Float)?;

    // The user side: every training row's state after its history, computed once.
    let user_side = match &items.recommender {
        Some(recommender) if !rows.is_empty() => {
            let histories: Vec<&[ItemId]> = rows.iter().map(|r| r.history.as_slice()).collect();
            let states = recommender
                .user_states(&histories)
                .map_err(|e| TrainError::Invalid(format!("projector warm-up: {e}")))?
                .f_to_device(device)?
                .f_to_kind(Kind::Float)?;
            let targets: Vec<i64> = rows.iter().map(|r| i64::from(r.target)).collect();
            if let Some(bad) = targets.iter().find(|&&t| t as usize >= n_items) {
                return Err(TrainError::Invalid(format!(
                    "projector warm-up: target item {bad} is outside the item table of {n_items} items"
                )));
            }
            let (train, held): (Vec<usize>, Vec<usize>) =
                (0..rows.len()).partition(|i| i % HOLD_OUT != HOLD_OUT - 1);
            Some((states, index_tensor(&targets, device)?, train, held))
        }
        _ => None,
    };

    let params: Vec<(String, Tensor)> = trained
        .variables()
        .into_iter()
        .filter(|(name, t)| name.starts_with("projector.") && t.requires_grad())
        .collect();
    let mut optimizer = AdamW::new(params, AdamWConfig::default())?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut report = WarmupReport {
        steps,
        item_loss_first: 0.0,
        item_loss_last: 0.0,
        user_loss_first: None,
        user_loss_last: None,
        held_out_rows: 0,
        candidates,
        user_slot_hr1_by_title: None,
        user_slot_hr1_by_slot: None,
        recommender_hr1: None,
        item_own_title_top1: 0.0,
    };
    let all_items: Vec<usize> = (0..n_items).collect();
    for step in 0..steps {
        optimizer.zero_grad();
        let picked = draw(&mut rng, &all_items, BATCH, device)?;
        let projected = heads
            .projector
            .forward(&vectors.f_index_select(0, &picked)?)?
            .f_to_kind(Kind::Float)?;
        let item_loss = symmetric_info_nce(&projected, &text.f_index_select(0, &picked)?, tau)?;
        let mut total = item_loss.shallow_clone();
        let mut user_loss = None;
        if let Some((states, targets, train, _)) = &user_side
            && !train.is_empty()
        {
            let chosen = draw(&mut rng, train, BATCH, device)?;
            let queries = heads
                .projector
                .forward(&states.f_index_select(0, &chosen)?)?
                .f_to_kind(Kind::Float)?;
            let loss = info_nce(&queries, &text, &targets.f_index_select(0, &chosen)?, tau)?;
            total = total.f_add(&loss)?;
            user_loss = Some(loss.double_value(&[]));
        }
        descend(
            &mut optimizer,
            &total,
            LEARNING_RATE,
            ("projector warm-up", step),
        )?;
        let item_value = item_loss.double_value(&[]);
        if step == 0 {
            report.item_loss_first = item_value;
            report.user_loss_first = user_loss;
        }
        report.item_loss_last = item_value;
        report.user_loss_last = user_loss;
    }

    let _guard = tch::no_grad_guard();
    let slots = l2_normalise(&heads.projector.forward(&vectors)?)?;
    let titles = l2_normalise(&text)?;
    let own = Tensor::f_arange(n_items as i64, (Kind::Int64, device))?;
    report.item_own_title_top1 = slots
        .f_matmul(&titles.f_transpose(0, 1)?)?
        .f_argmax(1, false)?
        .f_eq_tensor(&own)?
        .f_to_kind(Kind::Float)?
        .f_mean(Kind::Float)?
        .double_value(&[]);
    if let Some((states, _, _, held)) = &user_side
        && !held.is_empty()
    {
        let held_ids: Vec<i64> = held.iter().map(|&i| i as i64).collect();
        let held_ids = index_tensor(&held_ids, device)?;
        let states = states.f_index_select(0, &held_ids)?;
        // The target first, then its negatives: the order does not matter to an argmax.
        let mut drawn = Vec::with_capacity(held.len() * candidates);
        for &row in held {
            let row = &rows[row];
            let set = draw_candidates(&row.history, row.target, n_items, candidates, &mut rng)
                .map_err(|e| TrainError::Invalid(format!("projector warm-up: {e}")))?;
            drawn.push(i64::from(row.target));
            drawn.extend(
                set.iter()
                    .filter(|&&c| c != row.target)
                    .map(|&c| i64::from(c)),
            );
        }
        let drawn = index_tensor(&drawn, device)?.f_view([held.len() as i64, candidates as i64])?;
        let users = l2_normalise(&heads.projector.forward(&states)?)?;
        let by_title = users.f_matmul(&titles.f_transpose(0, 1)?)?;
        let by_slot = users.f_matmul(&slots.f_transpose(0, 1)?)?;
        let by_recommender = states.f_matmul(&vectors.f_transpose(0, 1)?)?;
        report.held_out_rows = held.len();
        report.user_slot_hr1_by_title = Some(hit_rate_at_1(&by_title, &drawn)?);
        report.user_slot_hr1_by_slot = Some(hit_rate_at_1(&by_slot, &drawn)?);
        report.recommender_hr1 = Some(hit_rate_at_1(&by_recommender, &drawn)?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{rng_lock, setup};

    fn rows(n: usize, n_items: u32) -> Vec<SeqExample> {
        (0..n as u32)
            .map(|i| SeqExample {
                user: i,
                history: vec![i % n_items, (i + 1) % n_items, (i + 2) % n_items],
                target: (i + 3) % n_items,
                candidates: Vec::new(),
            })
            .collect()
    }

    fn config(steps: u64) -> WarmupConfig {
        WarmupConfig {
            steps,
            candidates: 5,
            tau: 0.07,
            seed: 5,
        }
    }

    #[test]
    fn the_warm_up_aligns_the_projector_with_titles_and_touches_nothing_else() {
        let _rng = rng_lock();
        let mut s = setup();
        // No recommender in the table: the prompts have no user slot, only items are aligned.
        s.items.recommender = None;
        let before: Vec<(String, Tensor)> = s
            .trained
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        let data = rows(20, 12);
        let report =
            warm_up_projector(&s.model, &s.heads, &s.trained, &s.items, &data, config(60)).unwrap();
        assert!(
            report.item_loss_last < report.item_loss_first * 0.5,
            "{report:?}"
        );
        assert_eq!(report.user_loss_first, None);
        assert_eq!(report.user_slot_hr1_by_slot, None);
        // 60 steps on 12 items: most slots now name their own title.
        assert!(report.item_own_title_top1 > 0.5, "{report:?}");
        assert_eq!(report.held_out_rows, 0);
        let after = s.trained.variables();
        for (name, old) in before {
            let changed = !after[&name].equal(&old);
            assert_eq!(changed, name.starts_with("projector."), "{name}");
        }
    }

    #[test]
    fn with_a_recommender_the_user_side_is_trained_and_measured_on_held_out_rows() {
        let _rng = rng_lock();
        let data = rows(40, 12);
        let run = || {
            let s = setup();
            assert!(s.items.recommender.is_some());
            warm_up_projector(&s.model, &s.heads, &s.trained, &s.items, &data, config(80)).unwrap()
        };
        let report = run();
        let (first, last) = (
            report.user_loss_first.unwrap(),
            report.user_loss_last.unwrap(),
        );
        assert!(last < first, "{report:?}");
        // Rows 9, 19, 29 and 39.
        assert_eq!(report.held_out_rows, 4);
        for share in [
            report.user_slot_hr1_by_title,
            report.user_slot_hr1_by_slot,
            report.recommender_hr1,
        ] {
            assert!((0.0..=1.0).contains(&share.unwrap()), "{report:?}");
        }
        // Seeded: the same start warms up to the same projector.
        assert_eq!(run(), report);
    }

    #[test]
    fn zero_steps_and_targets_outside_the_table_are_refused_by_name() {
        let _rng = rng_lock();
        let s = setup();
        let err = warm_up_projector(&s.model, &s.heads, &s.trained, &s.items, &[], config(0))
            .unwrap_err();
        assert!(err.to_string().contains("at least one step"), "{err}");
        let mut data = rows(5, 12);
        data[2].target = 999;
        let err = warm_up_projector(&s.model, &s.heads, &s.trained, &s.items, &data, config(3))
            .unwrap_err();
        assert!(err.to_string().contains("target item 999"), "{err}");
    }
}
