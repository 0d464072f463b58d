//! RSLLM's objective on one batch (METHOD.md, "Objective"):
//! `L = L_lm + lambda_ui * L_ui + lambda_it * L_it`, each term switchable.
//!
//! - ID slots get `P(e_i)`: the frozen recommender's item vector through the projector; the
//!   user slot of `UnifiedWithUser` prompts gets `P(s_u)`, the recommender's user state after
//!   the prompt's history (same projector: the recommender scores items by `s_u . e_i`, so
//!   both live in one space).
//! - `t_i`, an item's text vector: the mean of the LLM's input embeddings of its title tokens.
//! - L_lm: cross-entropy on the answer tokens (the prompt is masked).
//! - L_it: symmetric InfoNCE between `P(e_i)` and `t_i` over the batch's distinct items.
//! - L_ui: InfoNCE between `u = W_u h` (h: last hidden state at the final prompt token) and
//!   `v_i = W_v (P(e_i) + t_i)` (text-only prompts: `W_v t_i`); a row's positive is its target,
//!   its negatives its other candidates and the batch's other targets.

use std::collections::BTreeSet;

use rsllm_core::ItemId;
use rsllm_llm::{Llama, Projector, SlotOverrides};
use rsllm_prompt::{BuiltPrompt, SlotRole};
use rsllm_recommender::RecModel;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::batch::{Batch, Ranking};
use crate::error::{Result, TrainError};
use crate::losses::{
    UiNegatives, UiSimilarity, lm_loss, masked_info_nce, similarity_logits, symmetric_info_nce,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub use_lm: bool,
    pub lambda_ui: f64,
    pub lambda_it: f64,
    pub tau: f64,
    /// L_ui's similarity (the heads rank by it too); absent in specs written before it
    /// existed, which used the cosine.
    #[serde(default)]
    pub ui_similarity: UiSimilarity,
    /// L_ui's negatives; absent in specs written before it existed, which used the
    /// candidates.
    #[serde(default)]
    pub ui_negatives: UiNegatives,
    /// Weight of L_rank (ours, beyond the paper; 0, the default, is off): the listwise
    /// ranking loss, a softmax over the summed log-likelihoods of the row's candidates'
    /// answers with the target as the label, i.e. the evaluation's ranking turned into a
    /// loss. L_lm raises the target's likelihood alone; L_rank raises it against the
    /// candidates the model has to choose among. Its batches pack the scored answers after
    /// each prompt ([`crate::batch::collate_ranked`]), so a step computes more positions.
    #[serde(default)]
    pub lambda_rank: f64,
    /// Negatives L_rank scores beside the target per row (the first ones in prompt order);
    /// `None`: every other candidate.
    #[serde(default)]
    pub rank_negatives: Option<usize>,
}

impl LossConfig {
    /// `Some(negatives per row)` when L_rank is on: batches are then collated with their
    /// candidates' answers.
    pub fn ranking(&self) -> Option<usize> {
        (self.lambda_rank > 0.0).then(|| self.rank_negatives.unwrap_or(usize::MAX))
    }
}

impl Default for LossConfig {
    /// METHOD.md's starting point: lambda_ui = lambda_it = 0.1, tau = 0.07.
    fn default() -> Self {
        LossConfig {
            use_lm: true,
            lambda_ui: 0.1,
            lambda_it: 0.1,
            tau: 0.07,
            ui_similarity: UiSimilarity::Cosine,
            ui_negatives: UiNegatives::Candidates,
            lambda_rank: 0.0,
            rank_negatives: None,
        }
    }
}

/// The user head's variable name in a trained store.
pub const USER_HEAD: &str = "heads.w_u";

/// What RSLLM trains besides the LLM's adapters: the projector and the two alignment heads
/// (`heads.w_u`, `heads.w_v`), all under one trainable path.
#[derive(Debug)]
pub struct RsllmHeads {
    pub projector: Projector,
    w_u: Tensor,
    w_v: Tensor,
}

impl RsllmHeads {
    pub fn new(path: &nn::Path, d_id: usize, d_llm: usize) -> RsllmHeads {
        let d = d_llm as i64;
        let init = nn::Init::Uniform {
            lo: -1.0 / (d as f64).sqrt(),
            up: 1.0 / (d as f64).sqrt(),
        };
        RsllmHeads {
            projector: Projector::new(path, d_id, d_llm),
            w_u: (path / "heads").var("w_u", &[d, d], init),
            w_v: (path / "heads").var("w_v", &[d, d], init),
        }
    }

