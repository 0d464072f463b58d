//! What the LLM carries of the user's taste (ours: a diagnostic beside the heads probe).
//!
//! The heads probe ([`crate::probe`]) measures the alignment heads with the LLM taken out:
//! handed `P(s_u)`, the recommender's user state through the projector, they rank nearly as
//! the recommender does. In a stage they read `h` instead, the LLM's last hidden state at the
//! prompt's final token. This probe asks how much of what the probe's heads use is still in
//! `h` when the LLM is left as it is (frozen, no adapters): it trains the heads probe, fills a
//! prompt's slots with the probe's projector, runs the LLM once per prompt, and then
//!
//! - **readout**: fits `P(s_u)` from `h` by ridge regression on training rows (R² on rows held
//!   out of the fit and on each evaluation part) and ranks with the probe's own `W_u` on the
//!   readout, so the probe's item side and similarity are unchanged;
//! - **refit**: trains a fresh `W_u` on `h` against the probe's (frozen) item vectors, with
//!   the catalog softmax, and, on the very same rows and steps, a fresh `W_u` on `P(s_u)`: the
//!   pair separates what the LLM loses from what fitting on fewer rows loses.
//!
//! A frozen LLM is the floor of what training its adapters can make of `h`; with the user
//! slot as the prompt's last token (`PromptMode::UnifiedWithUserLast`) `h` is computed at the
//! slot that holds `P(s_u)`. One prompt forward per row: on a CPU, minutes for thousands of
//! rows.
//!
//! The readout followed by the probe's `W_u` is an affine map of `h`; a stage's user head is
//! linear (`u = W_u h`, no bias). [`RidgeReadout::fold`] folds the constant into `W_u` along
//! the direction in which `h` barely varies, so the probe's projector and heads can start a
//! stage ([`crate::warm_heads`]); each part reports how the folded head ranks, which is where
//! such a stage starts.

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rsllm_core::dataset::candidates::draw_candidates;
use rsllm_core::metrics::{RankingMetrics, ranking_metrics};
use rsllm_core::{Catalog, ItemId, SeqExample};
use rsllm_llm::{Llama, LlmTokenizer};
use rsllm_prompt::{PromptBuilder, PromptMode, TemplateChoice};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::error::{Result, TrainError};
use crate::eval::{Evaluated, prompt_state};
use crate::objective::{ItemTable, USER_HEAD, catalog_ui_loss};
use crate::optim::{AdamW, AdamWConfig, descend};
use crate::probe::{LossLog, ProbeConfig, ProbeReport, ProbeUser, candidate_ranks, train_probe};
use crate::schedule::LrSchedule;

/// Ridge strengths tried, relative to the mean eigenvalue of the centred `h`'s Gram matrix
/// (so one grid fits any scale of `h`).
const RIDGE_GRID: [f64; 8] = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];
/// How far from singular the fold's covariance is kept, relative as [`RIDGE_GRID`] is.
const FOLD_RIDGE: f64 = 1e-3;
/// Every HOLD_OUT-th fit row is kept out of the ridge fit that picks the strength.
const HOLD_OUT: usize = 10;
/// The fewest fit rows: the held-out tenth must not be empty.
const MIN_FIT_ROWS: usize = 2 * HOLD_OUT;

/// The transport probe's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TransportConfig {
    /// The heads probe trained first (its user side must be [`ProbeUser::State`]); its steps,
    /// batch, rate, temperature and similarity are the refits' too.
    pub probe: ProbeConfig,
    /// The prompts whose `h` is read, slots filled by the probe's projector.
    pub prompt_mode: PromptMode,
    /// Training rows (drawn, seeded) whose `h` the readout and the refits are fit on.
    pub fit_rows: usize,
}

