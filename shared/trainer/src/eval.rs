//! Evaluation in both modes of METHOD.md, on the stored candidate sets:
//!
//! - generative (LLaRA's definition): greedy decoding, at most 64 new tokens, the first line
//!   kept; lower-case and strip it and every candidate title; the candidates whose title
//!   occurs in the line are its matches; valid iff exactly one matches; correct iff valid and
//!   that title is the target's. ValidRatio = valid / n, HitRatio@1 = correct / n.
//! - ranking (our addition): each candidate's continuation `" title\n"` scored by its summed
//!   log-likelihood after the prompt (the prompt encoded once, candidates packed over its
//!   cache); HR@1, HR@5 and NDCG@5 from the target's rank (ties pessimistic).
//! - alignment (our addition, trained stages only): the candidates ranked by L_ui's own
//!   score, the cosine of `u = W_u h` (h: the prompt's last hidden state) with each
//!   candidate's `v_i = W_v (P(e_i) + t_i)`, the heads stage 1 and 2 train beside the LM; `h`
//!   from the ranking pass's prompt encoding, or one prompt forward per row without it; no
//!   decoding. It says whether the user-item alignment learned to rank on its own.
//! - likelihood + alignment (our addition, where both of the above ran): each candidate's
//!   summed log-likelihood plus its cosine over L_ui's temperature, `cos / tau`: the product of
//!   the two candidate distributions the model was trained to give (the LM's over answers,
//!   L_ui's softmax over candidates), with nothing tuned on the test rows.
//!
//! Every number comes with its row count and a 95% interval; every row is kept for the CSV.

use std::path::Path;

use rsllm_core::metrics::{MeanCi, RankingMetrics, rank_of_target, ranking_metrics, wilson};
use rsllm_core::{Catalog, ItemId, SeqExample};
use rsllm_llm::{GenerateOptions, Llama, LlmTokenizer, Sampling, SlotOverrides};
use rsllm_prompt::{BuiltPrompt, PromptBuilder, PromptMode, SlotRole, TemplateChoice};
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::losses::{UiSimilarity, similarity_logits};
use crate::objective::{ItemTable, RsllmHeads, SlotIndex};

/// What LLaRA's matching rule says about one generated answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    /// The first line of the generation, stripped and lower-cased.
    pub line: String,
    pub matches: Vec<ItemId>,
    pub valid: bool,
    pub correct: bool,
}

/// LLaRA's rule (model_interface.py): substring matches of the lower-cased, stripped titles.
pub fn judge(
    generated: &str,
    catalog: &Catalog,
    candidates: &[ItemId],
    target: ItemId,
) -> Judgement {
    let titled: Vec<(ItemId, &str)> = candidates
        .iter()
        .map(|&c| (c, catalog.title(c).unwrap_or("")))
        .collect();
    judge_titles(
        generated,
        &titled,
        Some(catalog.title(target).unwrap_or("")),
    )
}

/// [`judge`] over candidates given with their titles (the llm-service has titles from the
/// prompt-service, not a catalog); `target_title` None when the answer is unknown (serving).
pub fn judge_titles(
    generated: &str,
    candidates: &[(ItemId, &str)],
    target_title: Option<&str>,
) -> Judgement {
    let line = generated
        .trim()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase();
    let norm = |t: &str| t.trim().to_lowercase();
    let matches: Vec<(ItemId, String)> = candidates
        .iter()
        .map(|&(c, t)| (c, norm(t)))
        .filter(|(_, t)| !t.is_empty() && line.contains(t.as_str()))
        .collect();
    let valid = matches.len() == 1;
    let correct = valid
        && target_title
            .is_some_and(|target| matches.first().is_some_and(|(_, t)| *t == norm(target)));
    Judgement {
        line,
        matches: matches.into_iter().map(|(c, _)| c).collect(),
        valid,
        correct,
    }
}

