//! Inference on a loaded [`Llama`]: batched prefill then KV-cache decoding (greedy or
//! temperature/top-p sampling, stopping on EOS, a newline, a stop string or a token cap), and
//! candidate scoring: the log-likelihood of N continuations of one prompt, with the prompt
//! encoded once and all continuations run in one batched pass over the cached prefix.

use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::error::{LlmError, Result};
use crate::model::{KvCache, Llama, SlotOverrides};
use crate::tokenizer::LlmTokenizer;

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Softmax at `temperature`, keep the smallest set of tokens whose mass reaches `top_p`,
    /// draw from it. `seed` seeds libtorch's generator so a run can be repeated.
    TopP {
        temperature: f64,
        top_p: f64,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub stop_on_eos: bool,
    /// Stop at the first newline that follows some text (leading newlines do not count).
    pub stop_on_newline: bool,
    /// Generation stops once the new text contains one of these; the text is cut before it.
    pub stop_strings: Vec<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            stop_on_eos: true,
            stop_on_newline: false,
            stop_strings: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Newline,
    StopString,
    Length,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// New tokens, including the EOS or newline token that ended generation.
    pub token_ids: Vec<u32>,
    /// Decoded new text without special tokens, cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
}

fn ids_tensor(ids: &[u32], device: Device) -> Result<Tensor> {
    let as_i64: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Ok(Tensor::f_from_slice(&as_i64)?.f_to_device(device)?)
}

