//! One training stage: seeded data order, micro-batches with gradient accumulation, LLaRA's
//! learning-rate schedule, gradient clipping, periodic checkpoints, and exact resumption.
//!
//! Determinism: epoch `e` visits the examples in a permutation drawn from `seed` and `e`;
//! example `i` of it uses the template seeded by `(seed, e, i)`; libtorch's generator (adapter
//! dropout) is reseeded from `(seed, step, micro-batch)` before every micro-batch. A resumed
//! run therefore sees exactly the data, templates and dropout masks the uninterrupted run
//! would have, and its losses match it to floating-point tolerance.

use std::ops::ControlFlow;
use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rsllm_llm::Llama;
use rsllm_prompt::{BuiltPrompt, PromptMode};
use serde::{Deserialize, Serialize};
use tch::nn;

use crate::batch::collate;
use crate::checkpoint::{self, CheckpointManifest};
use crate::error::{Result, TrainError};
use crate::objective::{ItemTable, LossConfig, RsllmHeads, losses};
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
    /// bf16 autocast on CUDA (PyTorch's AMP): weights, optimizer state and gradients stay f32,
    /// matrix products run in bf16. No effect on the CPU, where bf16 kernels are slower.
    #[serde(default)]
    pub autocast_bf16: bool,
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
    pub grad_norm: f64,
    pub examples: usize,
    /// Prompt and answer tokens of the step's examples (padding not counted).
    pub tokens: usize,
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

