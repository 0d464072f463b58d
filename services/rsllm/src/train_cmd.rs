//! `rsllm train --stage 1|2`: one RSLLM fine-tuning stage on a prepared dataset (resumes
//! from its last checkpoint when its output directory already holds one).

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use rsllm_core::Paths;
use rsllm_core::dataset::{DatasetName, PreparedDataset};
use rsllm_llm::LoraConfig;
use rsllm_trainer::losses::{UiNegatives, UiSimilarity};
use rsllm_trainer::stage::{
    Domain, StageSpec, TrainSubset, default_out, run_stage_mixed, training_rows,
};
use rsllm_trainer::{AdamWConfig, LossConfig, TrainConfig};

use crate::data_cmd::SplitArgs;
use crate::llm_cmd::ModelArgs;
use crate::rec_cmd::{Kind, model_dir};

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// 1: text-only prompts; 2: unified Text-ID prompts with the recommender's vectors.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    stage: u8,
    #[command(flatten)]
    split: SplitArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// The recommender whose item vectors fill the ID slots (stage 2).
    #[arg(long, env = "RSLLM_REC_MODEL", default_value = "sasrec")]
    rec_model: Kind,
    /// A finished stage's output directory to start from (stage 1's for stage 2).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Use only N training rows, evenly spaced over the split so that nearly every training
    /// user is represented (the quick profile).
    #[arg(long, env = "RSLLM_TRAIN_LIMIT")]
    limit: Option<usize>,
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    max_steps: Option<u64>,
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    #[arg(long, default_value_t = 4)]
    grad_accum: usize,
    /// Steps whose rows are pooled and sorted by length, then dealt out as steps of similar
    /// lengths: less padding where a step is one micro-batch (16 pools enough for a GPU
    /// run's 64-row steps to pad 2%); 0 or 1: the epoch's order as drawn.
    #[arg(long, default_value_t = 0)]
    length_window_steps: usize,
    /// Peak learning rate (LLaRA MovieLens: 8e-4).
    #[arg(long, default_value_t = 8e-4)]
    lr: f64,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    #[arg(long, default_value_t = 0.1)]
    lambda_ui: f64,
    #[arg(long, default_value_t = 0.1)]
    lambda_it: f64,
    /// L_rank's weight (ours, beyond the paper; 0: off): a softmax over the summed
    /// log-likelihoods of the row's candidates' answers, the target as the label. Each
    /// row then packs the scored answers after its prompt, so a step computes more positions.
    #[arg(long, default_value_t = 0.0)]
    lambda_rank: f64,
    /// Negatives L_rank scores beside the target per row (default: every other candidate).
    #[arg(long)]
    rank_negatives: Option<usize>,
    #[arg(long, default_value_t = 0.07)]
    tau: f64,
    /// L_ui's similarity, which the alignment heads also rank by: cosine (METHOD.md's
    /// starting point) or user-normalised (the item side keeps its length).
    #[arg(long, default_value = "cosine")]
    ui_similarity: UiSimilarityArg,
    /// L_ui's negatives: candidates (a row's other candidates and the batch's other targets,
    /// METHOD.md) or catalog (every item: a softmax over the whole catalog, as the
    /// recommenders train; `rsllm probe-heads` measures what it gives). Prefer catalog at
    /// large batches: the other targets, drawn by popularity, divide it out of L_ui.
    #[arg(long, default_value = "candidates")]
    ui_negatives: UiNegativesArg,
    /// Train the base model's weights too (full fine-tuning; checkpoints then hold the whole
    /// model, about 0.5 GB for SmolLM2-135M in f32).
    #[arg(long)]
    full_finetune: bool,
    /// Stage 2: one more slot after the history holding the recommender's user state (the
    /// pipeline's `user-slot` variant).
    #[arg(long)]
    user_slot: bool,
    /// Stage 2: the user slot as the prompt's last token, right before the answer (implies
    /// --user-slot; the pipeline's `user-slot-last` variant).
    #[arg(long)]
    user_slot_last: bool,
    /// Stage 2: steps of projector warm-up before the first training step: the projector
    /// alone aligned with the item titles (and the user slot with the target's title), no
    /// transformer pass; written to <out>/projector-warmup.json. 0: none (METHOD.md as
    /// written).
    #[arg(long, default_value_t = 0)]
    projector_warmup_steps: u64,
    /// Stage 2: start the projector and alignment heads from a transport probe's (the
    /// directory `rsllm probe-transport --save-heads` wrote, read on the --init-from stage's
    /// model with this stage's prompts; refused, naming what differs, otherwise).
    #[arg(long)]
    heads_from: Option<PathBuf>,
    /// With --heads-from: keep that projector and those heads as they are; only the adapters
    /// train.
    #[arg(long)]
    freeze_warm_heads: bool,
    /// Stage 1 on a mixture of domains: these datasets' training rows join the target's, each
    /// in its own templates (comma separated; `--limit` applies to each).
    #[arg(long, value_delimiter = ',')]
    mixture: Vec<DatasetName>,
    /// Output directory (default runs/<dataset>-stage<N>).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Prepares (or reuses) the splits of a stage-1 mixture's other domains, with the target's
/// protocol and candidate settings.
pub fn prepare_mixture(
    split: &SplitArgs,
    names: &[DatasetName],
    paths: &Paths,
) -> anyhow::Result<Vec<PreparedDataset>> {
    names
        .iter()
        .map(|&name| {
            Ok(rsllm_core::dataset::prepare(
                name,
                split.protocol,
                &split.options(),
                paths,
            )?)
        })
        .collect()
}

