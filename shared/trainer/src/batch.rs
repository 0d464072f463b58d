//! Built prompts to tensors: each training sequence is `prompt ++ answer`, right-padded (the
//! causal mask keeps padding after a sequence out of its real tokens, so no padding mask is
//! needed), with the bookkeeping the losses need: the ID slots to fill, the rows that predict
//! answer tokens, and the final prompt position of each row (the user vector of L_ui).

use rsllm_core::ItemId;
use rsllm_prompt::BuiltPrompt;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::objective::SlotIndex;

#[derive(Debug)]
pub struct Batch {
    /// `[B, T]` int64 token ids, right-padded with the pad id.
    pub ids: Tensor,
    /// `[B, T]` int64 positions 0..T.
    pub positions: Tensor,
    /// The ID slots (item and user slots) and what fills them.
    pub slots: SlotIndex,
    /// Rows that predict an answer token: `[M]` row and position, `[M]` target token.
    pub answer_batch: Tensor,
    pub answer_position: Tensor,
    pub answer_targets: Tensor,
    /// `[B]` position of each row's last prompt token.
    pub last_prompt: Tensor,
    /// Per row: the target item and the candidates (for L_ui).
    pub targets: Vec<ItemId>,
    pub candidates: Vec<Vec<ItemId>>,
    /// With [`collate_ranked`]: the candidates' answers packed after each prompt, for L_rank.
    pub ranking: Option<Ranking>,
}

/// The packed layout of [`collate_ranked`]: each row is `prompt ++ answer_1 ++ ... ++
/// answer_k`, every answer attending to the prompt and to its own earlier tokens only, at the
/// positions it would have right after the prompt; what the evaluation's ranking scores one
/// continuation at a time, the prompt encoded once.
#[derive(Debug)]
pub struct Ranking {
    /// `[B, 1, T, T]` bool: which keys each query may attend to.
    pub mask: Tensor,
    /// Every packed answer token: `[N]` row and the position whose logits predict it, the
    /// token, and its answer's index into the `[B, k]` score matrix (`row * k + slot`).
    pub token_batch: Tensor,
    pub token_position: Tensor,
    pub token_target: Tensor,
    pub token_answer: Tensor,
    /// `[B, k]` bool: which entries hold an answer (k is the widest row's count; rows may
    /// score fewer).
    pub answer_present: Tensor,
    /// `[B]` the target's slot among its row's answers.
    pub target_answer: Tensor,
}

/// Which candidates a ranked row scores, as indices into its candidates in prompt order: the
/// target and the first `negatives` others (the candidates were drawn at random, so these are
/// a random subset).
fn ranked_candidates(p: &BuiltPrompt, negatives: usize) -> Option<Vec<usize>> {
    let target = p.target_index?;
    let others = (0..p.candidates.len())
        .filter(|&c| c != target)
        .take(negatives);
    let mut chosen: Vec<usize> = others.chain(std::iter::once(target)).collect();
    chosen.sort_unstable();
    Some(chosen)
}

/// Token positions one training sequence takes: the prompt and its answer, or with ranking
/// (`Some(negatives)`) the prompt and every scored candidate's answer.
pub fn sequence_len(p: &BuiltPrompt, ranking: Option<usize>) -> usize {
    let answers = match ranking.and_then(|negatives| ranked_candidates(p, negatives)) {
        Some(chosen) if p.candidate_answer_ids.len() == p.candidates.len() => chosen
            .iter()
            .map(|&c| p.candidate_answer_ids[c].len())
            .sum(),
        _ => p.answer_ids.len(),
    };
    p.input_ids.len() + answers
}

fn i64s(values: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?.f_to_device(device)?)
}

/// Collates prompts that carry their answers (built with a known target).
pub fn collate(prompts: &[BuiltPrompt], pad_id: u32, device: Device) -> Result<Batch> {
    if prompts.is_empty() {
        return Err(TrainError::Invalid("an empty batch".into()));
    }
    let width = prompts
        .iter()
        .map(|p| p.input_ids.len() + p.answer_ids.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::new();
    let mut slots = SlotIndex::default();
    let (mut ans_b, mut ans_p, mut ans_t, mut last) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut targets, mut candidates) = (Vec::new(), Vec::new());
    for (row, p) in prompts.iter().enumerate() {
        let target = p.target.ok_or_else(|| {
            TrainError::Invalid(format!(
                "prompt {row} has no target: training needs the answer"
            ))
        })?;
        if p.input_ids.is_empty() || p.answer_ids.is_empty() {
            return Err(TrainError::Invalid(format!(
                "prompt {row} has an empty prompt or answer"
            )));
        }
        let prompt_len = p.input_ids.len();
        ids.extend(
            p.input_ids
                .iter()
                .chain(&p.answer_ids)
                .map(|&t| i64::from(t)),
        );
        ids.extend(std::iter::repeat_n(
            i64::from(pad_id),
            width - prompt_len - p.answer_ids.len(),
        ));
        slots.push(row, p);
        // Position prompt_len - 1 + j predicts answer token j.
        for (j, &token) in p.answer_ids.iter().enumerate() {
            ans_b.push(row as i64);
            ans_p.push((prompt_len - 1 + j) as i64);
            ans_t.push(i64::from(token));
        }
        last.push(prompt_len as i64 - 1);
        targets.push(target);
        candidates.push(p.candidates.clone());
    }
    let b = prompts.len() as i64;
    let t = width as i64;
    let positions = Tensor::f_arange(t, (Kind::Int64, device))?
        .f_unsqueeze(0)?
        .f_expand([b, t], false)?;
    Ok(Batch {
        ids: i64s(&ids, device)?.f_view([b, t])?,
        positions,
        slots,
        answer_batch: i64s(&ans_b, device)?,
        answer_position: i64s(&ans_p, device)?,
        answer_targets: i64s(&ans_t, device)?,
        last_prompt: i64s(&last, device)?,
        targets,
        candidates,
        ranking: None,
    })
}