/// One evaluated row, as written to the CSV.
#[derive(Debug, Clone, Serialize)]
pub struct RowResult {
    pub row: usize,
    pub user: u32,
    pub target: ItemId,
    pub candidates: Vec<ItemId>,
    pub generated: Option<String>,
    pub judgement: Option<Judgement>,
    /// Summed log-likelihood per candidate (ranking mode), in candidate order.
    pub scores: Option<Vec<f64>>,
    pub rank: Option<usize>,
    /// Cosine of the user vector with each candidate's item vector (alignment mode), in
    /// candidate order.
    pub alignment_scores: Option<Vec<f64>>,
    /// The target's rank by the alignment heads (alignment mode).
    pub alignment_rank: Option<usize>,
    /// The target's rank by likelihood + alignment (where both ran).
    pub combined_rank: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub n: usize,
    /// Generative mode.
    pub valid_ratio: Option<MeanCi>,
    pub hr1_generative: Option<MeanCi>,
    /// Ranking mode.
    pub ranking: Option<RankingMetrics>,
    /// Alignment mode (None when not asked or when the model has no trained heads).
    pub alignment: Option<RankingMetrics>,
    /// Likelihood + alignment (None unless both ran).
    pub combined: Option<RankingMetrics>,
    pub rows: Vec<RowResult>,
}

/// The model side of an evaluation: the LLM, and for unified prompts the projector and the
/// recommender's item vectors.
pub struct Evaluated<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a LlmTokenizer,
    pub heads: Option<&'a RsllmHeads>,
    pub items: Option<&'a ItemTable>,
}

pub struct EvalOptions {
    pub prompt_mode: PromptMode,
    pub generative: bool,
    pub ranking: bool,
    /// Rank by the alignment heads too, where the model has them.
    pub alignment: bool,
    /// L_ui's temperature the heads were trained with (the stage's `loss.tau`): the combined
    /// ranking adds `cos / tau` to the summed log-likelihood.
    pub alignment_tau: f64,
    /// L_ui's similarity the heads were trained with (the stage's `loss.ui_similarity`): they
    /// rank by it.
    pub alignment_similarity: UiSimilarity,
    /// Rows generated together (left-padded batch).
    pub generation_batch: usize,
    pub max_new_tokens: usize,
}

impl EvalOptions {
    /// How many passes over the rows these options make for a model with (`trained`) or
    /// without alignment heads: what `evaluate`'s progress counts to, per row.
    pub fn passes(&self, trained: bool) -> usize {
        usize::from(self.generative)
            + usize::from(self.ranking)
            + usize::from(self.alignment && trained)
    }
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            prompt_mode: PromptMode::TextOnly,
            generative: true,
            ranking: true,
            alignment: true,
            alignment_tau: crate::objective::LossConfig::default().tau,
            alignment_similarity: UiSimilarity::Cosine,
            generation_batch: 8,
            max_new_tokens: 64,
        }
    }
}

/// The projected slot vectors of prompts batched in this order, or None.
fn slot_overrides(e: &Evaluated<'_>, prompts: &[&BuiltPrompt]) -> Result<Option<SlotOverrides>> {
    let mut slots = SlotIndex::default();
    for (row, p) in prompts.iter().enumerate() {
        slots.push(row, p);
    }
    if slots.is_empty() {
        return Ok(None);
    }
    let (Some(heads), Some(table)) = (e.heads, e.items) else {
        return Err(TrainError::Invalid(
            "unified prompts need the projector and the recommender's item vectors".into(),
        ));
    };
    let Some(mut overrides) = slots.overrides(heads, table, e.model.device())? else {
        return Ok(None);
    };
    overrides.vectors = overrides.vectors.f_to_kind(e.model.kind())?;
    Ok(Some(overrides))
}

fn prompt_error(row: usize, err: impl std::fmt::Display) -> TrainError {
    TrainError::Invalid(format!("row {row}: {err}"))
}