/// One evaluation part: each way of ranking from `h`, beside the same refit on `P(s_u)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportPart {
    pub part: String,
    /// R² of the ridge readout of `P(s_u)` from `h` on this part's rows.
    pub readout_r2: f64,
    /// The probe's `W_u` on the readout of `P(s_u)` from `h`.
    pub hidden_readout: RankingMetrics,
    /// The same map folded into one linear `W_u` on `h` ([`RidgeReadout::fold`]): where a stage
    /// started from these heads starts.
    pub hidden_folded: RankingMetrics,
    /// A fresh `W_u` fit on `h`.
    pub hidden_refit: RankingMetrics,
    /// A fresh `W_u` fit on `P(s_u)`, same rows and steps as `hidden_refit`.
    pub state_refit: RankingMetrics,
    /// Each row's target rank (0: first) by each, for paired comparisons.
    pub hidden_readout_ranks: Vec<usize>,
    pub hidden_folded_ranks: Vec<usize>,
    pub hidden_refit_ranks: Vec<usize>,
    pub state_refit_ranks: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportReport {
    pub config: TransportConfig,
    /// The heads probe as trained (on every training row) and evaluated.
    pub probe: ProbeReport,
    /// Training rows the readout and refits were fit on.
    pub fit_rows: usize,
    pub mean_prompt_tokens: f64,
    /// The chosen ridge strength (relative, see [`RIDGE_GRID`]) and the R² it had on the fit
    /// rows held out to choose it.
    pub ridge: f64,
    pub readout_r2_held_out: f64,
    /// Standard deviation over the fit rows of `h . w`, the fold's constant direction (its mean
    /// is 1): how far the folded head strays from the affine map.
    pub fold_spread: f64,
    /// The refits' losses: first step, and the mean over the last 100 steps.
    pub hidden_refit_loss: (f64, f64),
    pub state_refit_loss: (f64, f64),
    pub parts: Vec<TransportPart>,
}

/// The report, and the probe's trained tensors under a stage's names (`projector.*`,
/// `heads.w_v`, and `heads.w_u` folded to read `h`: [`RidgeReadout::fold`]) for
/// [`crate::warm_heads`] to save.
#[derive(Debug)]
pub struct Transport {
    pub report: TransportReport,
    pub heads: Vec<(String, Tensor)>,
}

/// The prompts, tokenizer and catalog the LLM's states are read from.
pub struct PromptSource<'a> {
    pub tokenizer: &'a LlmTokenizer,
    pub builder: &'a PromptBuilder,
    pub catalog: &'a Catalog,
}