/// The other domains of a mixture as the trainer takes them.
pub fn domains<'a>(names: &'a [String], data: &'a [PreparedDataset]) -> Vec<Domain<'a>> {
    names
        .iter()
        .zip(data)
        .map(|(name, d)| Domain {
            dataset: name,
            catalog: &d.catalog,
            rows: &d.train,
        })
        .collect()
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let paths = Paths::from_env()?;
    let data = args.split.prepare(&paths)?;
    if args.stage != 1 && !args.mixture.is_empty() {
        anyhow::bail!(
            "--mixture is for stage 1 (text-only prompts); stage 2 trains on the target domain"
        );
    }
    let mixture = prepare_mixture(&args.split, &args.mixture, &paths)?;
    let mut base = args.model.load()?;
    let base_sha = base.weights_sha256()?;
    let recommender = (args.stage == 2).then(|| model_dir(&paths, &args.split, args.rec_model));
    if let Some(dir) = &recommender
        && !dir.join("manifest.json").is_file()
    {
        anyhow::bail!(
            "stage 2 needs a trained recommender at {}: run `rsllm rec train --dataset {} --model {}` first",
            dir.display(),
            args.split.dataset,
            args.rec_model.name()
        );
    }
    let dataset = args.split.dataset.to_string();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| default_out(&dataset, args.stage));
    let spec = StageSpec {
        stage: args.stage,
        dataset: dataset.clone(),
        base_model: base.path.clone(),
        base_model_sha256: base_sha,
        recommender,
        init_from: args.init_from.clone(),
        train_limit: args.limit,
        train_subset: TrainSubset::Spread,
        num_candidates: args.split.num_candidates,
        lora: LoraConfig::default(),
        train: TrainConfig {
            epochs: args.epochs,
            max_steps: args.max_steps,
            micro_batch: args.micro_batch,
            grad_accum: args.grad_accum,
            peak_lr: args.lr,
            warmup_fraction: 0.05,
            max_grad_norm: 1.0,
            seed: args.seed,
            checkpoint_every: args.checkpoint_every,
            keep_last: 2,
            pad_id: base.tokenizer.pad_id.unwrap_or(0),
            loss: LossConfig {
                use_lm: true,
                lambda_ui: args.lambda_ui,
                lambda_it: args.lambda_it,
                tau: args.tau,
                ui_similarity: args.ui_similarity.similarity(),
                ui_negatives: args.ui_negatives.negatives(),
                lambda_rank: args.lambda_rank,
                rank_negatives: args.rank_negatives,
            },
            adamw: AdamWConfig::default(),
            curriculum: false,
            full_finetune: args.full_finetune,
            autocast_bf16: true,
            group_by_length: true,
            length_window_steps: args.length_window_steps,
        },
        no_id_slots: false,
        no_titles: false,
        user_slot: args.user_slot || args.user_slot_last,
        user_slot_last: args.user_slot_last,
        projector_warmup_steps: args.projector_warmup_steps,
        heads_from: args.heads_from.clone(),
        freeze_warm_heads: args.freeze_warm_heads,
        mixture: args.mixture.iter().map(ToString::to_string).collect(),
    };
    let target = Domain {
        dataset: &spec.dataset,
        catalog: &data.catalog,
        rows: &data.train,
    };
    let others = domains(&spec.mixture, &mixture);
    let total = spec
        .train
        .total_steps(training_rows(&target, &others, args.limit));
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    // Real and computed (padded) token positions of this invocation's steps.
    let (mut tokens, mut computed) = (0usize, 0usize);
    let summary = run_stage_mixed(&spec, &mut base, target, &others, &out, &mut |r| {
        tokens += r.tokens;
        computed += r.padded_tokens;
        bar.set_position(r.step);
        bar.set_message(format!(
            "loss {:.3} (lm {:.3} ui {:.3} it {:.3} rank {:.3}) lr {:.1e}",
            r.loss, r.lm, r.ui, r.it, r.rank, r.lr
        ));
        tracing::debug!(
            step = r.step,
            loss = r.loss,
            lm = r.lm,
            ui = r.ui,
            it = r.it,
            rank = r.rank,
            lr = r.lr,
            "step"
        );
        std::ops::ControlFlow::Continue(())
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "stage {} on {dataset}: {} steps ({} resumed), {seconds:.0} s, {tokens} real tokens \
         ({:.0}/s), {:.3} computed per real; last loss {}; output {}",
        args.stage,
        summary.steps,
        summary
            .resumed_from
            .map_or("none".to_owned(), |s| format!("from step {s}")),
        tokens as f64 / seconds.max(1e-9),
        computed as f64 / tokens.max(1) as f64,
        summary.last.as_ref().map_or("-".to_owned(), |r| format!(
            "{:.4} (lm {:.4}, ui {:.4}, it {:.4}, rank {:.4})",
            r.loss, r.lm, r.ui, r.it, r.rank
        )),
        out.display()
    );
    Ok(())
}

/// `--ui-similarity` (rsllm_trainer::losses::UiSimilarity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UiSimilarityArg {
    Cosine,
    UserNormalised,
}

impl UiSimilarityArg {
    pub fn similarity(self) -> UiSimilarity {
        match self {
            UiSimilarityArg::Cosine => UiSimilarity::Cosine,
            UiSimilarityArg::UserNormalised => UiSimilarity::UserNormalised,
        }
    }
}

/// `--ui-negatives` (rsllm_trainer::losses::UiNegatives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UiNegativesArg {
    Candidates,
    Catalog,
}

impl UiNegativesArg {
    pub fn negatives(self) -> UiNegatives {
        match self {
            UiNegativesArg::Candidates => UiNegatives::Candidates,
            UiNegativesArg::Catalog => UiNegatives::Catalog,
        }
    }
}
