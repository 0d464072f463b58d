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
    })
}