/// Trains the heads probe on `train`, reads `h` for `config.fit_rows` of its rows and for every
/// row of `eval`'s parts, and ranks each part from `h` (see the module). `progress(k)` counts
/// prompt forwards: `fit_rows` plus every evaluation row.
pub fn probe_transport(
    model: &Llama,
    source: &PromptSource<'_>,
    items: &ItemTable,
    train: &[SeqExample],
    eval: &[(&str, &[SeqExample])],
    config: TransportConfig,
    progress: &mut dyn FnMut(usize),
) -> Result<Transport> {
    if config.probe.user != ProbeUser::State {
        return Err(TrainError::Invalid(
            "transport probe: the heads probe's user side must be the user state (P(s_u))".into(),
        ));
    }
    let fit_rows = config.fit_rows.min(train.len());
    if fit_rows < MIN_FIT_ROWS {
        return Err(TrainError::Invalid(format!(
            "transport probe: needs at least {MIN_FIT_ROWS} fit rows, has {fit_rows} ({} asked, {} training rows)",
            config.fit_rows,
            train.len()
        )));
    }
    let trained = train_probe(model, items, train, config.probe)?;
    let probe = trained.report(eval)?;

    // The fit rows, with candidates drawn as training draws them (the prompt lists them), from
    // a stream of their own: the same seed's probe and refits draw from theirs.
    let mut rng = ChaCha8Rng::seed_from_u64(config.probe.seed ^ 0x7472_616e_7370_6f72);
    let mut fit: Vec<SeqExample> = Vec::with_capacity(fit_rows);
    for index in sample(&mut rng, train.len(), fit_rows) {
        let mut row = train[index].clone();
        row.candidates = draw_candidates(
            &row.history,
            row.target,
            items.title_ids.len(),
            config.probe.num_candidates,
            &mut rng,
        )
        .map_err(|e| TrainError::Invalid(format!("transport probe: {e}")))?;
        fit.push(row);
    }

    let evaluated = Evaluated {
        model,
        tokenizer: source.tokenizer,
        heads: Some(&trained.heads),
        items: Some(items),
    };
    let mut tokens = 0usize;
    let mut states = |rows: &[SeqExample], part: &str| -> Result<(Tensor, Tensor)> {
        let _guard = tch::no_grad_guard();
        let mut hidden = Vec::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            let prompt = source
                .builder
                .build(
                    source.tokenizer,
                    source.catalog,
                    &row.history,
                    &row.candidates,
                    Some(row.target),
                    config.prompt_mode,
                    TemplateChoice::Fixed(0),
                )
                .map_err(|e| {
                    TrainError::Invalid(format!("transport probe: {part} row {index}: {e}"))
                })?;
            tokens += prompt.input_ids.len();
            hidden.push(prompt_state(&evaluated, &prompt)?.f_to_kind(Kind::Float)?);
            progress(1);
        }
        let borrowed: Vec<&SeqExample> = rows.iter().collect();
        Ok((
            Tensor::f_stack(&hidden, 0)?,
            trained.user_inputs(&borrowed)?,
        ))
    };
    let (fit_hidden, fit_state) = states(&fit, "fit")?;
    let mut eval_states = Vec::with_capacity(eval.len());
    for &(part, rows) in eval {
        eval_states.push(states(rows, part)?);
    }
    let prompts = fit.len() + eval.iter().map(|(_, rows)| rows.len()).sum::<usize>();

    let readout = RidgeReadout::fit(&fit_hidden, &fit_state)?;
    let folded_head = readout.fold(&trained.heads.user_head())?;
    let fold_spread = fit_hidden
        .f_to_kind(Kind::Double)?
        .f_matmul(&readout.fold_direction)?
        .f_std(true)?
        .double_value(&[]);
    let item_vectors = trained.all_item_vectors()?;
    let targets: Vec<ItemId> = fit.iter().map(|r| r.target).collect();
    let (hidden_head, hidden_refit_loss) =
        refit_user_head(&fit_hidden, &targets, &item_vectors, &config.probe)?;
    let (state_head, state_refit_loss) =
        refit_user_head(&fit_state, &targets, &item_vectors, &config.probe)?;

    let _guard = tch::no_grad_guard();
    let similarity = config.probe.similarity;
    let mut parts = Vec::with_capacity(eval.len());
    for (&(part, rows), (hidden, state)) in eval.iter().zip(&eval_states) {
        let rank = |u: Tensor| candidate_ranks(&u, &item_vectors, rows, part, similarity);
        let read = readout.predict(hidden)?;
        let readout_ranks = rank(trained.heads.user_vectors(&read)?)?;
        let folded_ranks = rank(hidden.f_matmul(&folded_head.f_transpose(0, 1)?)?)?;
        let hidden_ranks = rank(hidden.f_matmul(&hidden_head.f_transpose(0, 1)?)?)?;
        let state_ranks = rank(state.f_matmul(&state_head.f_transpose(0, 1)?)?)?;
        parts.push(TransportPart {
            part: part.to_owned(),
            readout_r2: r_squared(&read, state, &readout.state_mean)?,
            hidden_readout: ranking_metrics(&readout_ranks),
            hidden_folded: ranking_metrics(&folded_ranks),
            hidden_refit: ranking_metrics(&hidden_ranks),
            state_refit: ranking_metrics(&state_ranks),
            hidden_readout_ranks: readout_ranks,
            hidden_folded_ranks: folded_ranks,
            hidden_refit_ranks: hidden_ranks,
            state_refit_ranks: state_ranks,
        });
    }
    let heads = trained
        .named_tensors()
        .into_iter()
        .map(|(name, tensor)| {
            if name == USER_HEAD {
                (name, folded_head.shallow_clone())
            } else {
                (name, tensor)
            }
        })
        .collect();
    let report = TransportReport {
        config,
        probe,
        fit_rows,
        mean_prompt_tokens: tokens as f64 / prompts.max(1) as f64,
        ridge: readout.strength,
        readout_r2_held_out: readout.r2_held_out,
        fold_spread,
        hidden_refit_loss,
        state_refit_loss,
        parts,
    };
    Ok(Transport { report, heads })
}

