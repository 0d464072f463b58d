//! One training stage: seeded data order, micro-batches with gradient accumulation, LLaRA's
//! learning-rate schedule, gradient clipping, periodic checkpoints, and exact resumption.
//!
//! Determinism: epoch `e` visits the examples in a permutation drawn from `seed` and `e`;
//! example `i` of it uses the template seeded by `(seed, e, i)`; libtorch's generator (adapter
//! dropout) is reseeded from `(seed, step, micro-batch)` before every micro-batch (micro-batches
//! are split after the optional sort by length, itself deterministic). A resumed
//! run therefore sees exactly the data, templates and dropout masks the uninterrupted run
//! would have, and its losses match it to floating-point tolerance.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rsllm_llm::Llama;
use rsllm_prompt::{BuiltPrompt, PromptMode};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor, nn};

use crate::batch::{collate, collate_ranked, sequence_len};
use crate::checkpoint::{self, CheckpointManifest};
use crate::error::{Divergence, Result, TrainError};
use crate::objective::{ItemTable, LOSS_TERMS, LossConfig, RsllmHeads, losses};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::LrSchedule;

/// Where the training rows come from: the trainer asks for example `index` built with the
/// template chosen by `template_seed` (the prompt builder does the rest).
pub trait ExampleSource {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Example `index` as a prompt, its template drawn with `template_seed`, in `mode` or, when
    /// None, in the source's own mode (LLaRA's curriculum picks the mode per step).
    fn build(
        &self,
        index: usize,
        template_seed: u64,
        mode: Option<PromptMode>,
    ) -> Result<BuiltPrompt>;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: u64,
    /// Stop after this many optimizer steps even if epochs remain (the `quick` profile).
    pub max_steps: Option<u64>,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub peak_lr: f64,
    pub warmup_fraction: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub pad_id: u32,
    pub loss: LossConfig,
    pub adamw: AdamWConfig,
    /// LLaRA's curriculum: each optimizer step uses unified (hybrid) prompts with probability
    /// step / total_steps and text-only prompts otherwise, one seeded coin per step (paper
    /// 4.3; LLARA-REFERENCE.md 4.5). Off: the source's own mode throughout.
    #[serde(default)]
    pub curriculum: bool,
    /// Full fine-tuning: the base model's weights are trained too (beside the adapters,
    /// projector and heads) and checkpointed under `base/` names, so a checkpoint holds the
    /// whole model. Off: the base stays frozen (LoRA).
    #[serde(default)]
    pub full_finetune: bool,
    /// bf16 autocast (PyTorch's AMP): weights, optimizer state and gradients stay f32, matrix
    /// products run in bf16. On CUDA, and on CPUs with native bf16 (AVX-512 BF16, AMX:
    /// `rsllm_llm::autocast::native_bf16`); no effect on other CPUs, where bf16 products are
    /// several times slower than f32.
    #[serde(default)]
    pub autocast_bf16: bool,
    /// Micro-batches of similar lengths: each step's rows are sorted by token count before
    /// they are split into micro-batches, so each pads to a closer maximum (fewer padded
    /// positions computed). The step still covers the same rows; which rows share a
    /// micro-batch, and so its in-batch negatives for L_ui, changes. No effect without
    /// gradient accumulation. Off in stage files written before it existed.
    #[serde(default)]
    pub group_by_length: bool,
    /// Steps whose rows are pooled and sorted by length before they are dealt out as steps,
    /// what Hugging Face's `group_by_length` does across batches: each step then holds rows
    /// of similar lengths, so a step of one micro-batch (the GPU runs) pads far less than
    /// rows drawn at random. The window's steps are then shuffled (seeded), so long and
    /// short steps alternate; the epoch still visits every row once. 0 or 1: off, the
    /// epoch's permutation as drawn (the entry points' default, and stage files written
    /// before it existed): at CPU scale stage 1 scored lower with it in two seeds of two, not
    /// significantly (docs/results.md, "Steps of similar lengths"), so it is chosen where
    /// the speed matters, as `scripts/gpu-check.sh` does (16).
    #[serde(default)]
    pub length_window_steps: usize,
}

impl TrainConfig {
    fn check(&self) -> Result<()> {
        if self.micro_batch == 0
            || self.grad_accum == 0
            || self.epochs == 0
            || self.checkpoint_every == 0
        {
            return Err(TrainError::Invalid(format!(
                "micro_batch ({}), grad_accum ({}), epochs ({}) and checkpoint_every ({}) must be positive",
                self.micro_batch, self.grad_accum, self.epochs, self.checkpoint_every
            )));
        }
        // Each a named refusal before any step: otherwise a zero tau or a negative lambda
        // would surface only as a diverged loss, a NaN lr as a model of NaNs.
        let (loss, adamw) = (&self.loss, &self.adamw);
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let non_negative = |v: f64| v.is_finite() && v >= 0.0;
        let unit = |v: f64| (0.0..1.0).contains(&v);
        let checks = [
            (
                "peak_lr",
                self.peak_lr,
                positive(self.peak_lr),
                "finite and positive",
            ),
            (
                "warmup_fraction",
                self.warmup_fraction,
                unit(self.warmup_fraction),
                "in [0, 1)",
            ),
            (
                "max_grad_norm",
                self.max_grad_norm,
                positive(self.max_grad_norm),
                "finite and positive",
            ),
            (
                "loss.tau",
                loss.tau,
                positive(loss.tau),
                "finite and positive",
            ),
            (
                "loss.lambda_ui",
                loss.lambda_ui,
                non_negative(loss.lambda_ui),
                "finite and not negative",
            ),
            (
                "loss.lambda_it",
                loss.lambda_it,
                non_negative(loss.lambda_it),
                "finite and not negative",
            ),
            (
                "loss.lambda_rank",
                loss.lambda_rank,
                non_negative(loss.lambda_rank),
                "finite and not negative",
            ),
            ("adamw.beta1", adamw.beta1, unit(adamw.beta1), "in [0, 1)"),
            ("adamw.beta2", adamw.beta2, unit(adamw.beta2), "in [0, 1)"),
            (
                "adamw.eps",
                adamw.eps,
                positive(adamw.eps),
                "finite and positive",
            ),
            (
                "adamw.weight_decay",
                adamw.weight_decay,
                non_negative(adamw.weight_decay),
                "finite and not negative",
            ),
        ];
        if let Some((name, value, _, rule)) = checks.iter().find(|c| !c.2) {
            return Err(TrainError::Invalid(format!(
                "{name} ({value}) must be {rule}"
            )));
        }
        if !loss.use_lm && loss.lambda_ui == 0.0 && loss.lambda_it == 0.0 && loss.lambda_rank == 0.0
        {
            return Err(TrainError::Invalid(
                "every loss term is off (use_lm false, lambda_ui, lambda_it and lambda_rank 0): nothing to train".into(),
            ));
        }
        if loss.rank_negatives == Some(0) {
            return Err(TrainError::Invalid(
                "loss.rank_negatives (0) must be at least 1: L_rank needs a candidate beside the target".into(),
            ));
        }
        Ok(())
    }

