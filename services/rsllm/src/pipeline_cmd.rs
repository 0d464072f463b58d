//! `rsllm pipeline`: prepare -> recommender -> stage 1 -> stage 2 -> evaluation, with a
//! report. `--profile quick` is the CPU-sized run (a training subset, one epoch per stage);
//! `full` is LLaRA's schedule for a GPU.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rsllm_core::dataset::DatasetName;
use rsllm_core::{Paths, SplitPart};
use rsllm_llm::LoraConfig;
use rsllm_prompt::{PromptBuilder, PromptMode, PromptOptions};
use rsllm_recommender::{RecConfig, RecModel};
use rsllm_trainer::eval::{EvalOptions, Evaluated, evaluate, write_csv};
use rsllm_trainer::probe::ProbeConfig;
use rsllm_trainer::stage::{
    Domain, StageSpec, TrainSubset, binding_spec, open_stage, run_stage_mixed, training_rows,
};
use rsllm_trainer::transport::{PromptSource, Transport, TransportConfig, probe_transport};
use rsllm_trainer::warm_heads::{self, WarmHeadsManifest};
use rsllm_trainer::{AdamWConfig, LossConfig, TrainConfig};
use serde_json::json;

use crate::data_cmd::SplitArgs;
use crate::llm_cmd::ModelArgs;
use crate::rec_cmd::{Kind, model_dir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    Quick,
    Full,
}

/// A variant of RSLLM's stage 2, trained and evaluated beside the full method (the ablation
/// and baseline rows of the results table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// Stage 2 from the base model, without stage 1's text-only fine-tune.
    NoStage1,
    /// Without the item-text contrastive loss (lambda_it = 0).
    NoLit,
    /// Without the user-item contrastive loss (lambda_ui = 0).
    NoLui,
    /// Without ID slots: stage 2 on text-only prompts (L_lm and L_ui).
    NoSlots,
    /// Without titles: stage 2 on ID-only prompts (slots, no titles).
    NoTitles,
    /// LLaRA-style baseline: from the base model, LM loss only, LLaRA's curriculum (unified
    /// prompts with probability step / total, text-only otherwise).
    Llara,
    /// RSLLM plus a user slot after the history holding the recommender's user state
    /// (`PromptMode::UnifiedWithUser`; our addition to the method, not an ablation).
    UserSlot,
    /// The same user slot as the prompt's last token, right before the answer
    /// (`PromptMode::UnifiedWithUserLast`; our addition too).
    UserSlotLast,
    /// `UserSlotLast` with its projector and heads started from a transport probe read on
    /// stage 1's model (`rsllm_trainer::warm_heads`; ours): the pipeline runs the probe
    /// first, one LLM forward per fit row.
    UserSlotLastWarm,
    /// RSLLM plus L_rank, the listwise loss over the candidates' answer likelihoods, weighed
    /// `--lambda-rank` (`LossConfig::lambda_rank`; ours).
    Rank,
}

impl Variant {
    fn key(self) -> &'static str {
        match self {
            Variant::NoStage1 => "no-stage1",
            Variant::NoLit => "no-lit",
            Variant::NoLui => "no-lui",
            Variant::NoSlots => "no-slots",
            Variant::NoTitles => "no-titles",
            Variant::Llara => "llara",
            Variant::UserSlot => "user-slot",
            Variant::UserSlotLast => "user-slot-last",
            Variant::UserSlotLastWarm => "user-slot-last-warm",
            Variant::Rank => "rank",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Variant::NoStage1 => "rsllm w/o stage 1",
            Variant::NoLit => "rsllm w/o L_it",
            Variant::NoLui => "rsllm w/o L_ui",
            Variant::NoSlots => "rsllm w/o ID slots",
            Variant::NoTitles => "rsllm w/o titles",
            Variant::Llara => "llara-style (lm loss, curriculum)",
            Variant::UserSlot => "rsllm + user slot",
            Variant::UserSlotLast => "rsllm + user slot, last",
            Variant::UserSlotLastWarm => "rsllm + user slot, last, warm heads",
            Variant::Rank => "rsllm + l_rank",
        }
    }
}

#[derive(Debug, Args)]
pub struct PipelineArgs {
    #[command(flatten)]
    split: SplitArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// The recommender whose item vectors fill the ID slots (and whose user state fills the
    /// user-slot variants' slot), trained first if the split has none. METHOD.md's default is
    /// SASRec; GRU4Rec and Caser are selectable. Every recommender already trained for the
    /// split is evaluated beside it, as the table's ID-only rows.
    #[arg(long, env = "RSLLM_REC_MODEL", default_value = "sasrec")]
    rec_model: Kind,
    #[arg(long, default_value = "quick")]
    profile: Profile,
    /// Training rows per stage, evenly spaced over the split (default: 192 for quick, all for
    /// full).
    #[arg(long)]
    limit: Option<usize>,
    /// Run directory (default runs/pipeline-<dataset>-<profile>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Evaluate on the first N test rows only (smoke runs; the table uses all).
    #[arg(long)]
    test_limit: Option<usize>,
    /// Stage-2 variants to train and evaluate too, comma separated: ablations (no-stage1,
    /// no-lit, no-lui, no-slots, no-titles), the LLaRA-style baseline (llara) and RSLLM with a
    /// user slot after the history (user-slot) or as the prompt's last token (user-slot-last),
    /// the latter also with its projector and heads started from a transport probe read on
    /// stage 1 (user-slot-last-warm). Each adds one stage-2 run and one evaluation; none by
    /// default, so `quick` stays within its time budget.
    #[arg(long, value_delimiter = ',')]
    variants: Vec<Variant>,
    /// Epochs per training run (default: 1 for quick, 5 for full).
    #[arg(long)]
    epochs: Option<u64>,
    /// Epochs of stage 1 alone (default: --epochs), so stage 2 can take more than stage 1
    /// (a finished stage 1 is resumed as done only under the settings it was trained with).
    #[arg(long)]
    stage1_epochs: Option<u64>,
    /// Rows per forward pass; a GPU takes more than the CPU default.
    #[arg(long, default_value_t = 4)]
    micro_batch: usize,
    /// Micro-batches per optimizer step (default: 4 for quick, 32 for full).
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Steps whose rows are pooled and sorted by length, then dealt out as steps of similar
    /// lengths, in every training run (see `rsllm train --length-window-steps`; 0: off).
    #[arg(long, default_value_t = 0)]
    length_window_steps: usize,
    /// Stage 1 on a mixture of domains: these datasets' training rows join the target's
    /// (comma separated; `--limit` applies to each). Stage 2 stays on the target.
    #[arg(long, value_delimiter = ',')]
    stage1_mixture: Vec<DatasetName>,
    /// Stop each training run after this many seconds (a fixed device budget): the step it
    /// reached is checkpointed and evaluated, and the report marks the run as stopped.
    #[arg(long)]
    stage_time_limit_secs: Option<u64>,
    /// Peak learning rate of every training run (default: LLaRA's MovieLens 8e-4, set for
    /// LoRA; a full fine-tune wants about 1e-4, as the peer anchor's text-only baseline).
    #[arg(long)]
    lr: Option<f64>,
    /// Train the base model's weights too in every run (full fine-tuning, beside the LoRA
    /// adapters, projector and heads); each checkpoint then holds the whole model and its
    /// optimizer state (about 1.6 GB for SmolLM2-135M).
    #[arg(long)]
    full_finetune: bool,
    /// L_ui's similarity in every training run, which the alignment heads also rank by
    /// (see `rsllm train --ui-similarity`).
    #[arg(long, default_value = "cosine")]
    ui_similarity: crate::train_cmd::UiSimilarityArg,
    /// L_ui's negatives in every training run (see `rsllm train --ui-negatives`).
    #[arg(long, default_value = "candidates")]
    ui_negatives: crate::train_cmd::UiNegativesArg,
    /// L_ui's weight in every training run (METHOD.md's starting point: 0.1; the no-lui
    /// variant sets it to 0).
    #[arg(long, default_value_t = 0.1)]
    lambda_ui: f64,
    /// L_ui's weight in stage 1 alone (default: --lambda-ui). Stage 1's text-only prompts
    /// fill no ID slot, so there L_ui trains the user head on the LLM's state only; at CPU
    /// scale a weight of 1 there cost the text-only stage (docs/results.md, "Four times the
    /// quick profile's steps"), while in stage 2 it helped.
    #[arg(long)]
    stage1_lambda_ui: Option<f64>,
    /// L_it's weight in every training run (METHOD.md's starting point: 0.1; the no-lit
    /// variant sets it to 0).
    #[arg(long, default_value_t = 0.1)]
    lambda_it: f64,
    /// L_rank's weight in the `rank` variant (the listwise loss over the candidates' answer
    /// likelihoods; ours). No other run uses L_rank.
    #[arg(long, default_value_t = 1.0)]
    lambda_rank: f64,
    /// Negatives L_rank scores beside the target per row in the `rank` variant (default:
    /// every other candidate; fewer cost fewer positions per step).
    #[arg(long)]
    rank_negatives: Option<usize>,
    /// Optimizer steps between checkpoints (a run stopped by its time limit checkpoints the
    /// step it reached anyway); raise it for a full fine-tune, whose checkpoints are large.
    #[arg(long, default_value_t = 20)]
    checkpoint_every: u64,
    /// Steps of projector warm-up at the start of every stage-2 run with ID slots (see
    /// `rsllm train --projector-warmup-steps`; our addition beyond METHOD.md). 0: none.
    #[arg(long, default_value_t = 0)]
    projector_warmup_steps: u64,
}