/// Evaluates `rows` (with their stored candidates) in the modes `options` asks for.
/// `progress(k)` counts rows done, once per mode: [`EvalOptions::passes`] times `rows.len()`
/// in all.
pub fn evaluate(
    e: &Evaluated<'_>,
    builder: &PromptBuilder,
    catalog: &Catalog,
    rows: &[SeqExample],
    options: &EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    let _guard = tch::no_grad_guard();
    e.model.set_training(false);
    let prompts = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            builder
                .build(
                    e.tokenizer,
                    catalog,
                    &r.history,
                    &r.candidates,
                    Some(r.target),
                    options.prompt_mode,
                    TemplateChoice::Fixed(0),
                )
                .map_err(|err| prompt_error(i, err))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut results: Vec<RowResult> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| RowResult {
            row: i,
            user: r.user,
            target: r.target,
            candidates: r.candidates.clone(),
            generated: None,
            judgement: None,
            scores: None,
            rank: None,
            alignment_scores: None,
            alignment_rank: None,
            combined_rank: None,
        })
        .collect();

    if options.generative {
        let generate = GenerateOptions {
            max_new_tokens: options.max_new_tokens,
            sampling: Sampling::Greedy,
            stop_on_eos: true,
            // Only the first line is judged: stopping there gives the same line sooner.
            stop_on_newline: true,
            stop_strings: Vec::new(),
        };
        let indices: Vec<usize> = (0..prompts.len()).collect();
        for chunk in indices.chunks(options.generation_batch.max(1)) {
            let batch: Vec<&BuiltPrompt> = chunk.iter().map(|&i| &prompts[i]).collect();
            let ids: Vec<Vec<u32>> = batch.iter().map(|p| p.input_ids.clone()).collect();
            let overrides = slot_overrides(e, &batch)?;
            let outputs = rsllm_llm::generate_with(
                e.model,
                e.tokenizer,
                &ids,
                overrides.as_ref(),
                &generate,
            )?;
            for (&i, out) in chunk.iter().zip(outputs) {
                let r = &rows[i];
                results[i].judgement = Some(judge(&out.text, catalog, &r.candidates, r.target));
                results[i].generated = Some(out.text);
            }
            progress(chunk.len());
        }
    }
    // The ranking pass's prompt states, which the alignment heads read: one prompt forward
    // per row serves both.
    let mut prompt_states: Vec<Option<Tensor>> = prompts.iter().map(|_| None).collect();
    if options.ranking {
        for (i, p) in prompts.iter().enumerate() {
            let overrides = slot_overrides(e, &[p])?;
            let continuations = rows[i]
                .candidates
                .iter()
                .map(|&c| {
                    builder
                        .continuation(e.tokenizer, catalog, c)
                        .map(|(_, ids)| ids)
                })
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|err| prompt_error(i, err))?;
            let (scores, state) = rsllm_llm::score_continuations_and_prompt_state(
                e.model,
                &p.input_ids,
                overrides.as_ref(),
                &continuations,
            )?;
            prompt_states[i] = Some(state);
            let sums: Vec<f64> = scores.iter().map(|s| s.sum_logprob).collect();
            let as_f32: Vec<f32> = sums.iter().map(|&s| s as f32).collect();
            let target_index = p
                .target_index
                .ok_or_else(|| prompt_error(i, "target not among the candidates"))?;
            results[i].rank = Some(rank_of_target(&as_f32, target_index));
            results[i].scores = Some(sums);
            progress(1);
        }
    }
    let aligned = match (options.alignment, e.heads, e.items) {
        (true, Some(heads), Some(table)) => {
            for (i, p) in prompts.iter().enumerate() {
                let target = p
                    .target_index
                    .ok_or_else(|| prompt_error(i, "target not among the candidates"))?;
                let cosines = alignment_scores(
                    e,
                    (heads, table),
                    p,
                    (&rows[i].candidates, options.alignment_similarity),
                    prompt_states[i].as_ref(),
                )
                .map_err(|err| prompt_error(i, err))?;
                results[i].alignment_rank = Some(rank_of_target(&cosines, target));
                if let Some(sums) = &results[i].scores {
                    let combined: Vec<f32> = sums
                        .iter()
                        .zip(&cosines)
                        .map(|(&ll, &cos)| (ll + f64::from(cos) / options.alignment_tau) as f32)
                        .collect();
                    results[i].combined_rank = Some(rank_of_target(&combined, target));
                }
                results[i].alignment_scores = Some(cosines.iter().map(|&c| f64::from(c)).collect());
                progress(1);
            }
            true
        }
        _ => false,
    };
    let n = results.len();
    let count = |f: &dyn Fn(&Judgement) -> bool| {
        results
            .iter()
            .filter(|r| r.judgement.as_ref().is_some_and(f))
            .count()
    };
    let ranks: Vec<usize> = results.iter().filter_map(|r| r.rank).collect();
    Ok(EvalReport {
        n,
        valid_ratio: options.generative.then(|| wilson(count(&|j| j.valid), n)),
        hr1_generative: options.generative.then(|| wilson(count(&|j| j.correct), n)),
        ranking: options.ranking.then(|| ranking_metrics(&ranks)),
        alignment: aligned.then(|| {
            let ranks: Vec<usize> = results.iter().filter_map(|r| r.alignment_rank).collect();
            ranking_metrics(&ranks)
        }),
        combined: (aligned && options.ranking).then(|| {
            let ranks: Vec<usize> = results.iter().filter_map(|r| r.combined_rank).collect();
            ranking_metrics(&ranks)
        }),
        rows: results,
    })
}