/// A linear map from `h` to `P(s_u)` (both centred on the fit rows' means), fit by ridge
/// regression, its strength chosen on the fit rows held out.
#[derive(Debug)]
struct RidgeReadout {
    hidden_mean: Tensor,
    state_mean: Tensor,
    /// `[D_h, D_s]`, f64.
    map: Tensor,
    /// `[D_h, 1]`, f64: `w` with `mean(h) . w = 1` and the least variance of `h . w` over the
    /// fit rows (see [`RidgeReadout::fold`]).
    fold_direction: Tensor,
    strength: f64,
    r2_held_out: f64,
}

impl RidgeReadout {
    /// Fits on `hidden` `[N, D_h]` and `state` `[N, D_s]` (f32 or f64): every HOLD_OUT-th row
    /// held out picks the strength from [`RIDGE_GRID`], then all rows refit with it.
    fn fit(hidden: &Tensor, state: &Tensor) -> Result<RidgeReadout> {
        let _guard = tch::no_grad_guard();
        let n = hidden.size()[0];
        if n != state.size()[0] || (n as usize) < MIN_FIT_ROWS {
            return Err(TrainError::Invalid(format!(
                "ridge readout: {:?} states for {:?} targets (at least {MIN_FIT_ROWS} rows)",
                hidden.size(),
                state.size()
            )));
        }
        let hidden = hidden.f_to_kind(Kind::Double)?;
        let state = state.f_to_kind(Kind::Double)?;
        let (kept, held): (Vec<i64>, Vec<i64>) =
            (0..n).partition(|&i| i as usize % HOLD_OUT != HOLD_OUT - 1);
        let rows = |t: &Tensor, index: &[i64]| -> Result<Tensor> {
            Ok(t.f_index_select(0, &Tensor::f_from_slice(index)?.f_to_device(t.device())?)?)
        };
        let (fit_h, fit_s) = (rows(&hidden, &kept)?, rows(&state, &kept)?);
        let (held_h, held_s) = (rows(&hidden, &held)?, rows(&state, &held)?);
        let mut best: Option<(f64, f64)> = None;
        for strength in RIDGE_GRID {
            let candidate = RidgeReadout::solve(&fit_h, &fit_s, strength)?;
            let r2 = r_squared(&candidate.predict(&held_h)?, &held_s, &candidate.state_mean)?;
            if best.is_none_or(|(_, b)| r2 > b) {
                best = Some((strength, r2));
            }
        }
        let (strength, r2_held_out) = best.unwrap_or((RIDGE_GRID[0], f64::NAN));
        let mut readout = RidgeReadout::solve(&hidden, &state, strength)?;
        readout.r2_held_out = r2_held_out;
        Ok(readout)
    }

    fn solve(hidden: &Tensor, state: &Tensor, strength: f64) -> Result<RidgeReadout> {
        let mean = |t: &Tensor| t.f_mean_dim([0i64].as_slice(), true, Kind::Double);
        let (hidden_mean, state_mean) = (mean(hidden)?, mean(state)?);
        let h = hidden.f_sub(&hidden_mean)?;
        let s = state.f_sub(&state_mean)?;
        let gram = h.f_transpose(0, 1)?.f_matmul(&h)?;
        let width = gram.size()[0];
        let scale = gram.f_trace()?.double_value(&[]) / width as f64;
        let eye = Tensor::f_eye(width, (Kind::Double, hidden.device()))?;
        let regularised =
            gram.f_add(&eye.f_mul_scalar(strength * scale.max(f64::MIN_POSITIVE))?)?;
        let map = Tensor::f_linalg_solve(&regularised, &h.f_transpose(0, 1)?.f_matmul(&s)?, true)?;
        // Least variance of h . w subject to mean(h) . w = 1: w ∝ Σ⁻¹ mean(h), Σ the
        // covariance (the Gram matrix up to a factor), kept a little off singular.
        let steady = gram.f_add(&eye.f_mul_scalar(FOLD_RIDGE * scale.max(f64::MIN_POSITIVE))?)?;
        let direction = Tensor::f_linalg_solve(&steady, &hidden_mean.f_transpose(0, 1)?, true)?;
        let norm = hidden_mean.f_matmul(&direction)?.double_value(&[0, 0]);
        if !norm.is_finite() || norm.abs() < f64::MIN_POSITIVE {
            return Err(TrainError::Invalid(
                "ridge readout: the fit rows' states have no mean to fold the offset along".into(),
            ));
        }
        Ok(RidgeReadout {
            hidden_mean,
            state_mean,
            map,
            fold_direction: direction.f_div_scalar(norm)?,
            strength,
            r2_held_out: f64::NAN,
        })
    }