    /// `W_u` `[D, D]` itself (shared storage: for reading, not for training).
    pub fn user_head(&self) -> Tensor {
        self.w_u.shallow_clone()
    }

    /// L_ui's user side, `u = W_u h`, for hidden states `h` `[N, D]` (in f32).
    pub fn user_vectors(&self, h: &Tensor) -> Result<Tensor> {
        Ok(h.f_to_kind(Kind::Float)?
            .f_matmul(&self.w_u.f_transpose(0, 1)?)?)
    }

    /// L_ui's item side for `ids` (checked against the table): `v_i = W_v (P(e_i) + t_i)`, or
    /// `W_v t_i` when the prompts carry no ID slots (`with_ids` false). Also returns `t_i` and,
    /// with ids, `P(e_i)` (in f32), which L_it aligns.
    pub fn item_vectors(
        &self,
        model: &Llama,
        items: &ItemTable,
        ids: &[ItemId],
        with_ids: bool,
    ) -> Result<ItemSide> {
        for &item in ids {
            items.check(item)?;
        }
        let text = items.text_vectors(model, ids)?;
        let projected = if with_ids {
            let index: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
            let index = Tensor::f_from_slice(&index)?.f_to_device(model.device())?;
            Some(
                self.projector
                    .forward(&items.vectors.f_index_select(0, &index)?)?
                    .f_to_kind(Kind::Float)?,
            )
        } else {
            None
        };
        let summed = match &projected {
            Some(p) => p.f_add(&text)?,
            None => text.shallow_clone(),
        };
        Ok(ItemSide {
            v: self.item_head(&summed)?,
            text,
            projected,
        })
    }

    /// `W_v x` for item inputs `x` `[K, D]` (in f32): the item side's head alone, for callers
    /// that assemble `x` themselves (the heads probe).
    pub(crate) fn item_head(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_to_kind(Kind::Float)?
            .f_matmul(&self.w_v.f_transpose(0, 1)?)?)
    }
}

/// L_ui on one batch: row `r`'s user vector `u[r]` against the item vectors `v` of `distinct`
/// (sorted, every candidate and target of the batch), its positive its target, its negatives
/// its other candidates and the batch's other targets; nothing else is allowed in its softmax.
pub(crate) fn ui_loss(
    u: &Tensor,
    v: &Tensor,
    distinct: &[ItemId],
    (targets, candidates): (&[ItemId], &[Vec<ItemId>]),
    similarity: (f64, UiSimilarity),
) -> Result<Tensor> {
    let k = distinct.len();
    let index_of = |item: ItemId| {
        distinct.binary_search(&item).map_err(|_| {
            TrainError::Invalid(format!("L_ui: item {item} is not among the batch's items"))
        })
    };
    let mut allowed = vec![false; targets.len() * k];
    let mut positives = Vec::with_capacity(targets.len());
    for (row, (&target, row_candidates)) in targets.iter().zip(candidates).enumerate() {
        for &c in row_candidates.iter().chain(targets) {
            allowed[row * k + index_of(c)?] = true;
        }
        positives.push(index_of(target)? as i64);
    }
    let device = u.device();
    let allowed = Tensor::f_from_slice(&allowed)?
        .f_view([targets.len() as i64, k as i64])?
        .f_to_device(device)?;
    let positives = Tensor::f_from_slice(&positives)?.f_to_device(device)?;
    masked_info_nce(u, v, &positives, &allowed, similarity)
}

/// [`RsllmHeads::item_vectors`]' result: `v_i`, `t_i` and `P(e_i)`, one row per item.
#[derive(Debug)]
pub struct ItemSide {
    pub v: Tensor,
    pub text: Tensor,
    pub projected: Option<Tensor>,
}