    /// Optimizer steps per epoch (a last partial step included).
    pub fn steps_per_epoch(&self, examples: usize) -> u64 {
        let per_step = self.micro_batch * self.grad_accum;
        examples.div_ceil(per_step) as u64
    }

    pub fn total_steps(&self, examples: usize) -> u64 {
        let full = self.epochs * self.steps_per_epoch(examples);
        self.max_steps.map_or(full, |m| m.min(full))
    }
}

/// What one optimizer step reports (for progress bars, logs, WatchJob).
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub lr: f64,
    pub loss: f64,
    pub lm: f64,
    pub ui: f64,
    pub it: f64,
    /// L_rank (0 unless `loss.lambda_rank` is on).
    pub rank: f64,
    pub grad_norm: f64,
    pub examples: usize,
    /// Prompt and answer tokens of the step's examples (padding not counted).
    pub tokens: usize,
    /// Token positions the model computed: each micro-batch's rows times its longest row.
    pub padded_tokens: usize,
    /// Seconds the step waited for the loader thread's prompts (0 when it kept ahead).
    pub loader_wait_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub last: Option<StepReport>,
    /// True when `on_step` asked to stop before the planned steps (the step it stopped at is
    /// checkpointed).
    pub stopped: bool,
}

/// What the model side of a stage is made of.
pub struct Trainee<'a> {
    pub model: &'a Llama,
    pub heads: &'a RsllmHeads,
    /// Holds every trained tensor (adapters, projector, heads), and only those.
    pub trained: &'a nn::VarStore,
    /// The base model's weights: frozen, or trained too with `TrainConfig::full_finetune`.
    pub base: &'a nn::VarStore,
    pub items: &'a ItemTable,
    /// Provenance written into each checkpoint.
    pub base_model_sha256: String,
    pub recommender_version: Option<String>,
}

/// LLaRA's curriculum coin for optimizer step `step` (0-based) of `total`: unified prompts
/// with probability step / total. Seeded by (run seed, step), so a resumed run flips the same.
pub fn curriculum_mode(seed: u64, step: u64, total: u64) -> PromptMode {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0x00C0_FFEE_CAFE_F00D, step, 0));
    let u: f64 = rand::Rng::random(&mut rng);
    if u < step as f64 / total.max(1) as f64 {
        PromptMode::Unified
    } else {
        PromptMode::TextOnly
    }
}

fn mix(seed: u64, a: u64, b: u64) -> u64 {
    // SplitMix64 finaliser over the combined value: distinct, well-spread seeds per (a, b).
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch, 0)));
    order
}

/// One optimizer step of the schedule: which examples, in which epoch, in which prompt mode.
#[derive(Debug, Clone, PartialEq)]
struct PlannedStep {
    /// 0-based (the report counts from 1).
    step: u64,
    epoch: u64,
    examples: Vec<usize>,
    /// The curriculum's mode for this step; None: the source's own.
    mode: Option<PromptMode>,
    /// Where the schedule stands after this step (what its checkpoint records).
    epoch_after: u64,
    done_after: usize,
}

/// An example's token count in `epoch` (prompt and answer), for grouping by length.
type LengthOf<'a> = &'a (dyn Fn(u64, usize) -> usize + Sync);

/// The schedule of `train`, step by step from a (resumed) position: epoch `e` visits the
/// examples in its seeded permutation, `per_step` at a time; a last partial chunk is a step.
/// With `length_window_steps` > 1 each window of that many steps of the permutation is
/// regrouped by length first ([`group_window`]). Kept apart from the model so the loader
/// thread can walk it ahead of the optimizer.
struct StepPlan<'a> {
    n: usize,
    per_step: usize,
    seed: u64,
    epochs: u64,
    total_steps: u64,
    curriculum: bool,
    window_steps: usize,
    length_of: LengthOf<'a>,
    step: u64,
    epoch: u64,
    done_in_epoch: usize,
    /// The permutation of the epoch being walked.
    order: Option<(u64, Vec<usize>)>,
    /// The regrouped window being walked: (epoch, window index, its rows).
    window: Option<(u64, usize, Vec<usize>)>,
}

impl<'a> StepPlan<'a> {
    fn new(
        n: usize,
        config: &TrainConfig,
        (step, epoch, done_in_epoch): (u64, u64, usize),
        length_of: LengthOf<'a>,
    ) -> Self {
        StepPlan {
            n,
            per_step: config.micro_batch * config.grad_accum,
            seed: config.seed,
            epochs: config.epochs,
            total_steps: config.total_steps(n),
            curriculum: config.curriculum,
            window_steps: config.length_window_steps,
            length_of,
            step,
            epoch,
            done_in_epoch,
            order: None,
            window: None,
        }
    }

    /// The next step's rows of the current epoch from `done_in_epoch` on (empty past its end).
    fn next_rows(&mut self) -> Vec<usize> {
        if self.order.as_ref().is_some_and(|(e, _)| *e != self.epoch) {
            self.order = None;
        }
        let (_, order) = self
            .order
            .get_or_insert_with(|| (self.epoch, epoch_order(self.n, self.seed, self.epoch)));
        if self.window_steps <= 1 {
            return order
                .iter()
                .skip(self.done_in_epoch)
                .take(self.per_step)
                .copied()
                .collect();
        }
        // Windows start at multiples of window_steps * per_step: every step but an epoch's
        // last is whole, so a step never straddles two windows, also after a resume.
        let window_rows = self.window_steps * self.per_step;
        let index = self.done_in_epoch / window_rows;
        if self
            .window
            .as_ref()
            .is_none_or(|(e, w, _)| (*e, *w) != (self.epoch, index))
        {
            let rows = order
                .iter()
                .skip(index * window_rows)
                .take(window_rows)
                .copied()
                .collect::<Vec<_>>();
            let epoch = self.epoch;
            let grouped = group_window(
                &rows,
                self.per_step,
                |i| (self.length_of)(epoch, i),
                mix(self.seed, epoch, index as u64 + 1),
            );
            self.window = Some((epoch, index, grouped));
        }
        self.window.as_ref().map_or_else(Vec::new, |(_, _, rows)| {
            rows.iter()
                .skip(self.done_in_epoch - index * window_rows)
                .take(self.per_step)
                .copied()
                .collect()
        })
    }
}

/// One window of an epoch's permutation regrouped by length: its rows sorted by token count
/// (stable), cut into steps of `per_step`, and the whole steps shuffled with `seed`; a last
/// partial step (an epoch's end) stays last, so every step before it is whole and a resumed
/// position (rows done in the epoch) still falls on a step boundary.
pub fn group_window(
    rows: &[usize],
    per_step: usize,
    length_of: impl Fn(usize) -> usize,
    seed: u64,
) -> Vec<usize> {
    let mut by_length: Vec<(usize, usize)> = rows.iter().map(|&i| (length_of(i), i)).collect();
    by_length.sort_by_key(|&(len, _)| len);
    let mut steps: Vec<Vec<usize>> = by_length
        .chunks(per_step.max(1))
        .map(|chunk| chunk.iter().map(|&(_, i)| i).collect())
        .collect();
    let partial = match steps.last() {
        Some(last) if last.len() < per_step => steps.pop(),
        _ => None,
    };
    steps.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    steps.extend(partial);
    steps.concat()
}