    /// One linear user head `[D, D_h]` (f32) on `h` from `w_u` `[D, D_s]` on the readout.
    ///
    /// `w_u` on the readout is affine in `h`: `u = h A + c` with `A = M w_uᵀ` and
    /// `c = (mean(P(s_u)) - mean(h) M) w_uᵀ`. A stage's head has no bias, so `c` rides on
    /// [`Self::fold_direction`] `w`: `u = h (A + w c)` equals the affine map wherever
    /// `h . w = 1`, exactly at the mean state and, `w` having the least variance of all such
    /// directions, nearly everywhere else (`fold_spread` in the report).
    fn fold(&self, w_u: &Tensor) -> Result<Tensor> {
        let w_t = w_u.f_to_kind(Kind::Double)?.f_transpose(0, 1)?;
        let linear = self.map.f_matmul(&w_t)?;
        let offset = self
            .state_mean
            .f_sub(&self.hidden_mean.f_matmul(&self.map)?)?
            .f_matmul(&w_t)?;
        Ok(linear
            .f_add(&self.fold_direction.f_matmul(&offset)?)?
            .f_transpose(0, 1)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?)
    }

    /// The readout `[N, D_s]` (f32) of `hidden` `[N, D_h]`.
    fn predict(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden
            .f_to_kind(Kind::Double)?
            .f_sub(&self.hidden_mean)?
            .f_matmul(&self.map)?
            .f_add(&self.state_mean)?
            .f_to_kind(Kind::Float)?)
    }
}

/// `1 - |truth - predicted|² / |truth - mean|²` over all entries; `mean` `[1, D]` is the fit
/// rows' mean (so a readout that predicts only it scores 0).
fn r_squared(predicted: &Tensor, truth: &Tensor, mean: &Tensor) -> Result<f64> {
    let truth = truth.f_to_kind(Kind::Double)?;
    let residual = truth
        .f_sub(&predicted.f_to_kind(Kind::Double)?)?
        .f_square()?
        .f_sum(Kind::Double)?
        .double_value(&[]);
    let total = truth
        .f_sub(&mean.f_to_kind(Kind::Double)?)?
        .f_square()?
        .f_sum(Kind::Double)?
        .double_value(&[]);
    Ok(1.0 - residual / total.max(f64::MIN_POSITIVE))
}