/// L_ui with the whole catalog as negatives ([`UiNegatives::Catalog`]): row `r`'s user vector
/// `u[r]` against every item's `v` (`[num_items, D]`, item id = row), a softmax over all items
/// with its target as the positive, as the recommenders are trained.
pub(crate) fn catalog_ui_loss(
    u: &Tensor,
    v_all: &Tensor,
    targets: &[ItemId],
    (tau, similarity): (f64, UiSimilarity),
) -> Result<Tensor> {
    let n_items = v_all.size().first().copied().unwrap_or(0);
    if let Some(bad) = targets.iter().find(|&&t| i64::from(t) >= n_items) {
        return Err(TrainError::Invalid(format!(
            "L_ui: target item {bad} is outside the catalog of {n_items} items"
        )));
    }
    let targets: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let targets = Tensor::f_from_slice(&targets)?.f_to_device(u.device())?;
    Ok(
        similarity_logits(u, v_all, tau, similarity)?.f_cross_entropy_loss::<Tensor>(
            &targets,
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?,
    )
}

/// The frozen side of an item: its recommender vector and its title's token ids.
#[derive(Debug)]
pub struct ItemTable {
    /// `[num_items, d_id]`, on the model's device.
    pub vectors: Tensor,
    /// Title token ids per item id.
    pub title_ids: Vec<Vec<u32>>,
    /// The recommender itself (on the CPU), for the user states that fill user slots; None
    /// where the prompts have none.
    pub recommender: Option<RecModel>,
}

/// Where a batch's slots are and what fills them: item slots by item id, user slots by the
/// history whose user state fills them.
#[derive(Debug, Default)]
pub struct SlotIndex {
    pub item_batch: Vec<i64>,
    pub item_position: Vec<i64>,
    pub items: Vec<i64>,
    pub user_batch: Vec<i64>,
    pub user_position: Vec<i64>,
    pub user_histories: Vec<Vec<ItemId>>,
}

impl SlotIndex {
    /// Adds the slots of `prompt`, which is row `row` of the batch.
    pub fn push(&mut self, row: usize, prompt: &BuiltPrompt) {
        for slot in &prompt.slots {
            if slot.role == SlotRole::User {
                self.user_batch.push(row as i64);
                self.user_position.push(slot.position as i64);
                self.user_histories.push(prompt.history.clone());
            } else {
                self.item_batch.push(row as i64);
                self.item_position.push(slot.position as i64);
                self.items.push(i64::from(slot.item));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.user_batch.is_empty()
    }

    /// The projected vectors for every slot (item slots first, then user slots), or None when
    /// there are no slots. Item ids are checked against the table; user slots need the table's
    /// recommender.
    pub fn overrides(
        &self,
        heads: &RsllmHeads,
        items: &ItemTable,
        device: Device,
    ) -> Result<Option<SlotOverrides>> {
        if self.is_empty() {
            return Ok(None);
        }
        for &item in &self.items {
            items.check(item as ItemId)?;
        }
        let to_device = |values: &[i64]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(values)?.f_to_device(device)?)
        };
        let ids = to_device(&self.items)?;
        let mut raw = items.vectors.f_index_select(0, &ids)?;
        if !self.user_batch.is_empty() {
            let Some(recommender) = &items.recommender else {
                return Err(TrainError::Invalid(
                    "the prompts have user slots but no recommender was loaded to fill them".into(),
                ));
            };
            let histories: Vec<&[ItemId]> = self.user_histories.iter().map(Vec::as_slice).collect();
            let states = recommender
                .user_states(&histories)
                .map_err(|e| TrainError::Invalid(format!("user slots: {e}")))?
                .f_to_device(device)?
                .f_to_kind(raw.kind())?;
            raw = Tensor::f_cat(&[raw, states], 0)?;
        }
        // Item slots first, then user slots: the order of `raw`'s rows.
        Ok(Some(SlotOverrides {
            batch: to_device(&[&self.item_batch[..], &self.user_batch[..]].concat())?,
            position: to_device(&[&self.item_position[..], &self.user_position[..]].concat())?,
            vectors: heads.projector.forward(&raw)?,
        }))
    }
}

impl ItemTable {
    /// The width of the recommender's item vectors (`d_id`).
    pub fn dim(&self) -> usize {
        self.vectors.size().get(1).map_or(0, |&d| d as usize)
    }

    fn check(&self, item: ItemId) -> Result<()> {
        let n = self.title_ids.len();
        if item as usize >= n || self.vectors.size().first().copied() != Some(n as i64) {
            return Err(TrainError::Invalid(format!(
                "item {item} is outside the item table of {n} items (vectors {:?})",
                self.vectors.size()
            )));
        }
        Ok(())
    }

    /// `[K, D]` mean input embedding of each item's title tokens.
    pub(crate) fn text_vectors(&self, model: &Llama, items: &[ItemId]) -> Result<Tensor> {
        let device = model.device();
        let width = items
            .iter()
            .map(|&i| self.title_ids[i as usize].len())
            .max()
            .unwrap_or(1)
            .max(1);
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for &item in items {
            let title = &self.title_ids[item as usize];
            if title.is_empty() {
                return Err(TrainError::Invalid(format!(
                    "item {item} has an empty title"
                )));
            }
            ids.extend(title.iter().map(|&t| i64::from(t)));
            ids.extend(std::iter::repeat_n(0, width - title.len()));
            mask.extend(std::iter::repeat_n(1f32, title.len()));
            mask.extend(std::iter::repeat_n(0f32, width - title.len()));
        }
        let k = items.len() as i64;
        let ids = Tensor::f_from_slice(&ids)?
            .f_view([k, width as i64])?
            .f_to_device(device)?;
        let mask = Tensor::f_from_slice(&mask)?
            .f_view([k, width as i64, 1])?
            .f_to_device(device)?;
        let embeds = model.embed(&ids, None)?.f_to_kind(Kind::Float)?;
        let summed =
            embeds
                .f_mul(&mask)?
                .f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?;
        Ok(summed.f_div(&mask.f_sum_dim_intlist([1i64].as_slice(), false, Kind::Float)?)?)
    }
}

/// The loss of one batch: the weighted total with its graph, and the terms left on the device
/// (reading a value waits for the device, so the training loop reads each step's once).
#[derive(Debug)]
pub struct Losses {
    /// `L_lm + lambda_ui L_ui + lambda_it L_it + lambda_rank L_rank`, a scalar to call
    /// `backward` on.
    pub total: Tensor,
    /// `[L_lm, L_ui, L_it, L_rank]`, detached f32 (0 where a term is switched off),
    /// unweighted.
    pub terms: Tensor,
}

/// The terms of [`Losses`] read back to the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTerms {
    pub lm: f64,
    pub ui: f64,
    pub it: f64,
    pub rank: f64,
}