fn check_prompt(model: &Llama, ids: &[u32], what: &str) -> Result<()> {
    if ids.is_empty() {
        return Err(LlmError::invalid(format!("{what} is empty")));
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = ids.iter().find(|&&id| id >= vocab) {
        return Err(LlmError::invalid(format!(
            "{what} holds token id {bad}, beyond the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// Generates continuations of several prompts together: prompts are left-padded into one
/// batch, prefilled in one forward, then decoded one token per step for every sequence
/// still running.
pub fn generate(
    model: &Llama,
    tokenizer: &LlmTokenizer,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
) -> Result<Vec<Generation>> {
    generate_with(model, tokenizer, prompts, None, options)
}

/// [`generate`] with input-embedding overrides in the prompts (the ID slots of unified
/// prompts): `overrides.batch` indexes `prompts`, `overrides.position` is the position within
/// that prompt (the left padding is accounted for here).
pub fn generate_with(
    model: &Llama,
    tokenizer: &LlmTokenizer,
    prompts: &[Vec<u32>],
    overrides: Option<&SlotOverrides>,
    options: &GenerateOptions,
) -> Result<Vec<Generation>> {
    let _guard = tch::no_grad_guard();
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let context = model.config.max_position_embeddings;
    for (i, p) in prompts.iter().enumerate() {
        check_prompt(model, p, &format!("prompt {i}"))?;
        if p.len()
            .checked_add(options.max_new_tokens)
            .is_none_or(|total| total > context)
        {
            return Err(LlmError::invalid(format!(
                "prompt {i} has {} tokens; with {} new ones it exceeds the model's context of {context}",
                p.len(),
                options.max_new_tokens
            )));
        }
    }
    if let Sampling::TopP {
        temperature,
        top_p,
        seed,
    } = options.sampling
    {
        // Written so that NaN fails too.
        let valid = temperature > 0.0 && top_p > 0.0 && top_p <= 1.0;
        if !valid {
            return Err(LlmError::invalid(format!(
                "temperature ({temperature}) must be > 0 and top_p ({top_p}) in (0, 1]"
            )));
        }
        tch::manual_seed(seed as i64);
    }
    let device = model.device();
    let b = prompts.len() as i64;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let pad_id = i64::from(tokenizer.pad_id.or(tokenizer.eos_id).unwrap_or(0));
    let mut ids = Vec::with_capacity((b * longest) as usize);
    let mut positions = Vec::with_capacity(ids.capacity());
    let mut valid = Vec::with_capacity(ids.capacity());
    for p in prompts {
        let pad = longest - p.len() as i64;
        for j in 0..longest {
            let real = j >= pad;
            ids.push(if real {
                i64::from(p[(j - pad) as usize])
            } else {
                pad_id
            });
            positions.push((j - pad).max(0));
            valid.push(real);
        }
    }
    let ids = Tensor::f_from_slice(&ids)?
        .f_view([b, longest])?
        .f_to_device(device)?;
    let positions_t = Tensor::f_from_slice(&positions)?
        .f_view([b, longest])?
        .f_to_device(device)?;
    let padded = prompts.iter().any(|p| p.len() as i64 != longest);
    let valid_t = if padded {
        Some(
            Tensor::f_from_slice(&valid)?
                .f_view([b, longest])?
                .f_to_device(device)?,
        )
    } else {
        None
    };

    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let shifted = match overrides {
        None => None,
        Some(o) => {
            // Left padding moves prompt i right by (longest - len_i).
            let pads: Vec<i64> = prompts.iter().map(|p| longest - p.len() as i64).collect();
            let pads = Tensor::f_from_slice(&pads)?.f_to_device(device)?;
            let shift = pads.f_index_select(0, &o.batch.f_to_device(device)?)?;
            Some(SlotOverrides {
                batch: o.batch.f_to_device(device)?,
                position: o.position.f_to_device(device)?.f_add(&shift)?,
                vectors: o.vectors.shallow_clone(),
            })
        }
    };
    let embeds = model.embed(&ids, shifted.as_ref())?;
    let hidden = model.forward_embeds(&embeds, &positions_t, valid_t.as_ref(), Some(&mut cache))?;
    let mut logits = model.last_logits(&hidden)?;
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();

    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut finished: Vec<Option<FinishReason>> = vec![None; prompts.len()];
    for _step in 0..options.max_new_tokens {
        let chosen = choose(&logits, &options.sampling)?;
        for (i, &token) in chosen.iter().enumerate() {
            if finished[i].is_some() {
                continue;
            }
            outputs[i].push(token);
            finished[i] = stop_reason(tokenizer, &outputs[i], token, options)?;
        }
        if finished.iter().all(Option::is_some) {
            break;
        }
        let step_ids: Vec<i64> = chosen.iter().map(|&t| i64::from(t)).collect();
        let step_ids = Tensor::f_from_slice(&step_ids)?
            .f_view([b, 1])?
            .f_to_device(device)?;
        let step_pos = Tensor::f_from_slice(&next_pos)?
            .f_view([b, 1])?
            .f_to_device(device)?;
        for p in &mut next_pos {
            *p += 1;
        }
        let embeds = model.embed(&step_ids, None)?;
        let hidden = model.forward_embeds(&embeds, &step_pos, None, Some(&mut cache))?;
        logits = model.last_logits(&hidden)?;
    }

    let mut generations = Vec::with_capacity(prompts.len());
    for ((prompt, new_ids), finish) in prompts.iter().zip(outputs).zip(finished) {
        let finish_reason = finish.unwrap_or(FinishReason::Length);
        let mut text = tokenizer.decode(&new_ids, true)?;
        if finish_reason == FinishReason::StopString
            && let Some(cut) = options
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
        {
            text.truncate(cut);
        }
        generations.push(Generation {
            prompt_ids: prompt.clone(),
            token_ids: new_ids,
            text,
            finish_reason,
        });
    }
    Ok(generations)
}

fn stop_reason(
    tokenizer: &LlmTokenizer,
    so_far: &[u32],
    token: u32,
    options: &GenerateOptions,
) -> Result<Option<FinishReason>> {
    if options.stop_on_eos && tokenizer.eos_id == Some(token) {
        return Ok(Some(FinishReason::Eos));
    }
    // A newline ends the answer once some text precedes it: leading newlines are skipped, as
    // LLaRA strips the output before keeping its first line.
    if options.stop_on_newline
        && tokenizer.decode(&[token], false)?.contains('\n')
        && tokenizer.decode(so_far, true)?.trim_start().contains('\n')
    {
        return Ok(Some(FinishReason::Newline));
    }
    if !options.stop_strings.is_empty() {
        let text = tokenizer.decode(so_far, true)?;
        if options
            .stop_strings
            .iter()
            .any(|s| text.contains(s.as_str()))
        {
            return Ok(Some(FinishReason::StopString));
        }
    }
    Ok(None)
}

/// The next token of each row of `logits` `[B, vocab]`.
fn choose(logits: &Tensor, sampling: &Sampling) -> Result<Vec<u32>> {
    let picked = match sampling {
        Sampling::Greedy => logits.f_argmax(-1, false)?,
        Sampling::TopP {
            temperature, top_p, ..
        } => {
            let probs = logits
                .f_div_scalar(*temperature)?
                .f_softmax(-1, Kind::Float)?;
            let (sorted, order) = probs.f_sort(-1, true)?;
            let before = sorted.f_cumsum(-1, Kind::Float)?.f_sub(&sorted)?;
            // Keep a token while the mass before it is below top_p (the first always stays).
            let keep = before.f_lt(*top_p)?;
            let kept = sorted.f_mul(&keep.f_to_kind(Kind::Float)?)?;
            let draw = kept.f_multinomial(1, false)?;
            order.f_gather(-1, &draw, false)?.f_squeeze_dim(-1)?
        }
    };
    let picked: Vec<i64> = Vec::<i64>::try_from(picked.f_to_device(Device::Cpu)?)?;
    Ok(picked.into_iter().map(|t| t as u32).collect())
}

/// Log-likelihood of one continuation given the prompt.
#[derive(Debug, Clone, Serialize)]
pub struct ContinuationScore {
    pub continuation_ids: Vec<u32>,
    /// log p(token | prompt, earlier continuation tokens), one per continuation token.
    pub token_logprobs: Vec<f32>,
    pub sum_logprob: f64,
    pub mean_logprob: f64,
}

/// Continuation tokens packed into one row per forward: bounds the `[T, P + T]` attention
/// mask and the attention weights of one packed pass.
const MAX_PACKED_TOKENS: usize = 512;

/// Scores `continuations` (token ids, each non-empty) after `prompt`. The prompt is prefilled
/// once (batch 1) into a KV cache. The continuations are then packed end to end into one row
/// (several rows when they exceed `MAX_PACKED_TOKENS`) that runs over the cached prompt under
/// a block mask: each continuation sees the whole prompt and its own earlier tokens, at the
/// positions it would have after the prompt, and nothing of the others. No padding is
/// computed and the prompt's cache is never copied per continuation. Only the rows that
/// predict a continuation token go through the output head.
pub fn score_continuations(
    model: &Llama,
    prompt: &[u32],
    continuations: &[Vec<u32>],
) -> Result<Vec<ContinuationScore>> {
    score_continuations_with(model, prompt, None, continuations)
}

/// [`score_continuations`] with input-embedding overrides in the prompt (batch index 0,
/// positions within the prompt): the ranking evaluation of unified prompts.
pub fn score_continuations_with(
    model: &Llama,
    prompt: &[u32],
    overrides: Option<&SlotOverrides>,
    continuations: &[Vec<u32>],
) -> Result<Vec<ContinuationScore>> {
    if continuations.is_empty() {
        // Still checked, but no prompt to encode.
        check_prompt(model, prompt, "prompt")?;
        return Ok(Vec::new());
    }
    Ok(score_continuations_and_prompt_state(model, prompt, overrides, continuations)?.0)
}

/// [`score_continuations_with`], also returning the prompt's last hidden state `[D]` (the
/// final norm's output at its last position, what RSLLM's alignment heads read), so a caller
/// that needs both encodes the prompt once.
pub fn score_continuations_and_prompt_state(
    model: &Llama,
    prompt: &[u32],
    overrides: Option<&SlotOverrides>,
    continuations: &[Vec<u32>],
) -> Result<(Vec<ContinuationScore>, Tensor)> {
    let _guard = tch::no_grad_guard();
    check_prompt(model, prompt, "prompt")?;
    for (i, c) in continuations.iter().enumerate() {
        check_prompt(model, c, &format!("continuation {i}"))?;
    }
    let device = model.device();
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    let context = model.config.max_position_embeddings;
    if prompt.len() + longest > context {
        return Err(LlmError::invalid(format!(
            "prompt ({}) plus the longest continuation ({longest}) exceed the context of {context} tokens",
            prompt.len()
        )));
    }

    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let prompt_ids = ids_tensor(prompt, device)?.f_view([1, -1])?;
    let prompt_positions =
        Tensor::f_arange(prompt.len() as i64, (Kind::Int64, device))?.f_view([1, -1])?;
    let prompt_embeds = model.embed(&prompt_ids, overrides)?;
    let prompt_hidden =
        model.forward_embeds(&prompt_embeds, &prompt_positions, None, Some(&mut cache))?;
    let prompt_state = prompt_hidden
        .f_select(0, 0)?
        .f_select(0, prompt.len() as i64 - 1)?;
    if continuations.is_empty() {
        return Ok((Vec::new(), prompt_state));
    }
    // The prompt's last position predicts every continuation's first token.
    let first = model
        .last_logits(&prompt_hidden)?
        .f_log_softmax(-1, Kind::Float)?
        .f_squeeze_dim(0)?;
    let first_targets: Vec<i64> = continuations.iter().map(|c| i64::from(c[0])).collect();
    let first_logp = first.f_index_select(
        0,
        &Tensor::f_from_slice(&first_targets)?.f_to_device(device)?,
    )?;
    let first_logp = Vec::<f32>::try_from(first_logp.f_to_device(Device::Cpu)?)?;

    // Log-probs of tokens 1.. of each continuation, filled group by group.
    let mut later: Vec<Vec<f32>> = continuations
        .iter()
        .map(|c| Vec::with_capacity(c.len()))
        .collect();
    let mut group: Vec<usize> = Vec::new();
    let mut group_tokens = 0;
    for (i, c) in continuations.iter().enumerate() {
        if !group.is_empty() && group_tokens + c.len() > MAX_PACKED_TOKENS {
            score_packed(
                model,
                &cache,
                prompt.len(),
                continuations,
                &group,
                &mut later,
            )?;
            group.clear();
            group_tokens = 0;
        }
        group.push(i);
        group_tokens += c.len();
    }
    score_packed(
        model,
        &cache,
        prompt.len(),
        continuations,
        &group,
        &mut later,
    )?;

    let mut scores = Vec::with_capacity(continuations.len());
    for ((c, first), rest) in continuations.iter().zip(first_logp).zip(later) {
        let mut token_logprobs = Vec::with_capacity(c.len());
        token_logprobs.push(first);
        token_logprobs.extend(rest);
        let sum: f64 = token_logprobs.iter().map(|&x| f64::from(x)).sum();
        scores.push(ContinuationScore {
            continuation_ids: c.clone(),
            mean_logprob: sum / c.len() as f64,
            sum_logprob: sum,
            token_logprobs,
        });
    }
    Ok((scores, prompt_state))
}

/// One packed pass over the cached prompt for the continuations in `group`: writes the
/// log-probs of their tokens 1.. into `later`.
fn score_packed(
    model: &Llama,
    prompt_cache: &KvCache,
    prompt_len: usize,
    continuations: &[Vec<u32>],
    group: &[usize],
    later: &mut [Vec<f32>],
) -> Result<()> {
    let device = model.device();
    let (mut ids, mut positions, mut segment) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rows, mut targets, mut owners) = (Vec::new(), Vec::new(), Vec::new());
    for (g, &i) in group.iter().enumerate() {
        let start = ids.len() as i64;
        for (j, &token) in continuations[i].iter().enumerate() {
            ids.push(i64::from(token));
            positions.push((prompt_len + j) as i64);
            segment.push(g as i64);
            if j > 0 {
                // Row start + j - 1 predicts token j.
                rows.push(start + j as i64 - 1);
                targets.push(i64::from(token));
                owners.push(i);
            }
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let t = ids.len() as i64;
    let p = prompt_len as i64;
    let ids = Tensor::f_from_slice(&ids)?
        .f_view([1, t])?
        .f_to_device(device)?;
    let positions = Tensor::f_from_slice(&positions)?
        .f_view([1, t])?
        .f_to_device(device)?;
    let segment = Tensor::f_from_slice(&segment)?.f_to_device(device)?;
    // Query row q sees every prompt key, and the packed keys k <= q of its own continuation.
    let idx = Tensor::f_arange(t, (Kind::Int64, device))?;
    let causal = idx.f_unsqueeze(0)?.f_le_tensor(&idx.f_unsqueeze(1)?)?;
    let same = segment
        .f_unsqueeze(0)?
        .f_eq_tensor(&segment.f_unsqueeze(1)?)?;
    let packed = causal.f_logical_and(&same)?;
    let to_prompt = Tensor::f_ones([t, p], (Kind::Bool, device))?;
    let mask = Tensor::f_cat(&[&to_prompt, &packed], 1)?.f_view([1, 1, t, p + t])?;

    let embeds = model.embed(&ids, None)?;
    let hidden = model.forward_masked(&embeds, &positions, &mask, Some(prompt_cache))?;
    let rows_t = Tensor::f_from_slice(&rows)?.f_to_device(device)?;
    let zeros = Tensor::f_zeros_like(&rows_t)?;
    let targets = Tensor::f_from_slice(&targets)?.f_to_device(device)?;
    let logp = model
        .logits_at(&hidden, Some((&zeros, &rows_t)))?
        .f_log_softmax(-1, Kind::Float)?
        .f_gather(1, &targets.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    let logp = Vec::<f32>::try_from(logp.f_to_device(Device::Cpu)?)?;
    for (owner, value) in owners.into_iter().zip(logp) {
        if let Some(slot) = later.get_mut(owner) {
            slot.push(value);
        }
    }
    Ok(())
}

/// One prompt and its candidate continuations, for [`score_batch`].
#[derive(Debug, Clone, Copy)]
pub struct ScoreRequest<'a> {
    pub prompt: &'a [u32],
    pub continuations: &'a [Vec<u32>],
}

/// Scores several prompts' continuations in one forward pass: the serving path, where
/// concurrent requests are batched. Each request becomes one row holding its prompt followed
/// by its continuations packed end to end; a block mask lets every continuation token see the
/// whole prompt and its own earlier tokens only, at the positions it would have after the
/// prompt (so the row scores exactly what [`score_continuations`] does), and rows are padded
/// on the right to the longest. `overrides` index rows by request and positions within the
/// prompt. Returns, per request, one score per continuation.
pub fn score_batch(
    model: &Llama,
    requests: &[ScoreRequest<'_>],
    overrides: Option<&SlotOverrides>,
) -> Result<Vec<Vec<ContinuationScore>>> {
    let _guard = tch::no_grad_guard();
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let context = model.config.max_position_embeddings;
    for (r, req) in requests.iter().enumerate() {
        check_prompt(model, req.prompt, &format!("request {r}: prompt"))?;
        if req.continuations.is_empty() {
            return Err(LlmError::invalid(format!("request {r}: no continuations")));
        }
        for (i, c) in req.continuations.iter().enumerate() {
            check_prompt(model, c, &format!("request {r}: continuation {i}"))?;
        }
        let longest = req.continuations.iter().map(Vec::len).max().unwrap_or(0);
        if req.prompt.len() + longest > context {
            return Err(LlmError::invalid(format!(
                "request {r}: prompt ({}) plus the longest continuation ({longest}) exceed the context of {context} tokens",
                req.prompt.len()
            )));
        }
    }
    let device = model.device();
    let row_len = |req: &ScoreRequest<'_>| {
        req.prompt.len() + req.continuations.iter().map(Vec::len).sum::<usize>()
    };
    let t = requests.iter().map(row_len).max().unwrap_or(0);
    let b = requests.len();
    // Segment of each token: -1 the prompt, j continuation j, -2 padding.
    const PROMPT: i64 = -1;
    const PAD: i64 = -2;
    let mut ids = vec![0i64; b * t];
    let mut positions = vec![0i64; b * t];
    let mut segment = vec![PAD; b * t];
    // (batch row, token row, target token) of every scored token, in request/continuation order.
    let (mut at_batch, mut at_row, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (r, req) in requests.iter().enumerate() {
        let base = r * t;
        let p = req.prompt.len();
        for (i, &tok) in req.prompt.iter().enumerate() {
            ids[base + i] = i64::from(tok);
            positions[base + i] = i as i64;
            segment[base + i] = PROMPT;
        }
        let mut start = p;
        for (j, c) in req.continuations.iter().enumerate() {
            for (k, &tok) in c.iter().enumerate() {
                ids[base + start + k] = i64::from(tok);
                positions[base + start + k] = (p + k) as i64;
                segment[base + start + k] = j as i64;
                // Token k is predicted by the prompt's last row (k = 0) or by token k - 1.
                at_batch.push(r as i64);
                at_row.push(if k == 0 { p - 1 } else { start + k - 1 } as i64);
                targets.push(i64::from(tok));
            }
            start += c.len();
        }
        // Padding keeps increasing positions (any valid position; its rows are never read).
        for (i, pos) in positions[base + start..base + t].iter_mut().enumerate() {
            *pos = (p + i).min(context - 1) as i64;
        }
    }
    let (b64, t64) = (b as i64, t as i64);
    let to_device = |v: &[i64]| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(v)?
            .f_view([b64, t64])?
            .f_to_device(device)?)
    };
    let ids = to_device(&ids)?;
    let positions = to_device(&positions)?;
    let segment = to_device(&segment)?;
    // q sees k when k <= q and k is a prompt token or of q's own segment; a padding row sees
    // only itself (a row with no visible key would give NaNs).
    let idx = Tensor::f_arange(t64, (Kind::Int64, device))?;
    let causal = idx.f_unsqueeze(0)?.f_le_tensor(&idx.f_unsqueeze(1)?)?;
    let seg_q = segment.f_unsqueeze(2)?;
    let seg_k = segment.f_unsqueeze(1)?;
    let key_is_prompt = seg_k.f_eq(PROMPT)?;
    let same = seg_q.f_eq_tensor(&seg_k)?;
    let diagonal = Tensor::f_eye(t64, (Kind::Bool, device))?.f_unsqueeze(0)?;
    let mask = causal
        .f_unsqueeze(0)?
        .f_logical_and(&key_is_prompt.f_logical_or(&same)?)?
        .f_logical_or(&diagonal)?
        .f_unsqueeze(1)?;

    let embeds = model.embed(&ids, overrides)?;
    let hidden = model.forward_masked(&embeds, &positions, &mask, None)?;
    let at_batch = Tensor::f_from_slice(&at_batch)?.f_to_device(device)?;
    let at_row = Tensor::f_from_slice(&at_row)?.f_to_device(device)?;
    let targets_t = Tensor::f_from_slice(&targets)?.f_to_device(device)?;
    let logp = model
        .logits_at(&hidden, Some((&at_batch, &at_row)))?
        .f_log_softmax(-1, Kind::Float)?
        .f_gather(1, &targets_t.f_unsqueeze(1)?, false)?
        .f_squeeze_dim(1)?;
    let logp = Vec::<f32>::try_from(logp.f_to_device(Device::Cpu)?)?;

    let mut values = logp.into_iter();
    let mut out = Vec::with_capacity(b);
    for req in requests {
        let mut scores = Vec::with_capacity(req.continuations.len());
        for c in req.continuations {
            let token_logprobs: Vec<f32> = values.by_ref().take(c.len()).collect();
            let sum: f64 = token_logprobs.iter().map(|&x| f64::from(x)).sum();
            scores.push(ContinuationScore {
                continuation_ids: c.clone(),
                mean_logprob: sum / c.len() as f64,
                sum_logprob: sum,
                token_logprobs,
            });
        }
        out.push(scores);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{tiny_config, tiny_model};

    /// Log-probs of `cont` after `prompt` from one plain forward over the concatenation.
    fn reference(model: &Llama, prompt: &[u32], cont: &[u32]) -> Vec<f32> {
        let all: Vec<u32> = prompt.iter().chain(cont).copied().collect();
        let ids = ids_tensor(&all, Device::Cpu).unwrap().view([1, -1]);
        let hidden = tch::no_grad(|| model.forward_ids(&ids, None).unwrap());
        let logp = model
            .logits_at(&hidden, None)
            .unwrap()
            .log_softmax(-1, Kind::Float);
        cont.iter()
            .enumerate()
            .map(|(j, &t)| logp.double_value(&[(prompt.len() + j - 1) as i64, i64::from(t)]) as f32)
            .collect()
    }

    #[test]
    fn shared_prefix_scoring_equals_separate_full_forwards() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let prompt = vec![5u32, 6, 7, 8];
        let conts = vec![vec![9u32], vec![10, 11, 12], vec![13, 14]];
        let scores = score_continuations(&model, &prompt, &conts).unwrap();
        for (cont, score) in conts.iter().zip(&scores) {
            let want = reference(&model, &prompt, cont);
            assert_eq!(score.token_logprobs.len(), cont.len());
            for (a, b) in score.token_logprobs.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            let sum: f64 = want.iter().map(|&x| f64::from(x)).sum();
            assert!((score.sum_logprob - sum).abs() < 1e-4);
            assert!((score.mean_logprob - sum / cont.len() as f64).abs() < 1e-4);
        }
    }

    #[test]
    fn batched_one_pass_scoring_equals_per_prompt_scoring() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let prompts = [
            vec![5u32, 6, 7, 8],
            vec![20u32, 21],
            vec![30u32, 31, 32, 33, 34, 35],
        ];
        let conts = [
            vec![vec![9u32], vec![10, 11, 12], vec![13, 14]],
            vec![vec![40u32, 41, 42, 43, 44]],
            vec![vec![50u32, 51], vec![52]],
        ];
        let vector = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
        // Overrides at prompt positions of requests 0 and 2.
        let overrides = SlotOverrides {
            batch: Tensor::from_slice(&[0i64, 2]),
            position: Tensor::from_slice(&[1i64, 3]),
            vectors: vector.shallow_clone(),
        };
        let requests: Vec<ScoreRequest<'_>> = prompts
            .iter()
            .zip(&conts)
            .map(|(p, c)| ScoreRequest {
                prompt: p,
                continuations: c,
            })
            .collect();
        let batched = score_batch(&model, &requests, Some(&overrides)).unwrap();
        for (r, (p, cs)) in prompts.iter().zip(&conts).enumerate() {
            let single_override = match r {
                0 => Some((1i64, vector.get(0))),
                2 => Some((3i64, vector.get(1))),
                _ => None,
            }
            .map(|(pos, v)| SlotOverrides {
                batch: Tensor::from_slice(&[0i64]),
                position: Tensor::from_slice(&[pos]),
                vectors: v.unsqueeze(0),
            });
            let single = score_continuations_with(&model, p, single_override.as_ref(), cs).unwrap();
            assert_eq!(batched[r].len(), single.len());
            for (a, s) in batched[r].iter().zip(&single) {
                assert_eq!(a.token_logprobs.len(), s.token_logprobs.len());
                for (x, y) in a.token_logprobs.iter().zip(&s.token_logprobs) {
                    assert!((x - y).abs() < 1e-4, "request {r}: {x} vs {y}");
                }
            }
        }
        // Bad input is an error, not a panic.
        let empty: Vec<Vec<u32>> = Vec::new();
        let bad = [ScoreRequest {
            prompt: &prompts[0],
            continuations: &empty,
        }];
        assert!(score_batch(&model, &bad, None).is_err());
    }

    #[test]
    fn continuations_beyond_one_packed_row_score_the_same() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let prompt = vec![5u32, 6, 7];
        // 45 continuations of 12 tokens: 540 tokens, more than one packed row holds.
        let conts: Vec<Vec<u32>> = (0..45u32)
            .map(|i| (0..12u32).map(|j| 3 + (i * 13 + j * 7) % 90).collect())
            .collect();
        assert!(conts.iter().map(Vec::len).sum::<usize>() > MAX_PACKED_TOKENS);
        let scores = score_continuations(&model, &prompt, &conts).unwrap();
        for i in [0usize, 20, 41, 44] {
            let want = reference(&model, &prompt, &conts[i]);
            for (a, b) in scores[i].token_logprobs.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "continuation {i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn overrides_reach_scoring_and_generation() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let prompt = vec![5u32, 6, 7, 8];
        let conts = vec![vec![9u32, 10], vec![11]];
        let vector = Tensor::randn([1, 32], (Kind::Float, Device::Cpu));
        let slot = |batch: i64| SlotOverrides {
            batch: Tensor::from_slice(&[batch]),
            position: Tensor::from_slice(&[2i64]),
            vectors: vector.shallow_clone(),
        };
        let plain = score_continuations(&model, &prompt, &conts).unwrap();
        let with = score_continuations_with(&model, &prompt, Some(&slot(0)), &conts).unwrap();
        assert!(
            (plain[0].sum_logprob - with[0].sum_logprob).abs() > 1e-4,
            "the slot must matter"
        );
        // Same as a full forward over embeddings with the slot spliced in.
        let all: Vec<i64> = [5i64, 6, 7, 8, 9, 10].to_vec();
        let ids = Tensor::from_slice(&all).view([1, 6]);
        let embeds = model.embed(&ids, Some(&slot(0))).unwrap();
        let positions = Tensor::arange(6, (Kind::Int64, Device::Cpu)).view([1, 6]);
        let hidden = tch::no_grad(|| {
            model
                .forward_embeds(&embeds, &positions, None, None)
                .unwrap()
        });
        let logp = model
            .logits_at(&hidden, None)
            .unwrap()
            .log_softmax(-1, Kind::Float);
        let want = logp.double_value(&[3, 9]) + logp.double_value(&[4, 10]);
        assert!(
            (with[0].sum_logprob - want).abs() < 1e-4,
            "{} vs {want}",
            with[0].sum_logprob
        );
    }

    #[test]
    fn scoring_refuses_bad_input() {
        let _rng = crate::test_rng_lock();
        let c = tiny_config();
        let (_vs, model) = tiny_model(&c);
        let err = score_continuations(&model, &[], &[vec![1]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("prompt is empty"), "{err}");
        let err = score_continuations(&model, &[1], &[vec![]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("continuation 0 is empty"), "{err}");
        let err = score_continuations(&model, &[1], &[vec![500]])
            .unwrap_err()
            .to_string();
        assert!(err.contains("500"), "{err}");
    }
}