impl Iterator for StepPlan<'_> {
    type Item = PlannedStep;

    fn next(&mut self) -> Option<PlannedStep> {
        while self.step < self.total_steps && self.epoch < self.epochs {
            let examples = self.next_rows();
            if examples.is_empty() {
                self.epoch += 1;
                self.done_in_epoch = 0;
                continue;
            }
            let (step, epoch) = (self.step, self.epoch);
            self.step += 1;
            self.done_in_epoch += examples.len();
            if self.done_in_epoch >= self.n {
                self.epoch += 1;
                self.done_in_epoch = 0;
            }
            return Some(PlannedStep {
                step,
                epoch,
                mode: self
                    .curriculum
                    .then(|| curriculum_mode(self.seed, step, self.total_steps)),
                examples,
                epoch_after: self.epoch,
                done_after: self.done_in_epoch,
            });
        }
        None
    }
}

/// A planned step with its prompts built, split into micro-batches.
struct LoadedStep {
    plan: PlannedStep,
    /// Per micro-batch: the training rows and their prompts.
    micro_batches: Vec<(Vec<usize>, Vec<BuiltPrompt>)>,
}

/// How a step's rows (given by their token counts, in the epoch's order) form micro-batches
/// of `micro_batch`: positions into `lengths`, per micro-batch. With `group_by_length` the rows
/// are sorted by length first (stable: ties keep the epoch's order).
pub fn micro_batches(
    lengths: &[usize],
    micro_batch: usize,
    group_by_length: bool,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if group_by_length {
        order.sort_by_key(|&k| lengths[k]);
    }
    order
        .chunks(micro_batch.max(1))
        .map(<[usize]>::to_vec)
        .collect()
}

/// Token positions a step computes: each micro-batch's rows times its longest row.
pub fn padded_positions(lengths: &[usize], micro_batches: &[Vec<usize>]) -> usize {
    micro_batches
        .iter()
        .map(|mb| mb.len() * mb.iter().map(|&k| lengths[k]).max().unwrap_or(0))
        .sum()
}

/// Builds a step's prompts (example `i` with the template seeded by `(seed, epoch, i)`) and
/// splits them into micro-batches ([`micro_batches`]).
fn load_step(
    source: &dyn ExampleSource,
    config: &TrainConfig,
    plan: PlannedStep,
) -> Result<LoadedStep> {
    let mut built = plan
        .examples
        .iter()
        .map(|&i| {
            source
                .build(i, mix(config.seed, plan.epoch, i as u64), plan.mode)
                .map(|p| Some((i, p)))
        })
        .collect::<Result<Vec<_>>>()?;
    let lengths: Vec<usize> = built
        .iter()
        .flatten()
        .map(|(_, p)| sequence_len(p, config.loss.ranking()))
        .collect();
    let micro_batches = micro_batches(&lengths, config.micro_batch, config.group_by_length)
        .into_iter()
        .map(|members| members.into_iter().filter_map(|k| built[k].take()).unzip())
        .collect();
    Ok(LoadedStep {
        plan,
        micro_batches,
    })
}

/// What a step's forward and backward passes leave on the host.
struct Passes {
    /// Per micro-batch `[total, lm, ui, it, rank]`, unweighted, and its share of the step's
    /// rows.
    values: Vec<[f64; 1 + LOSS_TERMS]>,
    shares: Vec<f64>,
    tokens: usize,
    padded_tokens: usize,
}

/// Runs the step's micro-batches forward and backward (gradients accumulate, each
/// micro-batch's loss weighted by its share of the step's rows), then reads their loss values
/// from the device in one transfer: the host queues the whole step before it waits.
fn forward_backward(
    trainee: &Trainee<'_>,
    config: &TrainConfig,
    step: &LoadedStep,
) -> Result<Passes> {
    let device = trainee.model.device();
    let rows: usize = step.micro_batches.iter().map(|(r, _)| r.len()).sum();
    let (mut tokens, mut padded_tokens) = (0, 0);
    let (mut on_device, mut shares) = (Vec::new(), Vec::new());
    for (m, (_, prompts)) in step.micro_batches.iter().enumerate() {
        let ranking = config.loss.ranking();
        let batch = match ranking {
            Some(negatives) => collate_ranked(prompts, negatives, config.pad_id, device)?,
            None => collate(prompts, config.pad_id, device)?,
        };
        tokens += prompts
            .iter()
            .map(|p| sequence_len(p, ranking))
            .sum::<usize>();
        padded_tokens += batch.ids.numel();
        tch::manual_seed(mix(config.seed, step.plan.step, m as u64) as i64);
        let out = rsllm_llm::bf16_autocast(device, config.autocast_bf16, || {
            losses(
                trainee.model,
                trainee.heads,
                trainee.items,
                &batch,
                &config.loss,
            )
        })?;
        let share = prompts.len() as f64 / rows as f64;
        out.total.f_mul_scalar(share)?.f_backward()?;
        on_device.push(Tensor::f_cat(
            &[
                out.total.f_detach()?.f_to_kind(Kind::Float)?.f_view([1])?,
                out.terms,
            ],
            0,
        )?);
        shares.push(share);
    }
    let flat = Vec::<f64>::try_from(
        Tensor::f_stack(&on_device, 0)?
            .f_to_kind(Kind::Double)?
            .f_flatten(0, -1)?,
    )?;
    let values = flat
        .chunks_exact(1 + LOSS_TERMS)
        .map(|v| [v[0], v[1], v[2], v[3], v[4]])
        .collect();
    Ok(Passes {
        values,
        shares,
        tokens,
        padded_tokens,
    })
}

/// Steps the loader thread may build ahead of the optimizer (bounded: each holds its prompts).
const LOADER_STEPS_AHEAD: usize = 2;