/// Collates prompts for the listwise ranking loss: each row packs, after its prompt, the
/// answers of its target and of `negatives` other candidates ([`Ranking`]); the prompts must
/// carry their candidates' answers (`PromptBuilder::add_candidate_answers`). L_lm, L_ui and
/// L_it read the same values from it as from [`collate`]'s rows: the target's answer sees
/// exactly the prompt and itself.
pub fn collate_ranked(
    prompts: &[BuiltPrompt],
    negatives: usize,
    pad_id: u32,
    device: Device,
) -> Result<Batch> {
    let mut layout = Vec::with_capacity(prompts.len());
    for (row, p) in prompts.iter().enumerate() {
        let chosen = ranked_candidates(p, negatives).ok_or_else(|| {
            TrainError::Invalid(format!(
                "prompt {row} has no target: training needs the answer"
            ))
        })?;
        if p.candidate_answer_ids.len() != p.candidates.len()
            || p.candidate_answer_ids.iter().any(Vec::is_empty)
        {
            return Err(TrainError::Invalid(format!(
                "prompt {row} carries {} candidate answers for {} candidates: the ranking loss \
                 needs each candidate's (PromptBuilder::add_candidate_answers)",
                p.candidate_answer_ids.len(),
                p.candidates.len()
            )));
        }
        layout.push(chosen);
    }
    let mut batch = collate(prompts, pad_id, device)?;
    let width = prompts
        .iter()
        .map(|p| sequence_len(p, Some(negatives)))
        .max()
        .unwrap_or(0);
    let k = layout.iter().map(Vec::len).max().unwrap_or(0);
    let (mut ids, mut positions, mut segment) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tok_b, mut tok_p, mut tok_t, mut tok_a) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ans_b, mut ans_p, mut ans_t) = (Vec::new(), Vec::new(), Vec::new());
    let (mut present, mut target_answer) = (vec![false; prompts.len() * k], Vec::new());
    for (row, (p, chosen)) in prompts.iter().zip(&layout).enumerate() {
        let prompt_len = p.input_ids.len();
        ids.extend(p.input_ids.iter().map(|&t| i64::from(t)));
        positions.extend(0..prompt_len as i64);
        segment.extend(std::iter::repeat_n(0i64, prompt_len));
        for (slot, &c) in chosen.iter().enumerate() {
            let start = ids.len() - row * width;
            let answer = &p.candidate_answer_ids[c];
            let is_target = Some(c) == p.target_index;
            if is_target {
                target_answer.push(slot as i64);
            }
            present[row * k + slot] = true;
            for (j, &token) in answer.iter().enumerate() {
                // The answer's first token is predicted by the prompt's last position.
                let from = if j == 0 {
                    prompt_len - 1
                } else {
                    start + j - 1
                };
                tok_b.push(row as i64);
                tok_p.push(from as i64);
                tok_t.push(i64::from(token));
                tok_a.push((row * k + slot) as i64);
                if is_target {
                    ans_b.push(row as i64);
                    ans_p.push(from as i64);
                    ans_t.push(i64::from(token));
                }
            }
            ids.extend(answer.iter().map(|&t| i64::from(t)));
            positions.extend((prompt_len..prompt_len + answer.len()).map(|x| x as i64));
            segment.extend(std::iter::repeat_n(slot as i64 + 1, answer.len()));
        }
        let pad = (row + 1) * width - ids.len();
        ids.extend(std::iter::repeat_n(i64::from(pad_id), pad));
        positions.extend(std::iter::repeat_n(0i64, pad));
        segment.extend(std::iter::repeat_n(-1i64, pad));
    }
    let (b, t) = (prompts.len() as i64, width as i64);
    let segment = i64s(&segment, device)?.f_view([b, t])?;
    // A query sees earlier keys of the prompt (segment 0) and of its own segment: the prompt
    // is causal, each answer follows the prompt alone, padding sees padding and itself.
    let idx = Tensor::f_arange(t, (Kind::Int64, device))?;
    let causal = idx.f_unsqueeze(0)?.f_le_tensor(&idx.f_unsqueeze(1)?)?; // [T, T]: k <= q
    let same = segment
        .f_unsqueeze(1)?
        .f_eq_tensor(&segment.f_unsqueeze(2)?)?; // [B, T, T]
    let prompt_key = segment.f_eq(0)?.f_unsqueeze(1)?; // [B, 1, T]
    let mask = same
        .f_logical_or(&prompt_key)?
        .f_logical_and(&causal.f_unsqueeze(0)?)?
        .f_unsqueeze(1)?;
    batch.ids = i64s(&ids, device)?.f_view([b, t])?;
    batch.positions = i64s(&positions, device)?.f_view([b, t])?;
    batch.answer_batch = i64s(&ans_b, device)?;
    batch.answer_position = i64s(&ans_p, device)?;
    batch.answer_targets = i64s(&ans_t, device)?;
    batch.ranking = Some(Ranking {
        mask,
        token_batch: i64s(&tok_b, device)?,
        token_position: i64s(&tok_p, device)?,
        token_target: i64s(&tok_t, device)?,
        token_answer: i64s(&tok_a, device)?,
        answer_present: Tensor::f_from_slice(&present)?
            .f_to_device(device)?
            .f_view([b, k as i64])?,
        target_answer: i64s(&target_answer, device)?,
    });
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{prompts, rng_lock, setup};
    use rsllm_prompt::PromptMode;
    use rsllm_prompt::testing::PAD_ID;

    #[test]
    fn a_ranked_row_packs_each_answer_after_the_prompt_seeing_only_the_prompt() {
        let _rng = rng_lock();
        let s = setup();
        let prompts = prompts(&s, PromptMode::Unified);
        let b = collate_ranked(&prompts, usize::MAX, PAD_ID, Device::Cpu).unwrap();
        let r = b.ranking.as_ref().unwrap();
        assert_eq!(r.answer_present.size(), [2, 4]);
        let width = b.ids.size()[1];
        assert_eq!(
            width as usize,
            prompts
                .iter()
                .map(|p| sequence_len(p, Some(usize::MAX)))
                .max()
                .unwrap()
        );
        let ids = Vec::<i64>::try_from(b.ids.flatten(0, 1)).unwrap();
        let positions = Vec::<i64>::try_from(b.positions.flatten(0, 1)).unwrap();
        let mask = Vec::<bool>::try_from(r.mask.flatten(0, -1)).unwrap();
        let sees =
            |row: usize, q: usize, k: usize| mask[(row * width as usize + q) * width as usize + k];
        for (row, p) in prompts.iter().enumerate() {
            let at = |i: usize| ids[row * width as usize + i];
            let prompt_len = p.input_ids.len();
            let mut start = prompt_len;
            let mut spans = Vec::new();
            for answer in &p.candidate_answer_ids {
                for (j, &token) in answer.iter().enumerate() {
                    assert_eq!(at(start + j), i64::from(token));
                    // Where it would sit right after the prompt.
                    assert_eq!(
                        positions[row * width as usize + start + j],
                        (prompt_len + j) as i64
                    );
                }
                spans.push(start..start + answer.len());
                start += answer.len();
            }
            for (c, span) in spans.iter().enumerate() {
                let q = span.end - 1;
                assert!((0..prompt_len).all(|k| sees(row, q, k)), "the whole prompt");
                assert!(span.clone().all(|k| sees(row, q, k)), "its own tokens");
                for (other, o) in spans.iter().enumerate() {
                    if other != c {
                        assert!(
                            o.clone().all(|k| !sees(row, q, k)),
                            "answer {c} sees {other}"
                        );
                    }
                }
            }
            // The prompt stays causal.
            assert!(!sees(row, 0, 1) && sees(row, 1, 0));
            // L_lm's rows are the target's answer, predicted from where it sits.
            let target = p.target_index.unwrap();
            let rows = Vec::<i64>::try_from(&b.answer_batch).unwrap();
            let from = Vec::<i64>::try_from(&b.answer_position).unwrap();
            let tokens = Vec::<i64>::try_from(&b.answer_targets).unwrap();
            let mine: Vec<(i64, i64)> = rows
                .iter()
                .zip(from.iter().zip(&tokens))
                .filter(|(r, _)| **r == row as i64)
                .map(|(_, (&f, &t))| (f, t))
                .collect();
            let span = &spans[target];
            assert_eq!(mine[0].0, prompt_len as i64 - 1);
            for (j, &(f, t)) in mine.iter().enumerate().skip(1) {
                assert_eq!(f, (span.start + j - 1) as i64);
                assert_eq!(t, at(span.start + j));
            }
            assert_eq!(mine.len(), p.answer_ids.len());
        }
        // Prompts without their candidates' answers are refused by name.
        let mut bare = prompts.clone();
        bare[1].candidate_answer_ids.clear();
        let err = collate_ranked(&bare, usize::MAX, PAD_ID, Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("prompt 1") && err.contains("add_candidate_answers"),
            "{err}"
        );
    }
}