/// How many values [`Losses::terms`] holds.
pub const LOSS_TERMS: usize = 4;

impl Losses {
    /// Reads the terms (waits for the device).
    pub fn read_terms(&self) -> Result<LossTerms> {
        let v = Vec::<f64>::try_from(self.terms.f_to_kind(Kind::Double)?)?;
        match v[..] {
            [lm, ui, it, rank] => Ok(LossTerms { lm, ui, it, rank }),
            _ => Err(TrainError::Invalid(format!(
                "loss terms hold {} values, expected {LOSS_TERMS}",
                v.len()
            ))),
        }
    }
}

/// L_rank on a ranked batch: each scored answer's summed log-likelihood (the evaluation's
/// ranking score), then cross-entropy of the row's softmax over them against the target.
fn rank_loss(model: &Llama, hidden: &Tensor, ranking: &Ranking) -> Result<Tensor> {
    let logits = model.logits_at(
        hidden,
        Some((&ranking.token_batch, &ranking.token_position)),
    )?;
    // log p(token) = logit(token) - logsumexp(logits): no [N, vocab] log-softmax is kept.
    let picked = logits
        .f_gather(1, &ranking.token_target.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    let log_p = picked.f_sub(&logits.f_logsumexp([-1i64].as_slice(), false)?)?;
    let size = ranking.answer_present.size();
    let scores = Tensor::f_zeros([size[0] * size[1]], (Kind::Float, hidden.device()))?
        .f_index_add(0, &ranking.token_answer, &log_p)?
        .f_view([size[0], size[1]])?
        .f_masked_fill(&ranking.answer_present.f_logical_not()?, f64::NEG_INFINITY)?;
    Ok(scores.f_cross_entropy_loss::<Tensor>(
        &ranking.target_answer,
        None,
        tch::Reduction::Mean,
        -100,
        0.0,
    )?)
}

/// Forward pass and losses for one batch. Gradients flow into whatever requires them: the
/// LoRA adapters, the projector and the heads (or the whole model when fully fine-tuned).
pub fn losses(
    model: &Llama,
    heads: &RsllmHeads,
    items: &ItemTable,
    batch: &Batch,
    config: &LossConfig,
) -> Result<Losses> {
    let overrides = batch.slots.overrides(heads, items, model.device())?;
    let embeds = model.embed(&batch.ids, overrides.as_ref())?;
    let hidden = match &batch.ranking {
        Some(r) => model.forward_masked(&embeds, &batch.positions, &r.mask, None)?,
        None => model.forward_embeds(&embeds, &batch.positions, None, None)?,
    };
    let device = model.device();
    let mut total = Tensor::f_zeros([], (Kind::Float, device))?;
    let zero = || Tensor::f_zeros([], (Kind::Float, device));
    let (mut lm_term, mut ui_term, mut it_term, mut rank_term) =
        (zero()?, zero()?, zero()?, zero()?);
    if config.lambda_rank > 0.0 {
        let ranking = batch.ranking.as_ref().ok_or_else(|| {
            TrainError::Invalid(
                "lambda_rank is on but the batch holds no candidate answers: collate it with \
                 collate_ranked"
                    .into(),
            )
        })?;
        let rank = rank_loss(model, &hidden, ranking)?;
        rank_term = rank.f_detach()?.f_to_kind(Kind::Float)?;
        total = total.f_add(&rank.f_mul_scalar(config.lambda_rank)?)?;
    }
    if config.use_lm {
        let logits =
            model.logits_at(&hidden, Some((&batch.answer_batch, &batch.answer_position)))?;
        let lm = lm_loss(&logits, &batch.answer_targets)?;
        lm_term = lm.f_detach()?.f_to_kind(Kind::Float)?;
        total = total.f_add(&lm)?;
    }
    let unified = !batch.slots.items.is_empty();
    if config.lambda_ui > 0.0 || (config.lambda_it > 0.0 && unified) {
        // The items of this batch: every candidate (the targets are among them).
        let distinct: BTreeSet<ItemId> = batch.candidates.iter().flatten().copied().collect();
        let distinct: Vec<ItemId> = distinct.into_iter().collect();
        let side = heads.item_vectors(model, items, &distinct, unified)?;
        if config.lambda_it > 0.0
            && let Some(p) = &side.projected
        {
            let it = symmetric_info_nce(p, &side.text, config.tau)?;
            it_term = it.f_detach()?.f_to_kind(Kind::Float)?;
            total = total.f_add(&it.f_mul_scalar(config.lambda_it)?)?;
        }
        if config.lambda_ui > 0.0 {
            let h = hidden.f_index(&[
                Some(&Tensor::f_arange(hidden.size()[0], (Kind::Int64, device))?),
                Some(&batch.last_prompt),
            ])?;
            let u = heads.user_vectors(&h)?;
            let similarity = (config.tau, config.ui_similarity);
            let ui = match config.ui_negatives {
                UiNegatives::Candidates => ui_loss(
                    &u,
                    &side.v,
                    &distinct,
                    (&batch.targets, &batch.candidates),
                    similarity,
                )?,
                UiNegatives::Catalog => {
                    let all: Vec<ItemId> = (0..items.title_ids.len() as ItemId).collect();
                    let catalog = heads.item_vectors(model, items, &all, unified)?;
                    catalog_ui_loss(&u, &catalog.v, &batch.targets, similarity)?
                }
            };
            ui_term = ui.f_detach()?.f_to_kind(Kind::Float)?;
            total = total.f_add(&ui.f_mul_scalar(config.lambda_ui)?)?;
        }
    }
    Ok(Losses {
        total,
        terms: Tensor::f_stack(&[lm_term, ui_term, it_term, rank_term], 0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, AdamWConfig};
    use crate::test_support::{batch, rng_lock, setup};
    use rsllm_prompt::PromptMode;
    use rsllm_prompt::testing::PAD_ID;

    #[test]
    fn collated_rows_hold_prompt_then_answer_and_slots() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let b = batch(&s, PromptMode::Unified);
        assert_eq!(b.ids.size()[0], 2);
        // 3 + 4 slots in row 0, 2 + 4 in row 1.
        assert_eq!(b.slots.items.len(), 13);
        assert!(b.slots.user_batch.is_empty());
        let slot_rows = &b.slots.item_batch;
        assert_eq!(slot_rows.iter().filter(|&&r| r == 0).count(), 7);
        // Every slot position holds the slot token, every answer row predicts the next id.
        let ids = Vec::<i64>::try_from(b.ids.flatten(0, 1)).unwrap();
        let width = b.ids.size()[1];
        for (row, pos) in slot_rows.iter().zip(b.slots.item_position.iter().copied()) {
            assert_eq!(ids[(row * width + pos) as usize], i64::from(PAD_ID));
        }
        let targets = Vec::<i64>::try_from(&b.answer_targets).unwrap();
        let rows = Vec::<i64>::try_from(&b.answer_batch).unwrap();
        let positions = Vec::<i64>::try_from(&b.answer_position).unwrap();
        for ((row, pos), target) in rows.iter().zip(positions).zip(targets) {
            assert_eq!(ids[(row * width + pos + 1) as usize], target);
        }
        assert_eq!(b.targets, vec![6, 11]);
    }

    #[test]
    fn catalog_ui_loss_is_the_softmax_over_every_item() {
        let u = Tensor::from_slice(&[2.0f32, 0.0]).view([1, 2]);
        // Cosines with u: 1, 0, -1 (the lengths do not count under the cosine).
        let v = Tensor::from_slice(&[3.0f32, 0.0, 0.0, 1.0, -1.0, 0.0]).view([3, 2]);
        let loss = |target, similarity| {
            catalog_ui_loss(&u, &v, &[target], (0.5, similarity))
                .unwrap()
                .double_value(&[])
        };
        let partition = (2f64.exp() + 1.0 + (-2f64).exp()).ln();
        assert!((loss(0, UiSimilarity::Cosine) - (partition - 2.0)).abs() < 1e-5);
        assert!((loss(2, UiSimilarity::Cosine) - (partition + 2.0)).abs() < 1e-5);
        // User-normalised: the first item's length 3 counts.
        let kept = (6f64.exp() + 1.0 + (-2f64).exp()).ln() - 6.0;
        assert!((loss(0, UiSimilarity::UserNormalised) - kept).abs() < 1e-5);
        let err = catalog_ui_loss(&u, &v, &[3], (0.5, UiSimilarity::Cosine))
            .unwrap_err()
            .to_string();
        assert!(err.contains("item 3") && err.contains("3 items"), "{err}");
    }

    #[test]
    fn each_term_switches_and_training_lowers_the_total() {
        let _rng = rng_lock();
        let s = setup();
        let b = batch(&s, PromptMode::Unified);
        let only = |lm: bool, ui: f64, it: f64| {
            let c = LossConfig {
                use_lm: lm,
                lambda_ui: ui,
                lambda_it: it,
                tau: 0.07,
                ..LossConfig::default()
            };
            losses(&s.model, &s.heads, &s.items, &b, &c).unwrap()
        };
        let all = only(true, 0.1, 0.1);
        let terms = all.read_terms().unwrap();
        assert!(terms.lm > 0.0 && terms.ui > 0.0 && terms.it > 0.0);
        let weighted = terms.lm + 0.1 * terms.ui + 0.1 * terms.it;
        assert!((all.total.double_value(&[]) - weighted).abs() < 1e-5);
        let lm_only = only(true, 0.0, 0.0);
        let lm_terms = lm_only.read_terms().unwrap();
        assert_eq!((lm_terms.ui, lm_terms.it), (0.0, 0.0));
        assert!((lm_only.total.double_value(&[]) - terms.lm).abs() < 1e-5);
        let it_only = only(false, 0.0, 1.0);
        assert_eq!(it_only.read_terms().unwrap().lm, 0.0);
        assert!((it_only.total.double_value(&[]) - terms.it).abs() < 1e-5);
        // L_ui with the item side's length kept: another value, the other terms unchanged.
        let kept = LossConfig {
            ui_similarity: crate::losses::UiSimilarity::UserNormalised,
            ..LossConfig::default()
        };
        let kept = losses(&s.model, &s.heads, &s.items, &b, &kept)
            .unwrap()
            .read_terms()
            .unwrap();
        assert!(
            kept.ui.is_finite() && (kept.ui - terms.ui).abs() > 1e-6,
            "{kept:?}"
        );
        assert!((kept.lm - terms.lm).abs() < 1e-6 && (kept.it - terms.it).abs() < 1e-6);
        // L_ui over the whole catalog: more negatives than the candidates, a larger value.
        let catalog = LossConfig {
            ui_negatives: UiNegatives::Catalog,
            ..LossConfig::default()
        };
        let catalog = losses(&s.model, &s.heads, &s.items, &b, &catalog)
            .unwrap()
            .read_terms()
            .unwrap();
        assert!(
            catalog.ui.is_finite() && catalog.ui > terms.ui,
            "{catalog:?} {terms:?}"
        );
        assert!((catalog.lm - terms.lm).abs() < 1e-6 && (catalog.it - terms.it).abs() < 1e-6);

        // Text-only prompts: no slots, so no L_it and the projector gets no gradient.
        let text = batch(&s, PromptMode::TextOnly);
        let t = losses(&s.model, &s.heads, &s.items, &text, &LossConfig::default())
            .unwrap()
            .read_terms()
            .unwrap();
        assert_eq!(t.it, 0.0);
        assert!(t.ui > 0.0);

        let mut opt = AdamW::for_var_store(&s.trained, AdamWConfig::default()).unwrap();
        s.model.set_training(true);
        let config = LossConfig::default();
        let first = losses(&s.model, &s.heads, &s.items, &b, &config)
            .unwrap()
            .total
            .double_value(&[]);
        for _ in 0..40 {
            opt.zero_grad();
            let l = losses(&s.model, &s.heads, &s.items, &b, &config).unwrap();
            l.total.backward();
            opt.clip_grad_norm(1.0).unwrap();
            opt.step(3e-3).unwrap();
        }
        s.model.set_training(false);
        let last = losses(&s.model, &s.heads, &s.items, &b, &config)
            .unwrap()
            .total
            .double_value(&[]);
        assert!(last < 0.6 * first, "total loss {first} -> {last}");
        let grad = s.trained.variables()["projector.fc1.weight"].grad();
        assert!(grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn user_slots_carry_the_projected_user_state_of_their_history() {
        let _rng = rng_lock();
        let s = setup();
        let b = batch(&s, PromptMode::UnifiedWithUser);
        // One user slot per row, after the history's item slots; the items are as unified.
        assert_eq!(b.slots.items.len(), 13);
        assert_eq!(b.slots.user_batch, vec![0, 1]);
        assert_eq!(b.slots.user_histories, vec![vec![0, 1, 2], vec![3, 4]]);
        let overrides = b
            .slots
            .overrides(&s.heads, &s.items, Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(overrides.vectors.size(), [15, 32]);
        let recommender = s.items.recommender.as_ref().unwrap();
        let states = recommender.user_states(&[&[0, 1, 2], &[3, 4]]).unwrap();
        let expected = s.heads.projector.forward(&states).unwrap();
        let got = overrides.vectors.narrow(0, 13, 2);
        assert!(
            got.allclose(&expected, 1e-5, 1e-6, false),
            "user slots hold P(user state)"
        );
        assert_eq!(
            Vec::<i64>::try_from(overrides.position.narrow(0, 13, 2)).unwrap(),
            b.slots.user_position
        );
        // The slot matters to the loss, and its gradient reaches the projector.
        let config = LossConfig::default();
        let with = losses(&s.model, &s.heads, &s.items, &b, &config).unwrap();
        with.total.backward();
        let grad = s.trained.variables()["projector.fc1.weight"].grad();
        assert!(grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        let mut other = batch(&s, PromptMode::UnifiedWithUser);
        other.slots.user_histories = vec![vec![9, 10, 11], vec![5]];
        let changed = losses(&s.model, &s.heads, &s.items, &other, &config).unwrap();
        assert_ne!(
            with.read_terms().unwrap().lm,
            changed.read_terms().unwrap().lm
        );
        // Without a recommender to compute the states, the error says so.
        let bare = ItemTable {
            vectors: s.items.vectors.shallow_clone(),
            title_ids: s.items.title_ids.clone(),
            recommender: None,
        };
        let err = losses(&s.model, &s.heads, &bare, &b, &config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("user slots") && err.contains("no recommender"),
            "{err}"
        );
    }

    #[test]
    fn a_last_user_slot_is_each_rows_final_prompt_position_and_moves_the_answer() {
        let _rng = rng_lock();
        let s = setup();
        let b = batch(&s, PromptMode::UnifiedWithUserLast);
        assert_eq!(b.slots.user_batch, vec![0, 1]);
        assert_eq!(
            b.slots.user_position,
            Vec::<i64>::try_from(&b.last_prompt).unwrap(),
            "the position that predicts the answer's first token"
        );
        let config = LossConfig::default();
        let with = losses(&s.model, &s.heads, &s.items, &b, &config).unwrap();
        let mut other = batch(&s, PromptMode::UnifiedWithUserLast);
        other.slots.user_histories = vec![vec![9, 10, 11], vec![5]];
        let changed = losses(&s.model, &s.heads, &s.items, &other, &config).unwrap();
        assert_ne!(
            with.read_terms().unwrap().lm,
            changed.read_terms().unwrap().lm
        );
    }

    /// L_rank by the evaluation's own scorer: each row's candidates scored one continuation
    /// at a time after the prompt (`score_continuations_with`), then the softmax's
    /// cross-entropy at the target, over the target and the first `negatives` others.
    fn rank_loss_by_the_evaluation(s: &crate::test_support::Setup, negatives: usize) -> f64 {
        let prompts = crate::test_support::prompts(s, PromptMode::Unified);
        let mut total = 0.0;
        for p in &prompts {
            let one = crate::batch::collate(std::slice::from_ref(p), PAD_ID, Device::Cpu).unwrap();
            let o = one
                .slots
                .overrides(&s.heads, &s.items, Device::Cpu)
                .unwrap();
            let target = p.target_index.unwrap();
            let chosen: Vec<usize> = (0..p.candidates.len())
                .filter(|&c| {
                    c == target || (c < target && c < negatives) || (c > target && c <= negatives)
                })
                .collect();
            let answers: Vec<Vec<u32>> = chosen
                .iter()
                .map(|&c| p.candidate_answer_ids[c].clone())
                .collect();
            let scores =
                rsllm_llm::score_continuations_with(&s.model, &p.input_ids, o.as_ref(), &answers)
                    .unwrap();
            let logits: Vec<f64> = scores.iter().map(|c| c.sum_logprob).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_z = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            let at = chosen.iter().position(|&c| c == target).unwrap();
            total += log_z - logits[at];
        }
        total / prompts.len() as f64
    }

    #[test]
    fn a_ranked_batch_keeps_every_term_and_l_rank_is_the_ranking_evaluation_as_a_loss() {
        let _rng = rng_lock();
        let s = setup();
        for mode in [PromptMode::Unified, PromptMode::TextOnly] {
            let prompts = crate::test_support::prompts(&s, mode);
            let plain = crate::batch::collate(&prompts, PAD_ID, Device::Cpu).unwrap();
            let ranked =
                crate::batch::collate_ranked(&prompts, usize::MAX, PAD_ID, Device::Cpu).unwrap();
            let base = LossConfig::default();
            let with_rank = LossConfig {
                lambda_rank: 0.5,
                ..LossConfig::default()
            };
            let a = losses(&s.model, &s.heads, &s.items, &plain, &base)
                .unwrap()
                .read_terms()
                .unwrap();
            let out = losses(&s.model, &s.heads, &s.items, &ranked, &with_rank).unwrap();
            let b = out.read_terms().unwrap();
            // The packed answers see only the prompt and themselves: L_lm, L_ui and L_it are
            // what the plain rows give (f32 rounding apart: other shapes).
            for (x, y) in [(a.lm, b.lm), (a.ui, b.ui), (a.it, b.it)] {
                assert!((x - y).abs() < 1e-4, "{mode:?}: {a:?} vs {b:?}");
            }
            assert_eq!(a.rank, 0.0);
            let total = b.lm + 0.1 * b.ui + 0.1 * b.it + 0.5 * b.rank;
            assert!((out.total.double_value(&[]) - total).abs() < 1e-4);
            if mode == PromptMode::Unified {
                let want = rank_loss_by_the_evaluation(&s, usize::MAX);
                assert!((b.rank - want).abs() < 1e-4, "L_rank {} vs {want}", b.rank);
                // Four candidates per row: chance is ln 4.
                assert!(b.rank > 0.0 && b.rank.is_finite());
            }
        }
        // One negative per row: the softmax over the target and the first other candidate.
        let prompts = crate::test_support::prompts(&s, PromptMode::Unified);
        let one = crate::batch::collate_ranked(&prompts, 1, PAD_ID, Device::Cpu).unwrap();
        assert_eq!(one.ranking.as_ref().unwrap().answer_present.size(), [2, 2]);
        let config = LossConfig {
            lambda_rank: 1.0,
            ..LossConfig::default()
        };
        let got = losses(&s.model, &s.heads, &s.items, &one, &config)
            .unwrap()
            .read_terms()
            .unwrap()
            .rank;
        let want = rank_loss_by_the_evaluation(&s, 1);
        assert!((got - want).abs() < 1e-4, "L_rank {got} vs {want}");
        // L_rank asked of a batch without the answers: refused, naming the fix.
        let plain = crate::batch::collate(&prompts, PAD_ID, Device::Cpu).unwrap();
        let err = losses(&s.model, &s.heads, &s.items, &plain, &config)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lambda_rank") && err.contains("collate_ranked"),
            "{err}"
        );
    }

    #[test]
    fn training_with_l_rank_lowers_it() {
        let _rng = rng_lock();
        let s = setup();
        let prompts = crate::test_support::prompts(&s, PromptMode::Unified);
        let ranked =
            crate::batch::collate_ranked(&prompts, usize::MAX, PAD_ID, Device::Cpu).unwrap();
        let config = LossConfig {
            use_lm: false,
            lambda_ui: 0.0,
            lambda_it: 0.0,
            lambda_rank: 1.0,
            ..LossConfig::default()
        };
        let rank = || {
            losses(&s.model, &s.heads, &s.items, &ranked, &config)
                .unwrap()
                .read_terms()
                .unwrap()
                .rank
        };
        let first = rank();
        let mut opt = AdamW::for_var_store(&s.trained, AdamWConfig::default()).unwrap();
        for _ in 0..20 {
            opt.zero_grad();
            losses(&s.model, &s.heads, &s.items, &ranked, &config)
                .unwrap()
                .total
                .backward();
            opt.step(3e-3).unwrap();
        }
        let last = rank();
        assert!(last < 0.5 * first, "L_rank {first} -> {last}");
    }

    #[test]
    fn unknown_items_are_named() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let mut b = batch(&s, PromptMode::Unified);
        b.slots.items[3] = 40;
        let err = losses(&s.model, &s.heads, &s.items, &b, &LossConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("item 40"), "{err}");
    }
}