/// Trains until the configured epochs or `max_steps`, or until `stop_after` optimizer steps
/// of this call (a test's stand-in for a killed process). Resumes from the latest checkpoint
/// under `checkpoints` when there is one.
///
/// A loader thread builds the prompts of the next steps while this one runs the model (a
/// bounded queue of [`LOADER_STEPS_AHEAD`] steps), and each step's loss values are read from
/// the device once, after all its micro-batches are queued. A step whose loss or gradient norm
/// is NaN or infinite is not applied: the run stops with [`TrainError::Diverged`], naming the
/// step, micro-batch and rows, and leaves the checkpoints on disk as they were.
pub fn train(
    trainee: &Trainee<'_>,
    source: &(dyn ExampleSource + Sync),
    config: &TrainConfig,
    checkpoints: &Path,
    stop_after: Option<u64>,
    on_step: &mut dyn FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    config.check()?;
    if source.is_empty() {
        return Err(TrainError::Invalid("no training examples".into()));
    }
    let bf16 =
        rsllm_llm::autocast::bf16_autocast_applies(trainee.model.device(), config.autocast_bf16);
    tracing::info!(
        compute = if bf16 { "bf16 autocast" } else { "f32" },
        device = ?trainee.model.device(),
        "training"
    );
    let n = source.len();
    let total_steps = config.total_steps(n);
    let schedule = LrSchedule::llara(config.peak_lr, total_steps, config.warmup_fraction);
    let mut opt = AdamW::new(
        trainable(trainee, config.full_finetune),
        config.adamw.clone(),
    )?;
    let (mut step, mut epoch, mut done_in_epoch) = (0u64, 0u64, 0usize);
    let mut metrics = serde_json::json!({ "loss": [] });
    let mut resumed_from = None;
    let mut last_saved = None;
    if let Some(ckpt) = checkpoint::latest(checkpoints)? {
        ckpt.manifest.check_provenance(
            &ckpt.dir,
            &trainee.base_model_sha256,
            Some(trainee.recommender_version.as_deref()),
        )?;
        let (trained, state) = ckpt.load()?;
        let base = config.full_finetune.then_some(trainee.base);
        restore_split(trainee.trained, base, trained, &ckpt.dir)?;
        opt.load_state(state, ckpt.manifest.step)?;
        step = ckpt.manifest.step;
        epoch = ckpt.manifest.epoch;
        done_in_epoch = ckpt.manifest.examples_done_in_epoch as usize;
        metrics = ckpt.manifest.metrics.clone();
        resumed_from = Some(step);
        last_saved = Some((step, ckpt.dir.clone()));
        tracing::info!(step, epoch, "resumed from {}", ckpt.dir.display());
    }
    // A row's length as `load_step` will build it (in the source's own mode: under the
    // curriculum a step's mode is drawn after its rows are, so there it is an estimate). A
    // row that fails to build fails in `load_step`, with its error; its length is moot. With
    // windows on, each row is thus built twice, both times on the loader thread, which runs
    // ahead of the device: 0.15-0.2 ms a row here against about 2.5 ms a row in an H100 step.
    let length_of = |epoch: u64, i: usize| {
        source
            .build(i, mix(config.seed, epoch, i as u64), None)
            .map_or(0, |p| sequence_len(&p, config.loss.ranking()))
    };
    let plan = StepPlan::new(n, config, (step, epoch, done_in_epoch), &length_of);
    let mut last = None;
    let mut taken_here = 0u64;
    let mut stopped = false;
    trainee.model.set_training(true);
    let outcome = std::thread::scope(|scope| -> Result<()> {
        let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(LOADER_STEPS_AHEAD);
        scope.spawn(move || {
            for planned in plan {
                let loaded = load_step(source, config, planned);
                let failed = loaded.is_err();
                // A closed queue: the trainer stopped early.
                if loaded_tx.send(loaded).is_err() || failed {
                    return;
                }
            }
        });
        loop {
            if stop_after.is_some_and(|s| taken_here >= s) {
                return Ok(());
            }
            let waited = Instant::now();
            let Ok(loaded) = loaded_rx.recv() else {
                return Ok(()); // the schedule is done
            };
            let loaded = loaded?;
            let loader_wait_secs = waited.elapsed().as_secs_f64();
            let plan = &loaded.plan;
            opt.zero_grad();
            let passes = forward_backward(trainee, config, &loaded)?;
            let diverged = |what: String, micro_batch: Option<usize>| {
                TrainError::Diverged(Box::new(Divergence {
                    step: plan.step + 1,
                    epoch: plan.epoch,
                    what,
                    micro_batch: micro_batch.map(|m| (m + 1, loaded.micro_batches.len())),
                    rows: match micro_batch {
                        Some(m) => loaded.micro_batches[m].0.clone(),
                        None => plan.examples.clone(),
                    },
                    last_checkpoint: last_saved.clone(),
                }))
            };
            let (mut sum, mut lm, mut ui, mut it, mut rank) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for (m, (&[total, l, u, i, r], share)) in
                passes.values.iter().zip(&passes.shares).enumerate()
            {
                if !total.is_finite() {
                    return Err(diverged(
                        format!("the loss is {total} (lm {l}, ui {u}, it {i}, rank {r})"),
                        Some(m),
                    ));
                }
                sum += total * share;
                lm += l * share;
                ui += u * share;
                it += i * share;
                rank += r * share;
            }
            let grad_norm = match opt.clip_grad_norm(config.max_grad_norm) {
                Err(TrainError::NonFiniteGradNorm(norm)) => {
                    return Err(diverged(format!("the gradient norm is {norm}"), None));
                }
                other => other?,
            };
            let lr = schedule.lr(plan.step);
            opt.step(lr)?;
            step = plan.step + 1;
            epoch = plan.epoch_after;
            done_in_epoch = plan.done_after;
            taken_here += 1;
            let report = StepReport {
                step,
                total_steps,
                epoch,
                lr,
                loss: sum,
                lm,
                ui,
                it,
                rank,
                grad_norm,
                examples: plan.examples.len(),
                tokens: passes.tokens,
                padded_tokens: passes.padded_tokens,
                loader_wait_secs,
            };
            if let Some(points) = metrics.get_mut("loss").and_then(|l| l.as_array_mut()) {
                // L_rank last, so readers of the first six keep working.
                points.push(serde_json::json!([step, sum, lm, ui, it, lr, rank]));
            }
            // A stop request (a cancelled job) still checkpoints the step it stopped at.
            let stop = on_step(&report).is_break();
            if stop || step % config.checkpoint_every == 0 || step == total_steps {
                let manifest = CheckpointManifest {
                    step,
                    epoch,
                    examples_done_in_epoch: done_in_epoch as u64,
                    seed: config.seed,
                    base_model_sha256: trainee.base_model_sha256.clone(),
                    recommender_version: trainee.recommender_version.clone(),
                    config: serde_json::to_value(config)
                        .map_err(|e| TrainError::Invalid(e.to_string()))?,
                    metrics: metrics.clone(),
                    trained_sha256: String::new(),
                    optimizer_sha256: String::new(),
                };
                let trained = saved_tensors(trainee, config.full_finetune);
                let saved = checkpoint::save(
                    checkpoints,
                    manifest,
                    &trained,
                    &opt.state()?,
                    config.keep_last,
                )?;
                last_saved = Some((step, saved.dir));
            }
            last = Some(report);
            // A stop asked at the last planned step stops nothing: the run is complete.
            if stop && step < total_steps {
                stopped = true;
                return Ok(());
            }
        }
    });
    trainee.model.set_training(false);
    outcome?;
    Ok(TrainSummary {
        steps: step,
        resumed_from,
        last,
        stopped,
    })
}

/// Prefix of the base model's weights in a full fine-tune's checkpoints and optimizer state.
pub const BASE_PREFIX: &str = "base/";