/// Trains until the configured epochs or `max_steps`, or until `stop_after` optimizer steps
/// of this call (a test's stand-in for a killed process). Resumes from the latest checkpoint
/// under `checkpoints` when there is one.
pub fn train(
    trainee: &Trainee<'_>,
    source: &dyn ExampleSource,
    config: &TrainConfig,
    checkpoints: &Path,
    stop_after: Option<u64>,
    on_step: &mut dyn FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    config.check()?;
    if source.is_empty() {
        return Err(TrainError::Invalid("no training examples".into()));
    }
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
    if let Some(ckpt) = checkpoint::latest(checkpoints)? {
        let (trained, state) = ckpt.load()?;
        let base = config.full_finetune.then_some(trainee.base);
        restore_split(trainee.trained, base, trained, &ckpt.dir)?;
        opt.load_state(state, ckpt.manifest.step)?;
        step = ckpt.manifest.step;
        epoch = ckpt.manifest.epoch;
        done_in_epoch = ckpt.manifest.examples_done_in_epoch as usize;
        metrics = ckpt.manifest.metrics.clone();
        resumed_from = Some(step);
        tracing::info!(step, epoch, "resumed from {}", ckpt.dir.display());
    }
    let device = trainee.model.device();
    let per_step = config.micro_batch * config.grad_accum;
    let mut last = None;
    let mut taken_here = 0u64;
    let mut stopped = false;
    trainee.model.set_training(true);
    while step < total_steps && epoch < config.epochs {
        if stop_after.is_some_and(|s| taken_here >= s) {
            break;
        }
        let order = epoch_order(n, config.seed, epoch);
        let chunk: Vec<usize> = order
            .iter()
            .skip(done_in_epoch)
            .take(per_step)
            .copied()
            .collect();
        if chunk.is_empty() {
            epoch += 1;
            done_in_epoch = 0;
            continue;
        }
        opt.zero_grad();
        let mode = config
            .curriculum
            .then(|| curriculum_mode(config.seed, step, total_steps));
        let (mut sum, mut lm, mut ui, mut it) = (0.0, 0.0, 0.0, 0.0);
        let mut tokens = 0;
        let micro_batches: Vec<&[usize]> = chunk.chunks(config.micro_batch).collect();
        for (m, micro) in micro_batches.iter().enumerate() {
            let prompts = micro
                .iter()
                .map(|&i| source.build(i, mix(config.seed, epoch, i as u64), mode))
                .collect::<Result<Vec<_>>>()?;
            tokens += prompts
                .iter()
                .map(|p| p.input_ids.len() + p.answer_ids.len())
                .sum::<usize>();
            let batch = collate(&prompts, config.pad_id, device)?;
            tch::manual_seed(mix(config.seed, step, m as u64) as i64);
            let out = rsllm_llm::bf16_autocast(config.autocast_bf16 && device.is_cuda(), || {
                losses(
                    trainee.model,
                    trainee.heads,
                    trainee.items,
                    &batch,
                    &config.loss,
                )
            })?;
            // Each micro-batch weighs by its share of the step's examples.
            let share = micro.len() as f64 / chunk.len() as f64;
            out.total.f_mul_scalar(share)?.backward();
            sum += out.total.double_value(&[]) * share;
            lm += out.lm * share;
            ui += out.ui * share;
            it += out.it * share;
        }
        let grad_norm = opt.clip_grad_norm(config.max_grad_norm)?;
        let lr = schedule.lr(step);
        opt.step(lr)?;
        step += 1;
        taken_here += 1;
        done_in_epoch += chunk.len();
        if done_in_epoch >= n {
            epoch += 1;
            done_in_epoch = 0;
        }
        let report = StepReport {
            step,
            total_steps,
            epoch,
            lr,
            loss: sum,
            lm,
            ui,
            it,
            grad_norm,
            examples: chunk.len(),
            tokens,
        };
        if let Some(points) = metrics.get_mut("loss").and_then(|l| l.as_array_mut()) {
            points.push(serde_json::json!([step, sum, lm, ui, it, lr]));
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
            checkpoint::save(
                checkpoints,
                manifest,
                &trained,
                &opt.state()?,
                config.keep_last,
            )?;
        }
        last = Some(report);
        // A stop asked at the last planned step stops nothing: the run is complete.
        if stop && step < total_steps {
            stopped = true;
            break;
        }
    }
    trainee.model.set_training(false);
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

    struct Rows<'a> {
        setup: &'a Setup,
        builder: PromptBuilder,
        rows: Vec<(Vec<u32>, Vec<u32>, u32)>,
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
            self.builder
                .build(
                    &self.setup.tokenizer,
                    &self.setup.catalog,
                    h,
                    c,
                    Some(*t),
                    mode.unwrap_or(PromptMode::Unified),
                    TemplateChoice::Seeded(template_seed),
                )
                .map_err(|e| TrainError::Invalid(e.to_string()))
        }
    }

    fn rows(setup: &Setup) -> Rows<'_> {
        Rows {
            setup,
            builder: PromptBuilder::with_builtin_templates("movielens", PromptOptions::new(PAD_ID))
                .unwrap(),
            rows: (0..6u32)
                .map(|i| {
                    let history = vec![i, (i + 1) % 12, (i + 2) % 12];
                    let candidates = vec![(i + 3) % 12, (i + 5) % 12, (i + 7) % 12];
                    (history, candidates, (i + 5) % 12)
                })
                .collect(),
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
        }
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
        let combined: Vec<f64> = first_losses.into_iter().chain(second_losses).collect();
        for (a, b) in combined.iter().zip(&straight_losses) {
            assert!((a - b).abs() < 1e-5, "{combined:?} vs {straight_losses:?}");
        }
        for (name, tensor) in straight._base.variables() {
            let diff = (&tensor - &second._base.variables()[&name])
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "base {name} differs by {diff}");
        }
        // Adapter-only restoring refuses a full fine-tune's checkpoint.
        let err = restore_split(&second.trained, None, saved, straight_dir.path()).unwrap_err();
        assert!(err.to_string().contains("full fine-tune"), "{err}");
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
        let trainee = Trainee {
            model: &setup.model,
            heads: &setup.heads,
            trained: &setup.trained,
            base: &setup._base,
            items: &setup.items,
            base_model_sha256: "test".into(),
            recommender_version: None,
        };
        let mut losses = Vec::new();
        let summary = train(&trainee, &rows(setup), config, dir, stop_after, &mut |r| {
            losses.push(r.loss);
            ControlFlow::Continue(())
        })
        .unwrap();
        (summary, losses)
    }

    /// What `on_step` asking to stop at `at` does (4 planned steps): summary, checkpoints.
    fn stop_at(at: u64) -> (TrainSummary, Option<u64>) {
        let s = setup();
        let dir = tempfile::tempdir().unwrap();
        let trainee = Trainee {
            model: &s.model,
            heads: &s.heads,
            trained: &s.trained,
            base: &s._base,
            items: &s.items,
            base_model_sha256: "test".into(),
            recommender_version: None,
        };
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
        let combined: Vec<f64> = first_losses.into_iter().chain(second_losses).collect();
        for (a, b) in combined.iter().zip(&straight_losses) {
            assert!(
                (a - b).abs() < 1e-5,
                "loss curve {combined:?} vs {straight_losses:?}"
            );
        }
        for (name, tensor) in straight.trained.variables() {
            let other = &second.trained.variables()[&name];
            let diff = (&tensor - other).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{name} differs by {diff}");
        }
        // Done: a third call resumes at the end and takes no step.
        let third = setup_like(&reference);
        let (again, losses) = run(&third, killed_dir.path(), None);
        assert_eq!((again.steps, losses.len()), (4, 0));
    }
}