/// A fresh `W_u` `[D, D_in]` trained on user inputs `x` `[N, D_in]` (f32) against the frozen
/// item vectors of every item, `targets` the positives, the whole catalog the negatives (L_ui
/// with `--ui-negatives catalog`), with the probe's steps, batch, rate, temperature and
/// similarity. Returns it and its first and last losses.
fn refit_user_head(
    x: &Tensor,
    targets: &[ItemId],
    item_vectors: &Tensor,
    config: &ProbeConfig,
) -> Result<(Tensor, (f64, f64))> {
    let n = targets.len();
    if x.size()[0] != n as i64 || n == 0 {
        return Err(TrainError::Invalid(format!(
            "user head refit: inputs {:?} for {n} targets",
            x.size()
        )));
    }
    let device = x.device();
    let (d_in, d_out) = (x.size()[1], item_vectors.size()[1]);
    let store = nn::VarStore::new(device);
    tch::manual_seed(config.seed as i64);
    let bound = 1.0 / (d_in as f64).sqrt();
    let w = store.root().f_var(
        "w_u",
        &[d_out, d_in],
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let mut optimizer = AdamW::for_var_store(&store, AdamWConfig::default())?;
    let schedule = LrSchedule::llara(config.peak_lr, config.steps, 0.05);
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut log = LossLog::default();
    for step in 0..config.steps {
        let batch: Vec<usize> = sample(&mut rng, n, config.batch.min(n)).into_vec();
        let index: Vec<i64> = batch.iter().map(|&i| i as i64).collect();
        let rows = x.f_index_select(0, &Tensor::f_from_slice(&index)?.f_to_device(device)?)?;
        let batch_targets: Vec<ItemId> = batch.iter().map(|&i| targets[i]).collect();
        optimizer.zero_grad();
        let u = rows.f_matmul(&w.f_transpose(0, 1)?)?;
        let loss = catalog_ui_loss(
            &u,
            item_vectors,
            &batch_targets,
            (config.tau, config.similarity),
        )?;
        log.record(descend(
            &mut optimizer,
            &loss,
            schedule.lr(step),
            ("user head refit", step),
        )?);
    }
    Ok((w.f_detach()?, (log.first(), log.last())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{probe_rows, prompt_side, rng_lock, setup};
    use tch::Device;

    #[test]
    fn the_ridge_readout_recovers_a_linear_map_and_nothing_else() {
        let _rng = rng_lock();
        tch::manual_seed(7);
        let hidden = Tensor::randn([200, 12], (Kind::Float, Device::Cpu));
        let map = Tensor::randn([12, 5], (Kind::Float, Device::Cpu));
        let state = hidden.matmul(&map) + 3.0;
        let readout = RidgeReadout::fit(&hidden, &state).unwrap();
        assert!(readout.r2_held_out > 0.999, "{readout:?}");
        let fresh = Tensor::randn([50, 12], (Kind::Float, Device::Cpu));
        let r2 = r_squared(
            &readout.predict(&fresh).unwrap(),
            &(fresh.matmul(&map) + 3.0),
            &readout.state_mean,
        )
        .unwrap();
        assert!(r2 > 0.999, "{r2}");
        // Targets unrelated to `hidden`: nothing carries over to held-out rows.
        let noise = Tensor::randn([200, 5], (Kind::Float, Device::Cpu));
        let unrelated = RidgeReadout::fit(&hidden, &noise).unwrap();
        assert!(unrelated.r2_held_out < 0.2, "{unrelated:?}");
        let few = RidgeReadout::fit(&hidden.narrow(0, 0, 5), &state.narrow(0, 0, 5));
        assert!(few.unwrap_err().to_string().contains("at least"));
    }

    #[test]
    fn the_folded_head_is_the_affine_readout_where_the_state_has_a_steady_direction() {
        let _rng = rng_lock();
        tch::manual_seed(11);
        // The last coordinate of every state is 5: the direction the offset can ride on.
        let states = |n: i64| {
            Tensor::cat(
                &[
                    Tensor::randn([n, 11], (Kind::Float, Device::Cpu)),
                    Tensor::full([n, 1], 5.0, (Kind::Float, Device::Cpu)),
                ],
                1,
            )
        };
        let hidden = states(300);
        let map = Tensor::randn([12, 4], (Kind::Float, Device::Cpu));
        let state = hidden.matmul(&map) + 2.0;
        let readout = RidgeReadout::fit(&hidden, &state).unwrap();
        let w_u = Tensor::randn([6, 4], (Kind::Float, Device::Cpu));
        let folded = readout.fold(&w_u).unwrap();
        assert_eq!(folded.size(), [6, 12]);
        let fresh = states(40);
        let affine = readout
            .predict(&fresh)
            .unwrap()
            .matmul(&w_u.transpose(0, 1));
        let linear = fresh.matmul(&folded.transpose(0, 1));
        let gap = (&affine - &linear).abs().max().double_value(&[]);
        assert!(gap < 1e-3 * affine.abs().max().double_value(&[]), "{gap}");
        // Dropping the offset instead would not do: it is far from zero here.
        let unfolded = fresh
            .matmul(&readout.map.to_kind(Kind::Float))
            .matmul(&w_u.transpose(0, 1));
        assert!((&affine - &unfolded).abs().max().double_value(&[]) > 100.0 * gap.max(1e-6));
        let spread = hidden
            .to_kind(Kind::Double)
            .matmul(&readout.fold_direction)
            .std(true)
            .double_value(&[]);
        assert!(spread < 1e-3, "{spread}");
    }

    #[test]
    fn a_refit_user_head_learns_the_targets_its_inputs_tell() {
        let _rng = rng_lock();
        tch::manual_seed(3);
        // Four items; a row's input is its target's item vector plus noise.
        let items = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let targets: Vec<ItemId> = (0..64).map(|i| i % 4).collect();
        let index = Tensor::from_slice(&targets.iter().map(|&t| i64::from(t)).collect::<Vec<_>>());
        let x = items.index_select(0, &index)
            + Tensor::randn([64, 6], (Kind::Float, Device::Cpu)) * 0.1;
        let config = ProbeConfig {
            steps: 200,
            batch: 16,
            peak_lr: 1e-2,
            negatives: crate::losses::UiNegatives::Catalog,
            ..ProbeConfig::default()
        };
        let (w, (first, last)) = refit_user_head(&x, &targets, &items, &config).unwrap();
        assert!(last < first, "{first} -> {last}");
        let scores = x.matmul(&w.transpose(0, 1)).matmul(&items.transpose(0, 1));
        let predicted = Vec::<i64>::try_from(scores.argmax(1, false)).unwrap();
        let right = predicted
            .iter()
            .zip(&targets)
            .filter(|(p, t)| **p == i64::from(**t))
            .count();
        assert!(right >= 60, "{right} of 64");
        let err = refit_user_head(&x, &targets[..10], &items, &config).unwrap_err();
        assert!(err.to_string().contains("10 targets"), "{err}");
    }

    #[test]
    fn the_transport_probe_reads_the_llm_state_of_every_row() {
        let _rng = rng_lock();
        let s = setup();
        let (tokenizer, builder) = prompt_side(&s);
        // Twelve test rows (six candidates each); the training rows are them twice over.
        let rows = probe_rows(6);
        let train: Vec<SeqExample> = rows.iter().cycle().take(24).cloned().collect();
        let source = PromptSource {
            tokenizer: &tokenizer,
            builder: &builder,
            catalog: &s.catalog,
        };
        let config = TransportConfig {
            probe: ProbeConfig {
                steps: 30,
                batch: 12,
                peak_lr: 1e-2,
                num_candidates: 6,
                negatives: crate::losses::UiNegatives::Catalog,
                ..ProbeConfig::default()
            },
            prompt_mode: PromptMode::UnifiedWithUserLast,
            fit_rows: 1000,
        };
        let mut forwards = 0;
        let Transport { report, heads } = probe_transport(
            &s.model,
            &source,
            &s.items,
            &train,
            &[("test", &rows)],
            config,
            &mut |k| forwards += k,
        )
        .unwrap();
        // The probe's tensors under a stage's names, the user head folded to read `h`.
        let names: Vec<&str> = heads.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&USER_HEAD) && names.contains(&"heads.w_v"),
            "{names:?}"
        );
        assert!(
            names.iter().any(|n| n.starts_with("projector.")),
            "{names:?}"
        );
        let d = s.model.config.hidden_size as i64;
        let folded = &heads.iter().find(|(n, _)| n == USER_HEAD).unwrap().1;
        assert_eq!(folded.size(), [d, d]);
        assert!(report.fold_spread.is_finite());
        // Every training row is a fit row (fewer than asked), plus each test row.
        assert_eq!((report.fit_rows, forwards), (24, 24 + 12));
        assert!(report.mean_prompt_tokens > 10.0, "{report:?}");
        assert!(RIDGE_GRID.contains(&report.ridge));
        let part = &report.parts[0];
        assert_eq!(part.part, "test");
        for ranks in [
            &part.hidden_readout_ranks,
            &part.hidden_folded_ranks,
            &part.hidden_refit_ranks,
            &part.state_refit_ranks,
        ] {
            assert_eq!(ranks.len(), 12);
            assert!(ranks.iter().all(|&r| r < 6));
        }
        assert!(part.readout_r2.is_finite() && report.readout_r2_held_out.is_finite());
        assert_eq!(report.probe.parts[0].heads.n, 12);
        // Seeded: the same settings read the same states and rank alike.
        let again = probe_transport(
            &s.model,
            &source,
            &s.items,
            &train,
            &[("test", &rows)],
            config,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(again.report, report);

        let few = TransportConfig {
            fit_rows: 5,
            ..config
        };
        let err = probe_transport(&s.model, &source, &s.items, &train, &[], few, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 20 fit rows"), "{err}");
        let bag = TransportConfig {
            probe: ProbeConfig {
                user: ProbeUser::HistoryMean,
                ..config.probe
            },
            ..config
        };
        let err = probe_transport(&s.model, &source, &s.items, &train, &[], bag, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("user state"), "{err}");
    }
}