/// The optimizer's parameters: the trained store's, and with `full` every base weight (made
/// to require gradients) under [`BASE_PREFIX`].
fn trainable(trainee: &Trainee<'_>, full: bool) -> Vec<(String, tch::Tensor)> {
    let mut params: Vec<(String, tch::Tensor)> = trainee
        .trained
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    if full {
        for (name, tensor) in trainee.base.variables() {
            params.push((
                format!("{BASE_PREFIX}{name}"),
                tensor.set_requires_grad(true),
            ));
        }
    }
    params
}

/// What a checkpoint holds: the trained store, and with `full` the base weights.
fn saved_tensors(trainee: &Trainee<'_>, full: bool) -> Vec<(String, tch::Tensor)> {
    let mut out: Vec<(String, tch::Tensor)> = trainee.trained.variables().into_iter().collect();
    if full {
        out.extend(
            trainee
                .base
                .variables()
                .into_iter()
                .map(|(name, t)| (format!("{BASE_PREFIX}{name}"), t)),
        );
    }
    out
}

/// [`restore`] for a checkpoint that may hold base weights (a full fine-tune): those go to
/// `base`, which must then be given; the rest to `trained`.
pub fn restore_split(
    trained: &nn::VarStore,
    base: Option<&nn::VarStore>,
    saved: Vec<(String, tch::Tensor)>,
    dir: &Path,
) -> Result<()> {
    let (base_part, own): (Vec<_>, Vec<_>) = saved
        .into_iter()
        .partition(|(name, _)| name.starts_with(BASE_PREFIX));
    if !base_part.is_empty() {
        let Some(base) = base else {
            return Err(TrainError::BadCheckpoint {
                path: dir.to_owned(),
                reason: "holds the base model's weights (a full fine-tune), where only adapters were expected".into(),
            });
        };
        let stripped = base_part
            .into_iter()
            .map(|(name, t)| (name[BASE_PREFIX.len()..].to_owned(), t))
            .collect();
        restore(base, stripped, dir)?;
    }
    restore(trained, own, dir)
}