/// The similarity (L_ui's: the cosine unless the stage chose otherwise) of `W_u h` (h: the
/// last hidden state of the prompt, slots filled) with each of `candidates'`
/// `W_v (P(e_i) + t_i)`, in candidate order; `P(e_i)` only where the prompt carries item
/// slots, as in training. `state`: h when the ranking pass already has it.
fn alignment_scores(
    e: &Evaluated<'_>,
    (heads, table): (&RsllmHeads, &ItemTable),
    prompt: &BuiltPrompt,
    (candidates, similarity): (&[ItemId], UiSimilarity),
    state: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let h = match state {
        Some(h) => h.shallow_clone(),
        None => prompt_state(e, prompt)?,
    };
    let u = heads.user_vectors(&h.f_unsqueeze(0)?)?;
    let with_ids = prompt.slots.iter().any(|s| s.role != SlotRole::User);
    let side = heads.item_vectors(e.model, table, candidates, with_ids)?;
    let scores = similarity_logits(&u, &side.v, 1.0, similarity)?;
    Ok(Vec::<f32>::try_from(scores.f_flatten(0, -1)?)?)
}

/// The last hidden state `[D]` of `prompt`, slots filled: one prompt forward.
pub(crate) fn prompt_state(e: &Evaluated<'_>, prompt: &BuiltPrompt) -> Result<Tensor> {
    let device = e.model.device();
    let t = prompt.input_ids.len() as i64;
    let ids: Vec<i64> = prompt.input_ids.iter().map(|&id| i64::from(id)).collect();
    let ids = Tensor::f_from_slice(&ids)?
        .f_view([1, t])?
        .f_to_device(device)?;
    let positions = Tensor::f_arange(t, (Kind::Int64, device))?.f_view([1, t])?;
    let overrides = slot_overrides(e, &[prompt])?;
    let embeds = e.model.embed(&ids, overrides.as_ref())?;
    let hidden = e.model.forward_embeds(&embeds, &positions, None, None)?;
    Ok(hidden.f_select(0, 0)?.f_select(0, t - 1)?)
}