impl PipelineArgs {
    /// A stage's epochs: `--stage1-epochs` in stage 1 where given, else `--epochs`, else
    /// the profile's `default`.
    fn epochs_in(&self, stage: u8, default: u64) -> u64 {
        match (stage, self.stage1_epochs) {
            (1, Some(epochs)) => epochs,
            _ => self.epochs.unwrap_or(default),
        }
    }

    /// L_ui's weight in a stage's training runs: `--stage1-lambda-ui` in stage 1 where given,
    /// else `--lambda-ui`.
    fn lambda_ui_in(&self, stage: u8) -> f64 {
        match (stage, self.stage1_lambda_ui) {
            (1, Some(weight)) => weight,
            _ => self.lambda_ui,
        }
    }
}

/// A run directory whose training runs were started with other settings (another version of
/// the tool, another recommender, other flags) cannot be resumed. The default directory is
/// the main job's: it is renamed to `<dir>.replaced-<unix seconds>`, kept for inspection,
/// and the pipeline starts afresh, so running the main job again always works. A directory
/// the caller named is left alone and refused, naming what differs.
fn set_aside_if_stale(
    out: &Path,
    default_dir: bool,
    runs: &[(StageSpec, String, String)],
) -> anyhow::Result<()> {
    let mut stale = Vec::new();
    for (spec, dir, _) in runs {
        // Only a run that checkpointed binds its directory: one that failed before its first
        // step may be started again with corrected settings.
        if let Some(previous) = binding_spec(&out.join(dir))?.filter(|previous| previous != spec) {
            let differences = rsllm_trainer::stage::spec_differences(&previous, spec);
            stale.push(format!("{dir} ({})", differences.join("; ")));
        }
    }
    if stale.is_empty() {
        return Ok(());
    }
    let stale = stale.join(", ");
    if !default_dir {
        anyhow::bail!(
            "{}: {stale} were started with other settings and cannot be resumed with these; \
             give another --out, or remove it to start over",
            out.display()
        );
    }
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = out.as_os_str().to_owned();
    aside.push(format!(".replaced-{seconds}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(out, &aside)
        .with_context(|| format!("moving {} to {}", out.display(), aside.display()))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "{} held runs started with other settings ({stale}): moved to {}; starting afresh",
        out.display(),
        aside.display()
    );
    Ok(())
}

/// Where the `user-slot-last-warm` variant's heads are written, under the run directory.
const WARM_HEADS_DIR: &str = "warm-heads";
/// Training rows whose `h` the warm heads' readout is fit on (one LLM forward each: about 8
/// minutes on the 2-core CPU in bf16; docs/results.md).
const WARM_FIT_ROWS: usize = 4000;

/// Makes the warm heads `spec.heads_from` names, by a transport probe read on the stage
/// `spec.init_from` names, unless the run in `stage_out` resumes from its own checkpoint or
/// heads read on that stage's current checkpoint are already there. The probe is ranked on
/// the validation rows only: the test rows stay unseen until the evaluation.
fn ensure_warm_heads(
    args: &PipelineArgs,
    spec: &StageSpec,
    stage_out: &Path,
    data: &rsllm_core::dataset::PreparedDataset,
    rec_dir: &Path,
) -> anyhow::Result<()> {
    let (Some(heads_dir), Some(init)) = (&spec.heads_from, &spec.init_from) else {
        anyhow::bail!("warm heads are read on the stage this run starts from: it names none");
    };
    let checkpoints = stage_out.join(rsllm_trainer::stage::CHECKPOINT_DIR);
    if rsllm_trainer::checkpoint::latest(&checkpoints)?.is_some() {
        return Ok(());
    }
    let init_checkpoints = init.join(rsllm_trainer::stage::CHECKPOINT_DIR);
    let init_sha = rsllm_trainer::checkpoint::latest(&init_checkpoints)?
        .with_context(|| format!("{}: no checkpoint to read h on", init.display()))?
        .manifest
        .trained_sha256;
    if heads_dir.join(warm_heads::MANIFEST_FILE).is_file() {
        // The manifest names the checkpoint; the tensors are checked when the stage loads them.
        let made = warm_heads::read_manifest(heads_dir)?;
        if made.read_on.is_some_and(|r| r.trained_sha256 == init_sha) {
            return Ok(());
        }
    }
    let dataset = spec.dataset.as_str();
    let mut base = args.model.load()?;
    // Kept alive while the probe runs: it holds stage 1's adapters.
    let (_stage, read_on) = warm_heads::open_read_on(&mut base, init, dataset, &data.catalog)?;
    let (items, version) =
        rsllm_trainer::stage::item_table(&base, &data.catalog, Some(rec_dir), true)?;
    let slot = base.tokenizer.pad_id.unwrap_or(0);
    let builder = PromptBuilder::with_builtin_templates(dataset, PromptOptions::new(slot))?;
    let config = TransportConfig {
        probe: ProbeConfig {
            tau: spec.train.loss.tau,
            similarity: spec.train.loss.ui_similarity,
            negatives: spec.train.loss.ui_negatives,
            num_candidates: spec.num_candidates,
            seed: spec.train.seed,
            ..ProbeConfig::default()
        },
        prompt_mode: spec.prompt_mode(),
        fit_rows: WARM_FIT_ROWS,
    };
    eprintln!(
        "  warm heads: the heads probe, then {} prompts read on {}",
        WARM_FIT_ROWS.min(data.train.len()) + data.val.len(),
        init.display()
    );
    let bar =
        indicatif::ProgressBar::new((WARM_FIT_ROWS.min(data.train.len()) + data.val.len()) as u64);
    let Transport { report, heads } = probe_transport(
        &base.model,
        &PromptSource {
            tokenizer: &base.tokenizer,
            builder: &builder,
            catalog: &data.catalog,
        },
        &items,
        &data.train,
        &[("val", &data.val)],
        config,
        &mut |k| bar.inc(k as u64),
    )?;
    bar.finish_and_clear();
    let manifest = WarmHeadsManifest::new(
        spec.base_model_sha256.clone(),
        dataset,
        version,
        &config,
        Some(read_on),
        &report,
    );
    eprintln!(
        "  warm heads: readout R² {:.3}; the folded head ranks {:?} (part, rows, HR@1)",
        report.readout_r2_held_out, manifest.folded_hr1
    );
    warm_heads::save(heads_dir, manifest, &heads)?;
    Ok(())
}

/// How a pipeline run was made, for its report.
struct RunFacts {
    /// Training rows per stage (None: all).
    train_rows: Option<usize>,
    /// What is trained, peak lr, batch, epochs.
    recipe: String,
    /// Wall time of the whole run.
    seconds: f64,
}

struct Method {
    name: String,
    metrics: serde_json::Value,
    /// Per test row, whether the method's answer was right: LLaRA's rule on the generated
    /// answer for an LLM, the target ranked first for an ID-only recommender (its HR@1).
    hits: Vec<bool>,
}

/// The text-only stage's row, which RSLLM must pass (item 7's targets).
const TEXT_ONLY: &str = "text-only fine-tune (stage 1)";
const ZERO_SHOT: &str = "zero-shot";

impl Method {
    /// An ID-only recommender's row: always valid, it ranks and has no generative answer.
    fn is_id_only(&self) -> bool {
        Kind::ALL.iter().any(|k| k.name() == self.name)
    }

    fn hr1(&self) -> f64 {
        self.metrics["hr1"]["mean"].as_f64().unwrap_or(0.0)
    }
}

/// A p-value as a report shows it: three decimals, or the order of magnitude under 0.001.
fn p_value(p: f64) -> String {
    match p {
        p if p >= 0.9995 => "1".to_owned(),
        p if p >= 0.001 => format!("{p:.3}"),
        p => format!("{p:.0e}"),
    }
}

/// Item 7's targets, paired on the test rows: every stage-2 method (RSLLM, its variants and
/// the LLaRA-style baseline) against the best ID-only recommender of the run and against the
/// text-only fine-tune, by generative HR@1 (exact McNemar over the rows where the two differ).
/// Returns the report's section and metrics.json's `paired` object.
fn paired_against_targets(methods: &[Method]) -> (String, serde_json::Value) {
    let best_id = methods
        .iter()
        .filter(|m| m.is_id_only())
        .fold(None::<&Method>, |best, m| match best {
            Some(b) if b.hr1() >= m.hr1() => Some(b),
            _ => Some(m),
        });
    let text_only = methods.iter().find(|m| m.name == TEXT_ONLY);
    let references: Vec<&Method> = best_id.into_iter().chain(text_only).collect();
    let trained = methods
        .iter()
        .filter(|m| !m.is_id_only() && m.name != TEXT_ONLY && m.name != ZERO_SHOT);
    let mut md = String::new();
    let mut json_out = serde_json::Map::new();
    for m in trained {
        let mut cells = Vec::new();
        let mut against = serde_json::Map::new();
        for r in &references {
            let Some(p) = rsllm_core::metrics::paired(&m.hits, &r.hits) else {
                continue;
            };
            let above = m.hr1() > r.hr1();
            cells.push(format!(
                "{} {} ({:.3} against {:.3}; rows right only here {}, only there {}, p = {})",
                if above { "above" } else { "not above" },
                r.name,
                m.hr1(),
                r.hr1(),
                p.only_first,
                p.only_second,
                p_value(p.p)
            ));
            against.insert(
                r.name.clone(),
                json!({"only_this": p.only_first, "only_that": p.only_second, "p": p.p,
                       "above": above}),
            );
        }
        let valid = m.metrics["valid_ratio"]["mean"].as_f64().unwrap_or(0.0);
        cells.push(format!(
            "ValidRatio {valid:.3} {} 0.95",
            if valid >= 0.95 { ">=" } else { "<" }
        ));
        md.push_str(&format!("- {}: {}\n", m.name, cells.join("; ")));
        json_out.insert(m.name.clone(), serde_json::Value::Object(against));
    }
    if !md.is_empty() {
        md = format!(
            "\nAgainst the targets (generative HR@1, paired on the test rows: exact McNemar p):\n\n{md}"
        );
    }
    (md, serde_json::Value::Object(json_out))
}

pub fn run(args: PipelineArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before the data and the recommender, which take minutes: a bad weight fails at once.
    for (flag, weight) in [
        ("--lambda-ui", Some(args.lambda_ui)),
        ("--stage1-lambda-ui", args.stage1_lambda_ui),
        ("--lambda-it", Some(args.lambda_it)),
        ("--lambda-rank", Some(args.lambda_rank)),
    ] {
        if let Some(w) = weight.filter(|w| !(w.is_finite() && *w >= 0.0)) {
            anyhow::bail!("{flag} ({w}) must be finite and not negative");
        }
    }
    for (flag, epochs) in [
        ("--epochs", args.epochs),
        ("--stage1-epochs", args.stage1_epochs),
    ] {
        if epochs == Some(0) {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    if args.rank_negatives == Some(0) {
        anyhow::bail!("--rank-negatives must be at least 1");
    }
    let paths = Paths::from_env()?;
    let dataset = args.split.dataset.to_string();
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from("runs").join(format!("pipeline-{dataset}-{:?}", args.profile).to_lowercase())
    });
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("[1/5] data: {dataset} ({})", args.split.protocol);
    let data = args.split.prepare(&paths)?;
    let mut test = data.rows(SplitPart::Test).to_vec();
    if let Some(n) = args.test_limit {
        test.truncate(n);
    }

    eprintln!("[2/5] recommender: {}", args.rec_model.name());
    let rec_dir = model_dir(&paths, &args.split, args.rec_model);
    if !rec_dir.join("manifest.json").is_file() {
        let device = args.model.device.device()?;
        let kind = args.rec_model.model_kind();
        rsllm_recommender::train::train(
            &data,
            kind,
            &RecConfig::default_for(kind),
            &rec_dir,
            device,
            true,
        )?;
    }
    let mut methods = Vec::new();
    // Every recommender the split has, the slots' one included (trained above if missing).
    // Training the others is `rsllm rec train`'s: minutes each on a CPU, outside the quick
    // profile's budget.
    for kind in Kind::ALL {
        let dir = model_dir(&paths, &args.split, kind);
        if kind != args.rec_model && !dir.join("manifest.json").is_file() {
            eprintln!(
                "  {}: not trained for this split, so not in the report (`rsllm rec train --model {}`)",
                kind.name(),
                kind.name()
            );
            continue;
        }
        let rec = RecModel::load(&dir, tch::Device::Cpu)?;
        let ranks = rsllm_recommender::eval::target_ranks(&rec, &test)?;
        let m = rsllm_core::metrics::ranking_metrics(&ranks);
        methods.push(Method {
            name: kind.name().to_owned(),
            metrics: json!({"hr1": m.hr1, "hr5": m.hr5, "ndcg5": m.ndcg5, "valid_ratio": 1.0, "n": m.n,
                            "version": rec.version(), "fills_id_slots": kind == args.rec_model}),
            hits: ranks.iter().map(|&rank| rank == 0).collect(),
        });
    }

    let (limit, default_epochs, default_accum) = match args.profile {
        Profile::Quick => (Some(args.limit.unwrap_or(192)), 1, 4),
        Profile::Full => (args.limit, 5, 32),
    };
    let epochs = args.epochs_in(2, default_epochs);
    let grad_accum = args.grad_accum.unwrap_or(default_accum);
    let peak_lr = args.lr.unwrap_or(8e-4);
    if !(peak_lr.is_finite() && peak_lr > 0.0) || args.checkpoint_every == 0 {
        anyhow::bail!(
            "--lr ({peak_lr}) must be positive and --checkpoint-every ({}) at least 1",
            args.checkpoint_every
        );
    }
    let lora = LoraConfig::default();
    let recipe = format!(
        "{}LoRA r {} alpha {} on {}, peak lr {peak_lr:e}, micro-batch {} x accumulation \
         {grad_accum}{}, {epochs} epoch(s){}, lambda_ui {}{} and lambda_it {}{}{}{}, ID slots \
         filled by {}",
        if args.full_finetune {
            "base weights (full fine-tune) and "
        } else {
            ""
        },
        lora.rank,
        lora.alpha,
        lora.targets.join(","),
        args.micro_batch,
        match args.length_window_steps {
            0 | 1 => String::new(),
            w => format!(" (steps dealt out of windows of {w} grouped by length)"),
        },
        match args.epochs_in(1, default_epochs) {
            e if e != epochs => format!(" ({e} in stage 1)"),
            _ => String::new(),
        },
        args.lambda_ui,
        match args.stage1_lambda_ui {
            Some(w) if w != args.lambda_ui => format!(" ({w} in stage 1)"),
            _ => String::new(),
        },
        args.lambda_it,
        match args.ui_similarity {
            crate::train_cmd::UiSimilarityArg::Cosine => "",
            crate::train_cmd::UiSimilarityArg::UserNormalised => ", L_ui user-normalised",
        },
        match args.ui_negatives {
            crate::train_cmd::UiNegativesArg::Candidates => "",
            crate::train_cmd::UiNegativesArg::Catalog => ", L_ui over the whole catalog",
        },
        if args.variants.contains(&Variant::Rank) {
            format!(
                ", L_rank weighed {} in the rank variant over {} negatives",
                args.lambda_rank,
                args.rank_negatives
                    .map_or("all the other candidates as".to_owned(), |k| k.to_string())
            )
        } else {
            String::new()
        },
        args.rec_model.name(),
    );
    let mixture = crate::train_cmd::prepare_mixture(&args.split, &args.stage1_mixture, &paths)?;
    let base = args.model.load()?;
    let base_sha = base.weights_sha256()?;
    let spec = |stage: u8, init_from: Option<PathBuf>| StageSpec {
        stage,
        dataset: dataset.clone(),
        base_model: base.path.clone(),
        base_model_sha256: base_sha.clone(),
        recommender: (stage == 2).then(|| rec_dir.clone()),
        init_from,
        train_limit: limit,
        train_subset: TrainSubset::Spread,
        num_candidates: args.split.num_candidates,
        lora: lora.clone(),
        train: TrainConfig {
            epochs: args.epochs_in(stage, default_epochs),
            max_steps: None,
            micro_batch: args.micro_batch,
            grad_accum,
            peak_lr,
            warmup_fraction: 0.05,
            max_grad_norm: 1.0,
            seed: 1234,
            checkpoint_every: args.checkpoint_every,
            keep_last: 2,
            pad_id: base.tokenizer.pad_id.unwrap_or(0),
            loss: LossConfig {
                lambda_ui: args.lambda_ui_in(stage),
                lambda_it: args.lambda_it,
                ui_similarity: args.ui_similarity.similarity(),
                ui_negatives: args.ui_negatives.negatives(),
                ..LossConfig::default()
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
        user_slot: false,
        user_slot_last: false,
        projector_warmup_steps: if stage == 2 {
            args.projector_warmup_steps
        } else {
            0
        },
        heads_from: None,
        freeze_warm_heads: false,
        mixture: if stage == 1 {
            args.stage1_mixture
                .iter()
                .map(ToString::to_string)
                .collect()
        } else {
            Vec::new()
        },
    };
    let mut curves = serde_json::Map::new();
    // Per training run: steps reached of planned, wall time, whether a time limit stopped it.
    let mut training = serde_json::Map::new();
    // (stage spec, output directory name, progress label)
    let mut runs = vec![
        (
            spec(1, None),
            "stage1".to_owned(),
            "[3/5] stage 1: text-only prompts".to_owned(),
        ),
        (
            spec(2, Some(out.join("stage1"))),
            "stage2".to_owned(),
            "[4/5] stage 2: unified Text-ID prompts".to_owned(),
        ),
    ];
    for &variant in &args.variants {
        let mut s = spec(2, Some(out.join("stage1")));
        match variant {
            Variant::NoStage1 => s.init_from = None,
            Variant::NoLit => s.train.loss.lambda_it = 0.0,
            Variant::NoLui => s.train.loss.lambda_ui = 0.0,
            Variant::NoSlots => {
                // No slots, no projector input to warm up.
                s.no_id_slots = true;
                s.projector_warmup_steps = 0;
            }
            Variant::NoTitles => s.no_titles = true,
            Variant::Llara => {
                s.init_from = None;
                s.train.loss.lambda_it = 0.0;
                s.train.loss.lambda_ui = 0.0;
                s.train.curriculum = true;
            }
            Variant::UserSlot => s.user_slot = true,
            Variant::UserSlotLast => (s.user_slot, s.user_slot_last) = (true, true),
            Variant::UserSlotLastWarm => {
                (s.user_slot, s.user_slot_last) = (true, true);
                // The warm heads set the projector.
                s.projector_warmup_steps = 0;
                s.heads_from = Some(out.join(WARM_HEADS_DIR));
            }
            Variant::Rank => {
                s.train.loss.lambda_rank = args.lambda_rank;
                s.train.loss.rank_negatives = args.rank_negatives;
            }
        }
        runs.push((
            s,
            format!("stage2-{}", variant.key()),
            format!("[4/5] variant: {}", variant.label()),
        ));
    }
    set_aside_if_stale(&out, args.out.is_none(), &runs)?;
    for (stage_spec, dir, label) in &runs {
        eprintln!("{label}");
        // Before the stage's clock starts: a time limit is the training's alone.
        let probe_started = Instant::now();
        let warm_heads = match &stage_spec.heads_from {
            Some(heads_dir) => {
                ensure_warm_heads(&args, stage_spec, &out.join(dir), &data, &rec_dir)?;
                let made = warm_heads::read_manifest(heads_dir)?;
                json!({"folded_hr1": made.folded_hr1, "read_on": made.read_on,
                       "probe_seconds": probe_started.elapsed().as_secs_f64()})
            }
            None => serde_json::Value::Null,
        };
        let others = crate::train_cmd::domains(&stage_spec.mixture, &mixture);
        let target = Domain {
            dataset: &dataset,
            catalog: &data.catalog,
            rows: &data.train,
        };
        let rows = training_rows(&target, &others, limit);
        let bar = indicatif::ProgressBar::new(stage_spec.train.total_steps(rows));
        let mut curve = Vec::new();
        let (mut rows_done, mut tokens_done, mut padded_done) = (0usize, 0usize, 0usize);
        let mut loader_wait = 0.0;
        // A fresh base per stage: LoRA attaches to the model it is built on.
        let mut stage_base = args.model.load()?;
        let stage_started = Instant::now();
        let time_limit = args
            .stage_time_limit_secs
            .map(std::time::Duration::from_secs);
        let summary = run_stage_mixed(
            stage_spec,
            &mut stage_base,
            target,
            &others,
            &out.join(dir),
            &mut |r| {
                bar.set_position(r.step);
                bar.set_message(format!("loss {:.3}", r.loss));
                curve.push(json!([r.step, r.loss, r.lm, r.ui, r.it, r.lr, r.rank]));
                rows_done += r.examples;
                tokens_done += r.tokens;
                padded_done += r.padded_tokens;
                loader_wait += r.loader_wait_secs;
                if time_limit.is_some_and(|t| stage_started.elapsed() >= t) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            },
        )?;
        bar.finish_and_clear();
        let seconds = stage_started.elapsed().as_secs_f64();
        // The step the run stands at, counting an earlier, resumed run's steps: a finished
        // stage that is only resumed reports its whole schedule, not the zero steps taken now.
        let reached = summary.steps;
        let planned = stage_spec.train.total_steps(rows);
        if summary.stopped {
            eprintln!("  stopped by --stage-time-limit-secs at step {reached} of {planned}");
        }
        // Written once, when the run started (a resumed run keeps its first start's report).
        let warmup_path = out.join(dir).join(rsllm_trainer::stage::WARMUP_FILE);
        let warmup = match std::fs::read(&warmup_path) {
            Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
                .with_context(|| format!("{}", warmup_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(e).with_context(|| format!("{}", warmup_path.display())),
        };
        training.insert(
            dir.clone(),
            json!({"steps": reached, "planned_steps": planned, "stopped": summary.stopped,
                   "seconds": seconds, "resumed_from": summary.resumed_from,
                   "rows": rows_done, "tokens": tokens_done, "padded_tokens": padded_done,
                   "loader_wait_secs": loader_wait, "projector_warmup": warmup,
                   "warm_heads": warm_heads}),
        );
        // The checkpoint holds the whole curve, also the steps of an earlier, resumed run.
        let saved = rsllm_trainer::checkpoint::latest(
            &out.join(dir).join(rsllm_trainer::stage::CHECKPOINT_DIR),
        )?
        .and_then(|c| c.manifest.metrics.get("loss").cloned());
        curves.insert(dir.clone(), saved.unwrap_or_else(|| json!(curve)));
    }

    eprintln!("[5/5] evaluation on {} test rows", test.len());
    let slot = base.tokenizer.pad_id.unwrap_or(0);
    let builder = PromptBuilder::with_builtin_templates(&dataset, PromptOptions::new(slot))?;
    // (method name, file key, stage directory)
    let mut evaluations: Vec<(String, String, Option<PathBuf>)> = vec![
        (ZERO_SHOT.into(), "zero-shot".into(), None),
        (
            TEXT_ONLY.into(),
            "text-only".into(),
            Some(out.join("stage1")),
        ),
        ("rsllm".into(), "rsllm".into(), Some(out.join("stage2"))),
    ];
    for &variant in &args.variants {
        evaluations.push((
            variant.label().into(),
            format!("rsllm-{}", variant.key()),
            Some(out.join(format!("stage2-{}", variant.key()))),
        ));
    }
    for (name, file, stage_dir) in evaluations {
        let mut model = args.model.load()?;
        let defaults = EvalOptions::default();
        let (trained, mode, heads) = match &stage_dir {
            None => (
                None,
                PromptMode::TextOnly,
                (defaults.alignment_tau, defaults.alignment_similarity),
            ),
            Some(dir) => {
                let (spec, rsllm, _) = open_stage(&mut model, dir, &data.catalog)?;
                let loss = &spec.train.loss;
                (
                    Some(rsllm),
                    spec.prompt_mode(),
                    (loss.tau, loss.ui_similarity),
                )
            }
        };
        let evaluated = Evaluated {
            model: &model.model,
            tokenizer: &model.tokenizer,
            heads: trained.as_ref().map(|t| &t.heads),
            items: trained.as_ref().map(|t| &t.items),
        };
        let options = EvalOptions {
            prompt_mode: mode,
            alignment_tau: heads.0,
            alignment_similarity: heads.1,
            ..defaults
        };
        let bar =
            indicatif::ProgressBar::new((options.passes(trained.is_some()) * test.len()) as u64);
        let report = evaluate(
            &evaluated,
            &builder,
            &data.catalog,
            &test,
            &options,
            &mut |k| bar.inc(k as u64),
        )?;
        bar.finish_and_clear();
        let rows_file = format!("rows-{file}.csv");
        let rows_path = out.join(&rows_file);
        write_csv(&rows_path, &report)?;
        // metrics.json, written once every method is evaluated, names this run's rows files
        // with their hashes: after an interrupted re-run into the same directory, a rows file
        // that does not match is not this report's.
        let rows_sha256 = rsllm_core::artefact::sha256_file(&rows_path)
            .with_context(|| format!("hashing {}", rows_path.display()))?;
        let ranking = report.ranking.as_ref();
        let alignment = report.alignment.as_ref();
        let combined = report.combined.as_ref();
        methods.push(Method {
            name,
            metrics: json!({
                "hr1": report.hr1_generative,
                "valid_ratio": report.valid_ratio,
                "ranking_hr1": ranking.map(|r| r.hr1),
                "ranking_hr5": ranking.map(|r| r.hr5),
                "ranking_ndcg5": ranking.map(|r| r.ndcg5),
                "alignment_hr1": alignment.map(|r| r.hr1),
                "alignment_hr5": alignment.map(|r| r.hr5),
                "combined_hr1": combined.map(|r| r.hr1),
                "combined_hr5": combined.map(|r| r.hr5),
                "n": report.n,
                "rows_csv": {"file": rows_file, "sha256": rows_sha256},
            }),
            hits: report
                .rows
                .iter()
                .map(|r| r.judgement.as_ref().is_some_and(|j| j.correct))
                .collect(),
        });
    }
    let seconds = started.elapsed().as_secs_f64();
    let facts = RunFacts {
        train_rows: limit,
        recipe,
        seconds,
    };
    write_report(&out, &args, &methods, curves, training, &facts)?;
    println!(
        "report: {} ({seconds:.0} s)",
        out.join("report.md").display()
    );
    Ok(())
}

fn write_report(
    out: &Path,
    args: &PipelineArgs,
    methods: &[Method],
    curves: serde_json::Map<String, serde_json::Value>,
    training: serde_json::Map<String, serde_json::Value>,
    facts: &RunFacts,
) -> anyhow::Result<()> {
    let RunFacts {
        train_rows: limit,
        recipe,
        seconds,
    } = facts;
    let (targets_md, paired) = paired_against_targets(methods);
    let metrics = json!({
        "recipe": recipe,
        "dataset": args.split.dataset.to_string(),
        "protocol": args.split.protocol.to_string(),
        "profile": format!("{:?}", args.profile).to_lowercase(),
        "train_rows_per_stage": limit,
        "stage1_mixture": args.stage1_mixture.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "seconds": seconds,
        "methods": methods.iter().map(|m| (m.name.clone(), m.metrics.clone())).collect::<serde_json::Map<_, _>>(),
        "paired": paired,
        "loss_curves": curves,
        "training": training,
    });
    rsllm_core::artefact::write_json_atomic(&out.join("metrics.json"), &metrics)?;
    let mean = |v: &serde_json::Value| {
        v.get("mean")
            .and_then(|m| m.as_f64())
            .map_or("-".to_owned(), |m| format!("{m:.3}"))
    };
    let mut md = format!(
        "# rsllm pipeline: {} ({}), profile {:?}\n\nTraining rows per stage: {}. Recipe: {recipe}. Wall time: {seconds:.0} s. Test rows: see n.\n\n\
         | method | n | HR@1 (generative) | ValidRatio | HR@1 (ranking) | HR@5 (ranking) | NDCG@5 | HR@1 (alignment heads) | HR@1 (likelihood + alignment) |\n|---|---|---|---|---|---|---|---|---|\n",
        args.split.dataset,
        args.split.protocol,
        args.profile,
        limit.map_or("all".to_owned(), |n| n.to_string())
    );
    for m in methods {
        let v = &m.metrics;
        if m.is_id_only() {
            md.push_str(&format!(
                "| {} | {} | {} | 1 | {} | {} | {} | - | - |\n",
                m.name,
                v["n"],
                mean(&v["hr1"]),
                mean(&v["hr1"]),
                mean(&v["hr5"]),
                mean(&v["ndcg5"])
            ));
        } else {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                m.name,
                v["n"],
                mean(&v["hr1"]),
                mean(&v["valid_ratio"]),
                mean(&v["ranking_hr1"]),
                mean(&v["ranking_hr5"]),
                mean(&v["ranking_ndcg5"]),
                mean(&v["alignment_hr1"]),
                mean(&v["combined_hr1"])
            ));
        }
    }
    md.push_str(&targets_md);
    md.push_str("\n| training run | steps | planned | seconds | rows/s | tokens/s | computed / real tokens (padding) | waiting for prompts (s) | stopped by the time limit |\n|---|---|---|---|---|---|---|---|---|\n");
    for (run, t) in metrics["training"].as_object().into_iter().flatten() {
        // Rates over this invocation's steps (a resumed run's earlier steps are not timed).
        let seconds = t["seconds"].as_f64().unwrap_or(0.0);
        let rate = |key: &str| {
            t[key]
                .as_f64()
                .filter(|&n| seconds > 0.0 && n > 0.0)
                .map_or("-".to_owned(), |n| {
                    let r = n / seconds;
                    if r < 10.0 {
                        format!("{r:.2}")
                    } else {
                        format!("{r:.0}")
                    }
                })
        };
        // Absent from runs written before these were recorded.
        let padding = match (t["padded_tokens"].as_f64(), t["tokens"].as_f64()) {
            (Some(p), Some(r)) if r > 0.0 => format!("{:.3}", p / r),
            _ => "-".to_owned(),
        };
        let waited = t["loader_wait_secs"]
            .as_f64()
            .map_or("-".to_owned(), |w| format!("{w:.1}"));
        md.push_str(&format!(
            "| {run} | {} | {} | {seconds:.0} | {} | {} | {padding} | {waited} | {} |\n",
            t["steps"],
            t["planned_steps"],
            rate("rows"),
            rate("tokens"),
            if t["stopped"] == json!(true) {
                "yes"
            } else {
                "no"
            }
        ));
    }
    let warmed: Vec<_> = metrics["training"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, t)| t["projector_warmup"].is_object())
        .collect();
    if !warmed.is_empty() {
        md.push_str("\nProjector warm-up (before stage 2's first step; HR@1 on held-out training rows, each with its drawn candidates):\n\n| training run | steps | L_it first -> last | user-slot HR@1 by title / by ID slot | recommender HR@1 | slots closest to their own title |\n|---|---|---|---|---|---|\n");
        let share =
            |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.3}"));
        for (run, t) in warmed {
            let w = &t["projector_warmup"];
            md.push_str(&format!(
                "| {run} | {} | {} -> {} | {} / {} | {} | {} |\n",
                w["steps"],
                share(&w["item_loss_first"]),
                share(&w["item_loss_last"]),
                share(&w["user_slot_hr1_by_title"]),
                share(&w["user_slot_hr1_by_slot"]),
                share(&w["recommender_hr1"]),
                share(&w["item_own_title_top1"]),
            ));
        }
    }
    md.push_str(
        "\n![loss curves and metrics](figure.png)\n\nIntervals, loss curves and per-row outputs: metrics.json, rows-*.csv.\n",
    );
    let curve_lines: Vec<crate::plot::Curve> = metrics["loss_curves"]
        .as_object()
        .map(|runs| {
            runs.iter()
                .map(|(name, points)| crate::plot::Curve {
                    name: name.clone(),
                    points: points
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let value = |v: &serde_json::Value| v.get("mean").and_then(serde_json::Value::as_f64);
    let bars: Vec<crate::plot::Bars> = methods
        .iter()
        .map(|m| {
            let v = &m.metrics;
            crate::plot::Bars {
                name: m.name.clone(),
                values: if m.is_id_only() {
                    [value(&v["hr1"]), Some(1.0), value(&v["hr1"])]
                } else {
                    [
                        value(&v["hr1"]),
                        value(&v["valid_ratio"]),
                        value(&v["ranking_hr1"]),
                    ]
                },
            }
        })
        .collect();
    let title = format!(
        "rsllm pipeline: {} ({}), {:?}",
        args.split.dataset, args.split.protocol, args.profile
    );
    crate::plot::write_figure(&out.join("figure.png"), &title, &curve_lines, &bars)
        .with_context(|| format!("writing {}", out.join("figure.png").display()))?;
    rsllm_core::artefact::write_atomic(&out.join("report.md"), md.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage-1 spec as an older version of the tool wrote it (no autocast, no mixture).
    fn spec(peak_lr: f64) -> StageSpec {
        serde_json::from_value(json!({
            "stage": 1, "dataset": "movielens", "base_model": "model.gguf",
            "base_model_sha256": "00", "recommender": null, "init_from": null,
            "train_limit": 192, "num_candidates": 20,
            "lora": {"rank": 8, "alpha": 32.0, "dropout": 0.1, "targets": ["q_proj"]},
            "train": {"epochs": 1, "max_steps": null, "micro_batch": 4, "grad_accum": 4,
                "peak_lr": peak_lr, "warmup_fraction": 0.05, "max_grad_norm": 1.0,
                "seed": 1234, "checkpoint_every": 20, "keep_last": 2, "pad_id": 2,
                "loss": {"use_lm": true, "lambda_ui": 0.1, "lambda_it": 0.1, "tau": 0.07},
                "adamw": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}}
        }))
        .unwrap()
    }

    /// A stage-1 run that reached its first checkpoint with `spec`.
    fn started(out: &Path, spec: &StageSpec) {
        std::fs::create_dir_all(out.join("stage1/checkpoints")).unwrap();
        rsllm_core::artefact::write_json_atomic(&out.join("stage1/stage.json"), spec).unwrap();
        std::fs::write(
            out.join("stage1/checkpoints/latest.json"),
            r#"{"dir":"step-00000001"}"#,
        )
        .unwrap();
        std::fs::write(out.join("report.md"), "old").unwrap();
    }

    fn runs(spec: StageSpec) -> Vec<(StageSpec, String, String)> {
        vec![(spec, "stage1".into(), "stage 1".into())]
    }

    fn parse(flags: &[&str]) -> PipelineArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: PipelineArgs,
        }
        let argv = ["rsllm", "--dataset", "movielens"].iter().chain(flags);
        <Cli as clap::Parser>::parse_from(argv).args
    }

    #[test]
    fn stage_1_takes_its_own_lambda_ui_only_when_given() {
        let both = parse(&["--lambda-ui", "1.0"]);
        assert_eq!((both.lambda_ui_in(1), both.lambda_ui_in(2)), (1.0, 1.0));
        let split = parse(&["--lambda-ui", "1.0", "--stage1-lambda-ui", "0.1"]);
        assert_eq!((split.lambda_ui_in(1), split.lambda_ui_in(2)), (0.1, 1.0));
        let default = parse(&[]);
        assert_eq!(
            (default.lambda_ui_in(1), default.lambda_ui_in(2)),
            (0.1, 0.1)
        );
    }

    #[test]
    fn stage_1_takes_its_own_epochs_only_when_given() {
        let split = parse(&["--epochs", "4", "--stage1-epochs", "2"]);
        assert_eq!((split.epochs_in(1, 5), split.epochs_in(2, 5)), (2, 4));
        let both = parse(&["--epochs", "3"]);
        assert_eq!((both.epochs_in(1, 5), both.epochs_in(2, 5)), (3, 3));
        let stage1_only = parse(&["--stage1-epochs", "2"]);
        assert_eq!(
            (stage1_only.epochs_in(1, 5), stage1_only.epochs_in(2, 5)),
            (2, 5),
            "stage 2 keeps the profile's"
        );
    }

    #[test]
    fn a_bad_loss_weight_or_epoch_count_is_refused_before_any_work() {
        for (flag, value, rule) in [
            (
                "--stage1-lambda-ui",
                "-1",
                "must be finite and not negative",
            ),
            ("--lambda-ui", "NaN", "must be finite and not negative"),
            ("--lambda-it", "-0.5", "must be finite and not negative"),
            ("--stage1-epochs", "0", "must be at least 1"),
            ("--epochs", "0", "must be at least 1"),
        ] {
            let out = tempfile::tempdir().unwrap();
            let run_dir = out.path().join("run");
            let setting = format!("{flag}={value}");
            let args = parse(&[&setting, "--out", run_dir.to_str().unwrap()]);
            let err = run(args).unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains(rule), "{err}");
            assert!(!run_dir.exists(), "{flag}: nothing was created");
        }
    }

    #[test]
    fn the_report_shows_the_alignment_columns_and_each_runs_padding() {
        let args = parse(&[]);
        let mean = |m: f64| json!({"mean": m, "low": 0.0, "high": 1.0});
        let methods = vec![
            Method {
                name: "sasrec".into(),
                metrics: json!({"hr1": mean(0.453), "hr5": mean(0.811), "ndcg5": mean(0.651), "n": 95}),
                hits: Vec::new(),
            },
            Method {
                name: "gru4rec".into(),
                metrics: json!({"hr1": mean(0.463), "hr5": mean(0.779), "ndcg5": mean(0.634), "n": 95}),
                hits: Vec::new(),
            },
            Method {
                name: "rsllm".into(),
                metrics: json!({"hr1": mean(0.1), "valid_ratio": mean(0.9),
                    "ranking_hr1": mean(0.084), "ranking_hr5": mean(0.3), "ranking_ndcg5": mean(0.2),
                    "alignment_hr1": mean(0.168), "alignment_hr5": mean(0.621),
                    "combined_hr1": mean(0.179), "combined_hr5": mean(0.632), "n": 95}),
                hits: Vec::new(),
            },
            Method {
                name: "zero-shot".into(),
                metrics: json!({"hr1": mean(0.0), "valid_ratio": mean(0.189),
                    "ranking_hr1": mean(0.032), "ranking_hr5": mean(0.2), "ranking_ndcg5": mean(0.1),
                    "alignment_hr1": null, "alignment_hr5": null, "n": 95}),
                hits: Vec::new(),
            },
        ];
        let mut training = serde_json::Map::new();
        training.insert(
            "stage2".into(),
            json!({"steps": 12, "planned_steps": 12, "stopped": false, "seconds": 100.0,
                   "resumed_from": null, "rows": 192, "tokens": 40000, "padded_tokens": 41280,
                   "loader_wait_secs": 0.25, "projector_warmup": null}),
        );
        // A run recorded before padding was counted.
        training.insert(
            "stage1".into(),
            json!({"steps": 12, "planned_steps": 12, "stopped": false, "seconds": 90.0,
                   "resumed_from": null, "rows": 192, "tokens": 38000, "projector_warmup": null}),
        );
        let out = tempfile::tempdir().unwrap();
        let facts = RunFacts {
            train_rows: Some(192),
            recipe: "LoRA".into(),
            seconds: 300.0,
        };
        write_report(
            out.path(),
            &args,
            &methods,
            serde_json::Map::new(),
            training,
            &facts,
        )
        .unwrap();
        let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
        assert!(
            md.contains("| HR@1 (alignment heads) | HR@1 (likelihood + alignment) |"),
            "{md}"
        );
        assert!(
            md.contains("| sasrec | 95 | 0.453 | 1 | 0.453 | 0.811 | 0.651 | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("- rsllm: not above gru4rec (0.100 against 0.463;"),
            "the targets, against the best ID-only row: {md}"
        );
        // Every ID-only recommender is valid by construction and ranks: the same columns.
        assert!(
            md.contains("| gru4rec | 95 | 0.463 | 1 | 0.463 | 0.779 | 0.634 | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("| rsllm | 95 | 0.100 | 0.900 | 0.084 | 0.300 | 0.200 | 0.168 | 0.179 |"),
            "{md}"
        );
        // Runs without the heads, or recorded before the combined ranking existed: "-".
        assert!(
            md.contains("| zero-shot | 95 | 0.000 | 0.189 | 0.032 | 0.200 | 0.100 | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("| stage2 | 12 | 12 | 100 | 1.92 | 400 | 1.032 | 0.2 | no |"),
            "{md}"
        );
        assert!(
            md.contains("| stage1 | 12 | 12 | 90 | 2.13 | 422 | - | - | no |"),
            "{md}"
        );
        let metrics: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("metrics.json")).unwrap())
                .unwrap();
        assert_eq!(metrics["methods"]["rsllm"]["alignment_hr1"]["mean"], 0.168);
        assert_eq!(metrics["methods"]["rsllm"]["combined_hr1"]["mean"], 0.179);
        assert_eq!(metrics["training"]["stage2"]["padded_tokens"], 41280);
    }

    #[test]
    fn a_default_run_directory_with_other_settings_is_set_aside_and_started_afresh() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("pipeline-movielens-quick");
        started(&out, &spec(8e-4));

        set_aside_if_stale(&out, true, &runs(spec(8e-4))).unwrap();
        assert!(
            out.join("report.md").exists(),
            "same settings: resumed in place"
        );

        set_aside_if_stale(&out, true, &runs(spec(1e-3))).unwrap();
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "a fresh directory"
        );
        let aside: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("pipeline-movielens-quick.replaced-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let kept = root.path().join(&aside[0]).join("report.md");
        assert_eq!(std::fs::read_to_string(kept).unwrap(), "old");
    }

    #[test]
    fn a_named_run_directory_with_other_settings_is_refused_and_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("mine");
        started(&out, &spec(8e-4));
        let err = set_aside_if_stale(&out, false, &runs(spec(1e-3)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("stage1") && err.contains("other settings"),
            "{err}"
        );
        assert!(
            err.contains("train.peak_lr: 0.0008 -> 0.001"),
            "names the setting that changed, with both values: {err}"
        );
        assert!(out.join("report.md").exists());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_targets_pair_each_stage_2_method_with_the_best_id_only_row_and_the_text_only_stage() {
        let method = |name: &str, hits: &[u8], valid: f64| {
            let hits: Vec<bool> = hits.iter().map(|&h| h == 1).collect();
            let hr1 = hits.iter().filter(|&&h| h).count() as f64 / hits.len() as f64;
            Method {
                name: name.into(),
                metrics: json!({"hr1": {"mean": hr1}, "valid_ratio": {"mean": valid}}),
                hits,
            }
        };
        let methods = vec![
            method("sasrec", &[1, 1, 1, 0, 0, 0, 0, 0], 1.0),
            method("gru4rec", &[1, 1, 1, 1, 0, 0, 0, 0], 1.0),
            method("caser", &[1, 0, 0, 0, 0, 0, 0, 0], 1.0),
            method(ZERO_SHOT, &[0, 0, 0, 0, 0, 0, 0, 0], 0.2),
            method(TEXT_ONLY, &[1, 0, 0, 0, 0, 0, 0, 0], 0.9),
            method("rsllm", &[1, 1, 1, 0, 1, 1, 0, 0], 1.0),
            method("rsllm w/o L_ui", &[1, 1, 0, 0, 0, 0, 0, 0], 0.9),
        ];
        let (md, paired) = paired_against_targets(&methods);
        // gru4rec is the best ID-only row (sasrec and caser rank under it).
        assert!(
            md.contains(
                "- rsllm: above gru4rec (0.625 against 0.500; rows right only here 2, only there 1, p = 1); \
                 above text-only fine-tune (stage 1) (0.625 against 0.125; rows right only here 4, only there 0, p = 0.125); \
                 ValidRatio 1.000 >= 0.95"
            ),
            "{md}"
        );
        assert!(md.contains("- rsllm w/o L_ui: not above gru4rec"), "{md}");
        assert!(md.contains("ValidRatio 0.900 < 0.95"), "{md}");
        assert!(
            !md.contains("- sasrec") && !md.contains("- zero-shot"),
            "{md}"
        );
        assert_eq!(paired["rsllm"]["gru4rec"]["only_this"], 2);
        assert_eq!(paired["rsllm"]["gru4rec"]["above"], true);
        assert_eq!(paired["rsllm w/o L_ui"][TEXT_ONLY]["only_that"], 0);
        assert!(paired.get("sasrec").is_none() && paired.get(TEXT_ONLY).is_none());
    }

    #[test]
    fn p_values_keep_three_decimals_or_their_order_of_magnitude() {
        assert_eq!(p_value(1.0), "1");
        assert_eq!(p_value(0.0637), "0.064");
        assert_eq!(p_value(0.000_324), "3e-4");
    }

    #[test]
    fn another_recommender_for_the_slots_is_another_run() {
        assert_eq!(parse(&[]).rec_model, Kind::Sasrec, "METHOD.md's default");
        let args = parse(&["--rec-model", "gru4rec"]);
        let paths = Paths {
            cache_dir: PathBuf::from("/cache"),
            data_dir: PathBuf::from("/data"),
        };
        let with = |kind: Kind| StageSpec {
            recommender: Some(model_dir(&paths, &args.split, kind)),
            ..spec(8e-4)
        };
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("mine");
        started(&out, &with(Kind::Sasrec));
        let err = set_aside_if_stale(&out, false, &runs(with(args.rec_model)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("recommender: \"/cache/models/rec/movielens-llara-sasrec\" -> \"/cache/models/rec/movielens-llara-gru4rec\""),
            "names both recommenders: {err}"
        );
    }
}