/// Copies checkpointed tensors into the trained store: the same names, the same shapes.
pub fn restore(vs: &nn::VarStore, saved: Vec<(String, tch::Tensor)>, dir: &Path) -> Result<()> {
    let mut variables = vs.variables();
    let _guard = tch::no_grad_guard();
    for (name, tensor) in saved {
        let Some(mut var) = variables.remove(&name) else {
            return Err(TrainError::BadCheckpoint {
                path: dir.to_owned(),
                reason: format!("holds {name}, which this model does not train"),
            });
        };
        if var.size() != tensor.size() {
            return Err(TrainError::BadCheckpoint {
                path: dir.to_owned(),
                reason: format!(
                    "{name} has shape {:?}, the model {:?}",
                    tensor.size(),
                    var.size()
                ),
            });
        }
        var.f_copy_(&tensor.f_to_device(var.device())?)?;
    }
    if let Some(missing) = variables.keys().next() {
        return Err(TrainError::BadCheckpoint {
            path: dir.to_owned(),
            reason: format!("lacks {missing}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::LossConfig;
    use crate::test_support::{Setup, setup, setup_like};
    use rsllm_prompt::testing::PAD_ID;
    use rsllm_prompt::{PromptBuilder, PromptMode, PromptOptions, TemplateChoice};

    /// The fixture's rows as a source: what the loader thread needs (no tensors).
    struct Rows<'a> {
        tokenizer: &'a tokenizers::Tokenizer,
        catalog: &'a rsllm_core::Catalog,
        builder: PromptBuilder,
        rows: Vec<(Vec<u32>, Vec<u32>, u32)>,
        /// The prompts' mode where the loop asks for none (the curriculum asks).
        mode: PromptMode,
    }

    impl ExampleSource for Rows<'_> {
        fn len(&self) -> usize {
            self.rows.len()
        }
        fn build(
            &self,
            index: usize,
            template_seed: u64,
            mode: Option<PromptMode>,
        ) -> Result<BuiltPrompt> {
            let (h, c, t) = &self.rows[index];
            let invalid = |e: rsllm_prompt::PromptError| TrainError::Invalid(e.to_string());
            let mut prompt = self
                .builder
                .build(
                    self.tokenizer,
                    self.catalog,
                    h,
                    c,
                    Some(*t),
                    mode.unwrap_or(self.mode),
                    TemplateChoice::Seeded(template_seed),
                )
                .map_err(invalid)?;
            // Always: L_rank's runs need them, the others never read them.
            self.builder
                .add_candidate_answers(self.tokenizer, self.catalog, &mut prompt)
                .map_err(invalid)?;
            Ok(prompt)
        }
    }

    /// The fixture as a trainee over a base model with this sha256 (no recommender).
    fn trainee_of<'a>(setup: &'a Setup, base_model_sha256: &str) -> Trainee<'a> {
        Trainee {
            model: &setup.model,
            heads: &setup.heads,
            trained: &setup.trained,
            base: &setup._base,
            items: &setup.items,
            base_model_sha256: base_model_sha256.into(),
            recommender_version: None,
        }
    }

    fn rows(setup: &Setup) -> Rows<'_> {
        Rows {
            tokenizer: &setup.tokenizer,
            catalog: &setup.catalog,
            builder: PromptBuilder::with_builtin_templates("movielens", PromptOptions::new(PAD_ID))
                .unwrap(),
            rows: (0..6u32)
                .map(|i| {
                    let history = vec![i, (i + 1) % 12, (i + 2) % 12];
                    let candidates = vec![(i + 3) % 12, (i + 5) % 12, (i + 7) % 12];
                    (history, candidates, (i + 5) % 12)
                })
                .collect(),
            mode: PromptMode::Unified,
        }
    }

    fn config() -> TrainConfig {
        TrainConfig {
            epochs: 2,
            max_steps: None,
            micro_batch: 2,
            grad_accum: 2,
            peak_lr: 3e-3,
            warmup_fraction: 0.25,
            max_grad_norm: 1.0,
            seed: 5,
            checkpoint_every: 1,
            keep_last: 2,
            pad_id: PAD_ID,
            loss: LossConfig::default(),
            adamw: AdamWConfig::default(),
            curriculum: false,
            full_finetune: false,
            autocast_bf16: false,
            group_by_length: true,
            length_window_steps: 2,
        }
    }

    #[test]
    fn l_rank_trains_through_the_loop_on_packed_rows_and_is_logged() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let trainee = trainee_of(&s, "test");
        let run = |lambda_rank: f64| {
            let dir = tempfile::tempdir().unwrap();
            let mut c = config();
            c.loss.lambda_rank = lambda_rank;
            let mut reports = Vec::new();
            train(&trainee, &rows(&s), &c, dir.path(), Some(1), &mut |r| {
                reports.push(r.clone());
                ControlFlow::Continue(())
            })
            .unwrap();
            let saved = crate::checkpoint::latest(dir.path()).unwrap().unwrap();
            (reports.remove(0), saved.manifest.metrics)
        };
        let (plain, _) = run(0.0);
        let (ranked, metrics) = run(1.0);
        assert_eq!(plain.rank, 0.0);
        assert!(ranked.rank > 0.0 && ranked.rank.is_finite(), "{ranked:?}");
        assert!(
            (ranked.loss - (ranked.lm + 0.1 * ranked.ui + 0.1 * ranked.it + ranked.rank)).abs()
                < 1e-4
        );
        // The same rows, now with every candidate's answer packed after the prompt.
        assert_eq!(ranked.examples, plain.examples);
        assert!(
            ranked.tokens > plain.tokens,
            "{} vs {}",
            ranked.tokens,
            plain.tokens
        );
        let point = &metrics["loss"][0];
        assert_eq!(point.as_array().unwrap().len(), 7, "{point}");
        assert!((point[6].as_f64().unwrap() - ranked.rank).abs() < 1e-9);
    }

    #[test]
    fn full_fine_tuning_trains_the_base_and_resumes_to_the_same_end() {
        let _rng = crate::test_support::rng_lock();
        let mut full = config();
        full.full_finetune = true;
        let reference = setup();
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = setup_like(&reference);
        let (_, straight_losses) = run_with(&straight, straight_dir.path(), None, &full);
        // The base moved (with LoRA alone it stays put: the other tests' setups share it).
        let moved = straight._base.variables().iter().any(|(name, t)| {
            let before = &reference._base.variables()[name];
            (t - before).abs().max().double_value(&[]) > 0.0
        });
        assert!(moved, "no base weight changed");
        let latest = crate::checkpoint::latest(straight_dir.path())
            .unwrap()
            .unwrap();
        let (saved, _) = latest.load().unwrap();
        assert!(saved.iter().any(|(n, _)| n.starts_with(BASE_PREFIX)));

        let killed_dir = tempfile::tempdir().unwrap();
        let first = setup_like(&reference);
        let (_, first_losses) = run_with(&first, killed_dir.path(), Some(2), &full);
        drop(first);
        let second = setup_like(&reference);
        let (resumed, second_losses) = run_with(&second, killed_dir.path(), None, &full);
        assert_eq!(resumed.resumed_from, Some(2));
        assert_same_curve(first_losses, second_losses, &straight_losses);
        assert_same_tensors(&straight._base, &second._base);
        // Adapter-only restoring refuses a full fine-tune's checkpoint.
        let err = restore_split(&second.trained, None, saved, straight_dir.path()).unwrap_err();
        assert!(err.to_string().contains("full fine-tune"), "{err}");
    }

    #[test]
    fn bad_settings_are_refused_by_name_before_any_step() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let dir = tempfile::tempdir().unwrap();
        let trainee = trainee_of(&s, "test");
        type Breakage = fn(&mut TrainConfig);
        let cases: [(&str, Breakage); 8] = [
            ("loss.tau (0) must be finite and positive", |c| {
                c.loss.tau = 0.0
            }),
            (
                "loss.lambda_rank (inf) must be finite and not negative",
                |c| c.loss.lambda_rank = f64::INFINITY,
            ),
            ("loss.rank_negatives (0) must be at least 1", |c| {
                c.loss.lambda_rank = 1.0;
                c.loss.rank_negatives = Some(0);
            }),
            (
                "loss.lambda_ui (-0.1) must be finite and not negative",
                |c| c.loss.lambda_ui = -0.1,
            ),
            ("peak_lr (NaN) must be finite and positive", |c| {
                c.peak_lr = f64::NAN
            }),
            ("warmup_fraction (1) must be in [0, 1)", |c| {
                c.warmup_fraction = 1.0
            }),
            ("adamw.beta2 (1) must be in [0, 1)", |c| c.adamw.beta2 = 1.0),
            ("every loss term is off", |c| {
                c.loss = LossConfig {
                    use_lm: false,
                    lambda_ui: 0.0,
                    lambda_it: 0.0,
                    tau: 0.07,
                    ..LossConfig::default()
                }
            }),
        ];
        for (want, break_it) in cases {
            let mut c = config();
            break_it(&mut c);
            let err = train(&trainee, &rows(&s), &c, dir.path(), None, &mut |_| {
                panic!("a step ran with {want}")
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(want), "{err}");
        }
        assert!(
            crate::checkpoint::latest(dir.path()).unwrap().is_none(),
            "nothing written"
        );
    }

    #[test]
    fn the_curriculum_moves_from_text_only_to_unified_prompts() {
        let total = 400;
        let unified = |range: std::ops::Range<u64>| {
            range
                .filter(|&s| curriculum_mode(5, s, total) == PromptMode::Unified)
                .count()
        };
        // p = step / total: about 5% unified in the first 40 steps, 95% in the last 40.
        assert!(unified(0..40) <= 8, "{}", unified(0..40));
        assert!(unified(360..400) >= 32, "{}", unified(360..400));
        assert_eq!(curriculum_mode(5, 0, total), PromptMode::TextOnly);
        // Deterministic per (seed, step): a resumed run flips the same coins.
        assert!((0..total).all(|s| curriculum_mode(5, s, total) == curriculum_mode(5, s, total)));
    }

    fn run(setup: &Setup, dir: &Path, stop_after: Option<u64>) -> (TrainSummary, Vec<f64>) {
        run_with(setup, dir, stop_after, &config())
    }

    fn run_with(
        setup: &Setup,
        dir: &Path,
        stop_after: Option<u64>,
        config: &TrainConfig,
    ) -> (TrainSummary, Vec<f64>) {
        run_source(setup, &rows(setup), dir, stop_after, config)
    }

    fn run_source(
        setup: &Setup,
        source: &Rows<'_>,
        dir: &Path,
        stop_after: Option<u64>,
        config: &TrainConfig,
    ) -> (TrainSummary, Vec<f64>) {
        let trainee = trainee_of(setup, "test");
        let mut losses = Vec::new();
        let summary = train(&trainee, source, config, dir, stop_after, &mut |r| {
            losses.push(r.loss);
            ControlFlow::Continue(())
        })
        .unwrap();
        (summary, losses)
    }

    #[test]
    fn a_text_only_run_leaves_the_projector_alone_and_resumes_to_the_same_end() {
        let _rng = crate::test_support::rng_lock();
        // Text-only prompts fill no ID slot: the projector gets no gradient (stage 1), and
        // the optimizer must leave it as it was while it trains everything else.
        // Weight decay on: an idle tensor wrongly in the update would shrink.
        let config = TrainConfig {
            adamw: AdamWConfig {
                weight_decay: 0.01,
                ..AdamWConfig::default()
            },
            ..config()
        };
        let reference = setup();
        fn text_only(setup: &Setup) -> Rows<'_> {
            Rows {
                mode: PromptMode::TextOnly,
                ..rows(setup)
            }
        }
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = setup_like(&reference);
        let (summary, straight_losses) = run_source(
            &straight,
            &text_only(&straight),
            straight_dir.path(),
            None,
            &config,
        );
        assert_eq!(summary.steps, 4);
        let before = reference.trained.variables();
        let (mut projector, mut moved) = (0, 0);
        for (name, tensor) in straight.trained.variables() {
            let changed = !tensor.equal(&before[&name]);
            if name.contains("projector") {
                projector += 1;
                assert!(!changed, "{name} moved without a gradient");
            } else {
                moved += usize::from(changed);
            }
        }
        assert_eq!(projector, 4, "the projector's two layers, weight and bias");
        assert!(moved > 0, "nothing else trained");

        let killed_dir = tempfile::tempdir().unwrap();
        let first = setup_like(&reference);
        let (_, first_losses) = run_source(
            &first,
            &text_only(&first),
            killed_dir.path(),
            Some(2),
            &config,
        );
        drop(first);
        let second = setup_like(&reference);
        let (resumed, second_losses) = run_source(
            &second,
            &text_only(&second),
            killed_dir.path(),
            None,
            &config,
        );
        assert_eq!(resumed.resumed_from, Some(2));
        assert_same_curve(first_losses, second_losses, &straight_losses);
        assert_same_tensors(&straight.trained, &second.trained);
    }

    /// A killed run's losses, before and after its resume, against the uninterrupted run's.
    fn assert_same_curve(first: Vec<f64>, second: Vec<f64>, straight: &[f64]) {
        let combined: Vec<f64> = first.into_iter().chain(second).collect();
        for (a, b) in combined.iter().zip(straight) {
            assert!(
                (a - b).abs() < 1e-5,
                "loss curve {combined:?} vs {straight:?}"
            );
        }
    }

    /// Every tensor of `straight` within 1e-5 of its namesake in `resumed`.
    fn assert_same_tensors(straight: &nn::VarStore, resumed: &nn::VarStore) {
        let other = resumed.variables();
        for (name, tensor) in straight.variables() {
            let diff = (&tensor - &other[&name]).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} differs by {diff}");
        }
    }

    /// What `on_step` asking to stop at `at` does (4 planned steps): summary, checkpoints.
    fn stop_at(at: u64) -> (TrainSummary, Option<u64>) {
        let s = setup();
        let dir = tempfile::tempdir().unwrap();
        let trainee = trainee_of(&s, "test");
        let mut c = config();
        c.checkpoint_every = 100;
        let summary = train(&trainee, &rows(&s), &c, dir.path(), None, &mut |r| {
            if r.step == at {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        let saved = crate::checkpoint::latest(dir.path())
            .unwrap()
            .map(|c| c.manifest.step);
        (summary, saved)
    }

    #[test]
    fn a_stop_request_checkpoints_its_step_and_only_counts_before_the_end() {
        let _rng = crate::test_support::rng_lock();
        let (early, saved) = stop_at(2);
        assert!(early.stopped);
        assert_eq!(early.last.map(|r| r.step), Some(2));
        assert_eq!(saved, Some(2), "the step it stopped at is checkpointed");
        let (at_end, saved) = stop_at(4);
        assert!(
            !at_end.stopped,
            "a stop at the last planned step is a finished run"
        );
        assert_eq!(saved, Some(4));
    }

    #[test]
    fn the_plan_resumed_anywhere_continues_the_straight_one() {
        // 7 examples, 3 per step: steps of 3, 3, 1 per epoch; 3 epochs, capped at 8 steps;
        // as drawn and regrouped by length in windows of 2 steps.
        let length_of = |epoch: u64, i: usize| (i * 5 + epoch as usize) % 7;
        for window in [0, 2] {
            let mut c = config();
            (c.micro_batch, c.grad_accum, c.epochs, c.max_steps) = (3, 1, 3, Some(8));
            c.length_window_steps = window;
            let straight: Vec<PlannedStep> = StepPlan::new(7, &c, (0, 0, 0), &length_of).collect();
            assert_eq!(straight.len(), 8);
            let sizes: Vec<usize> = straight.iter().map(|p| p.examples.len()).collect();
            assert_eq!(sizes, [3, 3, 1, 3, 3, 1, 3, 3], "window {window}");
            for epoch in 0..2 {
                let mut seen: Vec<usize> = straight[epoch * 3..epoch * 3 + 3]
                    .iter()
                    .flat_map(|p| p.examples.clone())
                    .collect();
                seen.sort_unstable();
                assert_eq!(
                    seen,
                    (0..7).collect::<Vec<_>>(),
                    "epoch {epoch} visits each once (window {window})"
                );
            }
            assert_ne!(
                straight[0].examples, straight[3].examples,
                "a new order per epoch"
            );
            for (k, planned) in straight.iter().enumerate() {
                let resumed: Vec<PlannedStep> = StepPlan::new(
                    7,
                    &c,
                    (planned.step + 1, planned.epoch_after, planned.done_after),
                    &length_of,
                )
                .collect();
                assert_eq!(
                    resumed,
                    straight[k + 1..],
                    "resumed after step {} (window {window})",
                    k + 1
                );
            }
        }
    }

    #[test]
    fn a_length_window_deals_out_its_rows_as_steps_of_similar_lengths() {
        // 64 rows of lengths 1..=50 in a scrambled order, 4 rows per step, windows of 4 steps.
        let length_of = |_: u64, i: usize| (i * 37) % 50 + 1;
        let mut c = config();
        (c.micro_batch, c.grad_accum, c.epochs, c.max_steps) = (4, 1, 1, None);
        let plan = |window: usize| -> Vec<Vec<usize>> {
            let mut c = c.clone();
            c.length_window_steps = window;
            StepPlan::new(64, &c, (0, 0, 0), &length_of)
                .map(|p| p.examples)
                .collect()
        };
        let (drawn, grouped) = (plan(0), plan(4));
        assert_eq!(grouped, plan(4), "seeded: the same steps every time");
        assert_eq!(grouped.len(), 16);
        let padded = |steps: &[Vec<usize>]| -> usize {
            steps
                .iter()
                .map(|s| s.len() * s.iter().map(|&i| length_of(0, i)).max().unwrap_or(0))
                .sum()
        };
        let real: usize = (0..64).map(|i| length_of(0, i)).sum();
        assert!(
            padded(&grouped) * 5 < padded(&drawn) * 4,
            "padded positions: {} grouped, {} drawn, {real} real",
            padded(&grouped),
            padded(&drawn)
        );
        for w in 0..4 {
            // Each window holds the drawn permutation's rows of that window, and nothing else.
            let rows = |steps: &[Vec<usize>]| {
                let mut r: Vec<usize> = steps[w * 4..w * 4 + 4].concat();
                r.sort_unstable();
                r
            };
            assert_eq!(rows(&grouped), rows(&drawn), "window {w}");
            // Its steps are the window's rows in length order, cut into fours.
            let mut spans: Vec<(usize, usize)> = grouped[w * 4..w * 4 + 4]
                .iter()
                .map(|s| {
                    let lens = s.iter().map(|&i| length_of(0, i));
                    (lens.clone().min().unwrap(), lens.max().unwrap())
                })
                .collect();
            spans.sort_unstable();
            assert!(spans.windows(2).all(|p| p[0].1 <= p[1].0), "{spans:?}");
        }
        assert!(
            (0..4).any(|w| {
                let firsts: Vec<usize> = (0..4)
                    .map(|k| length_of(0, grouped[w * 4 + k][0]))
                    .collect();
                !firsts.is_sorted()
            }),
            "the steps of a window are shuffled, not left in length order"
        );
    }

    #[test]
    fn a_window_keeps_an_epoch_s_partial_step_last() {
        // 10 rows, 4 per step, one window of 3 steps: whole steps first, the 2-row one last.
        let order: Vec<usize> = (0..10).rev().collect();
        for seed in 0..8 {
            let grouped = group_window(&order, 4, |i| i, seed);
            let mut sorted = grouped.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..10).collect::<Vec<_>>());
            assert_eq!(&grouped[8..], &[8, 9], "seed {seed}: the longest two, last");
        }
    }

    #[test]
    fn grouping_by_length_sorts_the_rows_of_a_step_into_micro_batches() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let mut source = rows(&s);
        // Histories of 1 to 6 items: prompts of clearly different lengths.
        source.rows = (0..6u32)
            .map(|i| {
                let history: Vec<u32> = (0..=i).map(|h| (h + 6) % 12).collect();
                (history, vec![1, 2, 3], 2)
            })
            .collect();
        let mut c = config();
        (c.micro_batch, c.grad_accum) = (2, 3);
        let plan = StepPlan::new(6, &c, (0, 0, 0), &|_, i| i).next().unwrap();
        let len = |p: &BuiltPrompt| p.input_ids.len() + p.answer_ids.len();
        let padded = |step: &LoadedStep| -> usize {
            step.micro_batches
                .iter()
                .map(|(_, ps)| ps.len() * ps.iter().map(len).max().unwrap())
                .sum()
        };
        let grouped = load_step(&source, &c, plan.clone()).unwrap();
        c.group_by_length = false;
        let plain = load_step(&source, &c, plan.clone()).unwrap();
        for step in [&grouped, &plain] {
            assert_eq!(step.micro_batches.len(), 3);
            let mut rows: Vec<usize> = step
                .micro_batches
                .iter()
                .flat_map(|(r, ps)| {
                    assert_eq!(r.len(), ps.len());
                    r.clone()
                })
                .collect();
            rows.sort_unstable();
            assert_eq!(rows, (0..6).collect::<Vec<_>>(), "the same rows, once each");
        }
        let order: Vec<usize> = plain
            .micro_batches
            .iter()
            .flat_map(|(r, _)| r.clone())
            .collect();
        assert_eq!(order, plan.examples, "ungrouped: the epoch's order");
        let lengths: Vec<usize> = grouped
            .micro_batches
            .iter()
            .flat_map(|(_, ps)| ps.iter().map(len))
            .collect();
        assert!(lengths.windows(2).all(|w| w[0] <= w[1]), "{lengths:?}");
        assert!(padded(&grouped) < padded(&plain));
    }

    #[test]
    fn a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let dir = tempfile::tempdir().unwrap();
        let trainee = trainee_of(&s, "test");
        let mut c = config();
        c.checkpoint_every = 2;
        let mut reports = Vec::new();
        let err = train(&trainee, &rows(&s), &c, dir.path(), None, &mut |r| {
            reports.push(r.step);
            if r.step == 2 {
                // The recommender's vectors turn NaN (they are not checkpointed with the
                // trained tensors): the ID slots of step 3 make its loss NaN.
                let _guard = tch::no_grad_guard();
                let _ = s.items.vectors.shallow_clone().fill_(f64::NAN);
            }
            ControlFlow::Continue(())
        })
        .unwrap_err();
        assert_eq!(reports, [1, 2], "no report for the step that failed");
        let TrainError::Diverged(d) = &err else {
            panic!("not a divergence: {err}");
        };
        assert_eq!((d.step, d.epoch), (3, 1));
        assert_eq!(d.micro_batch, Some((1, 2)));
        assert_eq!(d.rows.len(), 2);
        assert!(d.rows.iter().all(|&r| r < 6));
        assert!(d.what.contains("the loss is NaN"), "{}", d.what);
        let kept = crate::checkpoint::latest(dir.path()).unwrap().unwrap();
        assert_eq!(d.last_checkpoint, Some((2, kept.dir.clone())));
        assert_eq!(kept.manifest.step, 2, "the last good checkpoint is kept");
        // Step 3 was not applied: the trained tensors are still the checkpoint's.
        let (saved, _) = kept.load().unwrap();
        let vars = s.trained.variables();
        for (name, t) in saved {
            assert!(
                t.isfinite().all().int64_value(&[]) == 1,
                "{name} is not finite"
            );
            assert!(
                t.equal(&vars[&name]),
                "{name} moved after the last good step"
            );
        }
        let message = err.to_string();
        for part in [
            "NaN",
            "optimizer step 3",
            "micro-batch 1 of 2",
            "training rows",
            "step 2",
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    #[test]
    fn a_checkpoint_of_another_base_model_is_not_resumed() {
        let _rng = crate::test_support::rng_lock();
        let s = setup();
        let dir = tempfile::tempdir().unwrap();
        run(&s, dir.path(), Some(1));
        let before = crate::checkpoint::latest(dir.path()).unwrap().unwrap();
        let trainee = trainee_of(&s, "another");
        let mut steps = 0;
        let err = train(
            &trainee,
            &rows(&s),
            &config(),
            dir.path(),
            None,
            &mut |_| {
                steps += 1;
                ControlFlow::Continue(())
            },
        )
        .unwrap_err()
        .to_string();
        assert_eq!(steps, 0, "refused before any step");
        assert!(
            err.contains("sha256 test") && err.contains("sha256 another"),
            "{err}"
        );
        let after = crate::checkpoint::latest(dir.path()).unwrap().unwrap();
        assert_eq!(after.manifest, before.manifest);
    }

    #[test]
    fn a_killed_run_resumes_to_the_same_end() {
        let _rng = crate::test_support::rng_lock();
        // 6 examples, 4 per optimizer step: 2 steps per epoch, 4 in all.
        assert_eq!(config().total_steps(6), 4);
        let reference = setup();
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = setup_like(&reference);
        let (summary, straight_losses) = run(&straight, straight_dir.path(), None);
        assert_eq!(summary.steps, 4);
        assert_eq!(straight_losses.len(), 4);

        let killed_dir = tempfile::tempdir().unwrap();
        let first = setup_like(&reference);
        let (partial, first_losses) = run(&first, killed_dir.path(), Some(3));
        assert_eq!(partial.steps, 3);
        drop(first);
        // A new process: fresh model objects, the same checkpoint directory.
        let second = setup_like(&reference);
        let (resumed, second_losses) = run(&second, killed_dir.path(), None);
        assert_eq!(resumed.resumed_from, Some(3));
        assert_eq!(resumed.steps, 4);
        assert_same_curve(first_losses, second_losses, &straight_losses);
        assert_same_tensors(&straight.trained, &second.trained);
        // Done: a third call resumes at the end and takes no step.
        let third = setup_like(&reference);
        let (again, losses) = run(&third, killed_dir.path(), None);
        assert_eq!((again.steps, losses.len()), (4, 0));
    }
}