/// Writes one line per row: row, user, target, candidates, generated first line, matches,
/// valid, correct, rank, scores, and the alignment heads' rank, cosines and the combined
/// rank. Atomic (temporary file, then rename).
pub fn write_csv(path: &Path, report: &EvalReport) -> Result<()> {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let join = |ids: &[ItemId]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ");
    let mut out = String::from(
        "row,user,target,candidates,generated,matches,valid,correct,rank,scores,alignment_rank,alignment_scores,combined_rank\n",
    );
    for r in &report.rows {
        let (generated, matches, valid, correct) = match &r.judgement {
            Some(j) => (
                quote(&j.line),
                join(&j.matches),
                j.valid.to_string(),
                j.correct.to_string(),
            ),
            None => (String::new(), String::new(), String::new(), String::new()),
        };
        let numbers = |values: &Option<Vec<f64>>| {
            values
                .as_ref()
                .map(|s| {
                    s.iter()
                        .map(|x| format!("{x:.4}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default()
        };
        let rank = |r: Option<usize>| r.map(|x| x.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.row,
            r.user,
            r.target,
            join(&r.candidates),
            generated,
            matches,
            valid,
            correct,
            rank(r.rank),
            numbers(&r.scores),
            rank(r.alignment_rank),
            numbers(&r.alignment_scores),
            rank(r.combined_rank),
        ));
    }
    rsllm_core::artefact::write_atomic(path, out.as_bytes()).map_err(|source| TrainError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog {
            dataset: "movielens".into(),
            titles: vec![
                "Heat".into(),
                "The Heat Is On".into(),
                "Fargo".into(),
                "Scream".into(),
            ],
        }
    }

    #[test]
    fn llara_matching_rule() {
        let _rng = crate::test_support::rng_lock();
        let c = catalog();
        // Exactly one candidate in the first line, case-insensitive: valid and correct.
        let j = judge("  FARGO is my guess\nHeat", &c, &[2, 3], 2);
        assert_eq!(
            (j.valid, j.correct, j.matches.clone()),
            (true, true, vec![2])
        );
        assert_eq!(j.line, "fargo is my guess");
        // Valid but wrong.
        let j = judge("Scream", &c, &[2, 3], 2);
        assert!(j.valid && !j.correct);
        // Two titles: invalid (a title inside another counts, as in LLaRA).
        let j = judge("The Heat Is On", &c, &[0, 1], 1);
        assert_eq!(j.matches, vec![0, 1]);
        assert!(!j.valid && !j.correct);
        // Nothing: invalid.
        let j = judge("I don't know", &c, &[2, 3], 2);
        assert!(!j.valid && j.matches.is_empty());
        // Only candidates count, not every title of the catalog.
        let j = judge("Heat", &c, &[2, 3], 2);
        assert!(!j.valid);
    }

    /// The trainer's fixture, its tokenizer as the LLM's, and MovieLens's prompt builder.
    fn fixture() -> (crate::test_support::Setup, LlmTokenizer, PromptBuilder) {
        let s = crate::test_support::setup();
        let (tokenizer, builder) = crate::test_support::prompt_side(&s);
        (s, tokenizer, builder)
    }

    #[test]
    fn unified_evaluation_ranks_with_projected_slots() {
        let _rng = crate::test_support::rng_lock();
        let (s, tokenizer, builder) = fixture();
        let rows: Vec<SeqExample> = (0..3u32)
            .map(|i| SeqExample {
                user: i,
                history: vec![i, i + 1],
                target: i + 4,
                candidates: vec![i + 3, i + 4, i + 5],
            })
            .collect();
        let e = Evaluated {
            model: &s.model,
            tokenizer: &tokenizer,
            heads: Some(&s.heads),
            items: Some(&s.items),
        };
        let options = EvalOptions {
            prompt_mode: PromptMode::Unified,
            max_new_tokens: 4,
            ..EvalOptions::default()
        };
        let mut seen = 0;
        let report = evaluate(&e, &builder, &s.catalog, &rows, &options, &mut |k| {
            seen += k
        })
        .unwrap();
        assert_eq!(report.n, 3);
        assert_eq!(options.passes(true), 3);
        assert_eq!(seen, 3 * 3, "each row once per mode");
        let ranking = report.ranking.as_ref().unwrap();
        assert_eq!(ranking.n, 3);
        // The ranking score is the candidate's continuation log-likelihood with the slots
        // filled: recompute row 0's target score by hand.
        let p = builder
            .build(
                &tokenizer,
                &s.catalog,
                &rows[0].history,
                &rows[0].candidates,
                Some(4),
                PromptMode::Unified,
                TemplateChoice::Fixed(0),
            )
            .unwrap();
        let o = slot_overrides(&e, &[&p]).unwrap().unwrap();
        let (_, ids) = builder.continuation(&tokenizer, &s.catalog, 4).unwrap();
        let want =
            rsllm_llm::score_continuations_with(&s.model, &p.input_ids, Some(&o), &[ids]).unwrap();
        let got = report.rows[0].scores.as_ref().unwrap()[1];
        // f32 rounding apart (the evaluation packs every candidate into one row, so its
        // products run in other shapes): a wrong slot or token would move it by far more.
        let want = want[0].sum_logprob;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        for r in &report.rows {
            assert!(r.rank.unwrap() < 3 && r.judgement.is_some());
        }
        let aligned = report.alignment.as_ref().unwrap();
        assert_eq!(aligned.n, 3);
        assert!(report.rows.iter().all(|r| r.alignment_rank.unwrap() < 3));
        assert_eq!(report.combined.as_ref().unwrap().n, 3);
        for r in &report.rows {
            assert_eq!(r.alignment_scores.as_ref().unwrap().len(), 3);
            assert!(r.combined_rank.unwrap() < 3);
        }
        // The heads read the ranking pass's prompt state: the same cosines as a forward of
        // their own (alignment alone).
        let alone = EvalOptions {
            generative: false,
            ranking: false,
            ..options
        };
        let alone = evaluate(&e, &builder, &s.catalog, &rows, &alone, &mut |_| {}).unwrap();
        for (a, b) in alone.rows.iter().zip(&report.rows) {
            let (a, b) = (
                a.alignment_scores.as_ref().unwrap(),
                b.alignment_scores.as_ref().unwrap(),
            );
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
        // The combined score is the log-likelihood plus cos / tau: a huge tau leaves the
        // likelihood's order, a tiny one the heads' order.
        for (tau, follows) in [(1e12, "likelihood"), (1e-12, "alignment")] {
            let options = EvalOptions {
                generative: false,
                alignment_tau: tau,
                ..options
            };
            let report = evaluate(&e, &builder, &s.catalog, &rows, &options, &mut |_| {}).unwrap();
            for r in &report.rows {
                let want = if follows == "likelihood" {
                    r.rank
                } else {
                    r.alignment_rank
                };
                assert_eq!(r.combined_rank, want, "tau {tau}: {r:?}");
            }
        }
        let without = EvalOptions {
            alignment: false,
            ..options
        };
        let plain = evaluate(&e, &builder, &s.catalog, &rows, &without, &mut |_| {}).unwrap();
        assert!(plain.alignment.is_none() && plain.rows[0].alignment_rank.is_none());
        assert!(plain.combined.is_none() && plain.rows[0].combined_rank.is_none());
        let options = EvalOptions {
            alignment: true,
            ..without
        };
        // Unified prompts without the projector are refused by name.
        let bare = Evaluated { heads: None, ..e };
        let err = evaluate(&bare, &builder, &s.catalog, &rows, &options, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("projector"), "{err}");
    }

    #[test]
    fn training_the_alignment_heads_teaches_them_to_rank_the_targets_first() {
        let _rng = crate::test_support::rng_lock();
        use crate::objective::{LossConfig, losses};
        use crate::optim::{AdamW, AdamWConfig};
        use rsllm_prompt::testing::PAD_ID;
        let (s, tokenizer, builder) = fixture();
        let rows: Vec<SeqExample> = (0..4u32)
            .map(|i| SeqExample {
                user: i,
                history: vec![i, i + 1, i + 2],
                target: i + 5,
                candidates: vec![i + 3, i + 4, i + 5, i + 6],
            })
            .collect();
        let e = Evaluated {
            model: &s.model,
            tokenizer: &tokenizer,
            heads: Some(&s.heads),
            items: Some(&s.items),
        };
        let options = EvalOptions {
            prompt_mode: PromptMode::Unified,
            generative: false,
            ranking: false,
            ..EvalOptions::default()
        };
        let ranks = || -> Vec<usize> {
            evaluate(&e, &builder, &s.catalog, &rows, &options, &mut |_| {})
                .unwrap()
                .rows
                .iter()
                .map(|r| r.alignment_rank.unwrap())
                .collect()
        };
        let before = ranks();
        // L_ui alone, on the same prompts.
        let prompts: Vec<BuiltPrompt> = rows
            .iter()
            .map(|r| {
                builder
                    .build(
                        &tokenizer,
                        &s.catalog,
                        &r.history,
                        &r.candidates,
                        Some(r.target),
                        PromptMode::Unified,
                        TemplateChoice::Fixed(0),
                    )
                    .unwrap()
            })
            .collect();
        let batch = crate::batch::collate(&prompts, PAD_ID, tch::Device::Cpu).unwrap();
        let config = LossConfig {
            use_lm: false,
            lambda_ui: 1.0,
            lambda_it: 0.0,
            tau: 0.07,
            ..LossConfig::default()
        };
        let mut opt = AdamW::for_var_store(&s.trained, AdamWConfig::default()).unwrap();
        for _ in 0..60 {
            opt.zero_grad();
            losses(&s.model, &s.heads, &s.items, &batch, &config)
                .unwrap()
                .total
                .backward();
            opt.step(3e-3).unwrap();
        }
        let after = ranks();
        assert_eq!(after, [0, 0, 0, 0], "before training: {before:?}");
        assert_ne!(
            before, after,
            "the untrained heads already ranked every target first"
        );
    }

    #[test]
    fn csv_quotes_generated_text() {
        let _rng = crate::test_support::rng_lock();
        let report = EvalReport {
            n: 1,
            valid_ratio: None,
            hr1_generative: None,
            ranking: None,
            alignment: None,
            combined: None,
            rows: vec![RowResult {
                row: 0,
                user: 7,
                target: 2,
                candidates: vec![2, 3],
                generated: Some("x".into()),
                judgement: Some(judge("Fargo, \"the\" film", &catalog(), &[2, 3], 2)),
                scores: Some(vec![-1.5, -2.25]),
                rank: Some(0),
                alignment_scores: Some(vec![0.125, 0.5]),
                alignment_rank: Some(1),
                combined_rank: Some(0),
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        write_csv(&path, &report).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "0,7,2,2 3,\"fargo, \"\"the\"\" film\",2,true,true,0,-1.5000 -2.2500,1,0.1250 0.5000,0"
        );
    }
}
