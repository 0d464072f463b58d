//! `rsllm probe-heads`: the alignment heads' ceiling with the LLM taken out
//! (`rsllm_trainer::probe`): what L_ui's heads reach when the user side is handed the
//! recommender's user state, beside the recommender itself on the same rows.
//! `rsllm probe-transport`: the same heads, then what a frozen LLM's last hidden state still
//! carries of that user state (`rsllm_trainer::transport`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use rsllm_core::Paths;
use rsllm_core::dataset::PreparedDataset;
use rsllm_core::metrics::RankingMetrics;
use rsllm_llm::LoadedModel;
use rsllm_prompt::{PromptBuilder, PromptMode, PromptOptions};
use rsllm_trainer::ItemTable;
use rsllm_trainer::probe::{ProbeConfig, ProbeUser, probe_heads};
use rsllm_trainer::stage::item_table;
use rsllm_trainer::transport::{PromptSource, Transport, TransportConfig, probe_transport};
use rsllm_trainer::warm_heads::{self, WarmHeadsManifest, open_read_on};

use crate::data_cmd::SplitArgs;
use crate::llm_cmd::ModelArgs;
use crate::rec_cmd::{Kind, model_dir};
use crate::train_cmd::{UiNegativesArg, UiSimilarityArg};

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    split: SplitArgs,
    /// The LLM whose input embeddings give the title vectors `t_i` (no transformer pass runs).
    #[command(flatten)]
    model: ModelArgs,
    /// The recommender whose item vectors and user states the heads read.
    #[arg(long, env = "RSLLM_REC_MODEL", default_value = "sasrec")]
    rec_model: Kind,
    /// The user side: state (`P(s_u)`, the recommender's user state) or history-mean (the mean
    /// of `P(e_j)` over the history: no sequence model).
    #[arg(long, default_value = "state")]
    user: UserArg,
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Training rows per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Peak learning rate (warm-up over 5 % of the steps, then cosine decay).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.07)]
    tau: f64,
    #[arg(long, default_value = "cosine")]
    ui_similarity: UiSimilarityArg,
    /// L_ui's negatives: candidates (a row's drawn candidates and the batch's other targets,
    /// as a stage trains) or catalog (every item, as the recommenders train).
    #[arg(long, default_value = "candidates")]
    ui_negatives: UiNegativesArg,
    /// L_it's weight relative to L_ui's (a stage weighs both 0.1: 1).
    #[arg(long, default_value_t = 1.0)]
    lambda_it: f64,
    /// Leave the title vector out of the item side: `v_i = W_v P(e_i)`.
    #[arg(long)]
    no_item_text: bool,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UserArg {
    State,
    HistoryMean,
}

/// What both probes read: the split, the LLM, the item table and its recommender's version,
/// and the heads probe's settings.
struct Setup {
    data: PreparedDataset,
    base: LoadedModel,
    items: ItemTable,
    version: Option<String>,
    config: ProbeConfig,
}

fn setup(args: &ProbeArgs) -> anyhow::Result<Setup> {
    let paths = Paths::from_env()?;
    let data = args.split.prepare(&paths)?;
    let dir = model_dir(&paths, &args.split, args.rec_model);
    if !dir.join("manifest.json").is_file() {
        anyhow::bail!(
            "no trained recommender at {}: run `rsllm rec train --dataset {} --model {}` first",
            dir.display(),
            args.split.dataset,
            args.rec_model.name()
        );
    }
    let base = args.model.load()?;
    let (items, version) = item_table(&base, &data.catalog, Some(&dir), true)?;
    let config = ProbeConfig {
        steps: args.steps,
        batch: args.batch,
        peak_lr: args.lr,
        tau: args.tau,
        similarity: args.ui_similarity.similarity(),
        negatives: args.ui_negatives.negatives(),
        lambda_it: args.lambda_it,
        item_text: !args.no_item_text,
        user: match args.user {
            UserArg::State => ProbeUser::State,
            UserArg::HistoryMean => ProbeUser::HistoryMean,
        },
        num_candidates: args.split.num_candidates,
        seed: args.seed,
    };
    Ok(Setup {
        data,
        base,
        items,
        version,
        config,
    })
}

fn cell(m: &RankingMetrics) -> String {
    format!(
        "{:.3} [{:.3}, {:.3}] / {:.3} / {:.3}",
        m.hr1.mean, m.hr1.low, m.hr1.high, m.hr5.mean, m.ndcg5.mean
    )
}

pub fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let Setup {
        data,
        base,
        items,
        version,
        config,
    } = setup(&args)?;
    let started = std::time::Instant::now();
    let report = probe_heads(
        &base.model,
        &items,
        &data.train,
        &[("test", &data.test), ("val", &data.val)],
        config,
    )
    .with_context(|| format!("heads probe on {}", args.split.dataset))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "heads probe on {} ({} {}, {:?}): {} steps of {} of {} training rows in {:.0} s; loss {:.3} -> {:.3}",
        args.split.dataset,
        args.rec_model.name(),
        version.as_deref().unwrap_or("?"),
        base.model.device(),
        report.config.steps,
        report.config.batch,
        report.train_rows,
        started.elapsed().as_secs_f64(),
        report.loss_first,
        report.loss_last
    );
    println!(
        "part | rows | heads HR@1 [95 %] / HR@5 / NDCG@5 | recommender (dot) | recommender (cosine)"
    );
    for part in &report.parts {
        println!(
            "{} | {} | {} | {} | {}",
            part.part,
            part.heads.n,
            cell(&part.heads),
            cell(&part.recommender_dot),
            cell(&part.recommender_cosine)
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TransportArgs {
    #[command(flatten)]
    probe: ProbeArgs,
    /// The prompts whose last hidden state is read, slots filled by the probe's projector:
    /// user-slot-last (the user slot as the final token), user-slot, unified (RSLLM's) or
    /// text-only.
    #[arg(long, default_value = "user-slot-last")]
    prompt: PromptArg,
    /// Training rows (drawn, seeded) whose hidden states the readout and the refits are fit
    /// on: one LLM forward each.
    #[arg(long, default_value_t = 4000)]
    fit_rows: usize,
    /// Read `h` with this trained stage's adapters on the LLM (stage 1's output, to start
    /// stage 2 from the heads) instead of the base model alone.
    #[arg(long)]
    stage_dir: Option<PathBuf>,
    /// Save the probe's projector and heads, its `W_u` folded to read `h`, into this
    /// directory, for `rsllm train --stage 2 --heads-from DIR` (heads.safetensors and
    /// heads.json, which says what they fit).
    #[arg(long)]
    save_heads: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PromptArg {
    UserSlotLast,
    UserSlot,
    Unified,
    TextOnly,
}

impl PromptArg {
    fn mode(self) -> PromptMode {
        match self {
            PromptArg::UserSlotLast => PromptMode::UnifiedWithUserLast,
            PromptArg::UserSlot => PromptMode::UnifiedWithUser,
            PromptArg::Unified => PromptMode::Unified,
            PromptArg::TextOnly => PromptMode::TextOnly,
        }
    }
}

pub fn run_transport(args: TransportArgs) -> anyhow::Result<()> {
    let Setup {
        data,
        mut base,
        items,
        version,
        config,
    } = setup(&args.probe)?;
    let dataset = args.probe.split.dataset.to_string();
    // The stage is kept alive while the model runs: it holds the adapters.
    let (_stage, read_on) = match &args.stage_dir {
        Some(dir) => {
            let (rsllm, on) = open_read_on(&mut base, dir, &dataset, &data.catalog)
                .with_context(|| format!("reading h on the stage {}", dir.display()))?;
            (Some(rsllm), Some(on))
        }
        None => (None, None),
    };
    let slot = base.tokenizer.pad_id.unwrap_or(0);
    let builder = PromptBuilder::with_builtin_templates(&dataset, PromptOptions::new(slot))?;
    let source = PromptSource {
        tokenizer: &base.tokenizer,
        builder: &builder,
        catalog: &data.catalog,
    };
    let transport = TransportConfig {
        probe: config,
        prompt_mode: args.prompt.mode(),
        fit_rows: args.fit_rows,
    };
    let forwards = args.fit_rows.min(data.train.len()) + data.test.len() + data.val.len();
    let bar = indicatif::ProgressBar::new(forwards as u64);
    let started = std::time::Instant::now();
    let Transport { report, heads } = probe_transport(
        &base.model,
        &source,
        &items,
        &data.train,
        &[("test", &data.test), ("val", &data.val)],
        transport,
        &mut |k| bar.inc(k as u64),
    )
    .with_context(|| format!("transport probe on {dataset}"))?;
    bar.finish_and_clear();
    if let Some(dir) = &args.save_heads {
        let manifest = WarmHeadsManifest::new(
            base.weights_sha256()?,
            &dataset,
            version.clone(),
            &transport,
            read_on,
            &report,
        );
        warm_heads::save(dir, manifest, &heads)
            .with_context(|| format!("saving the heads to {}", dir.display()))?;
        eprintln!("projector and heads saved to {}", dir.display());
    }
    if args.probe.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "transport probe on {dataset} ({} {}, {:?}, {} prompts of {:.0} tokens on average): \
         heads probe on {} training rows, readout and refits on {} of them, in {:.0} s",
        args.probe.rec_model.name(),
        version.as_deref().unwrap_or("?"),
        base.model.device(),
        args.prompt
            .to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_owned()),
        report.mean_prompt_tokens,
        report.probe.train_rows,
        report.fit_rows,
        started.elapsed().as_secs_f64()
    );
    println!(
        "ridge readout of P(s_u) from h: strength {:.0e}, R² {:.3} on held-out fit rows; \
         folded into W_u along a direction where h . w = 1 ± {:.3}",
        report.ridge, report.readout_r2_held_out, report.fold_spread
    );
    println!(
        "part | rows | R² | probe on P(s_u) (all rows) | probe's W_u on the readout | folded W_u on h | fresh W_u on h | fresh W_u on P(s_u) (same rows)"
    );
    for (probe, part) in report.probe.parts.iter().zip(&report.parts) {
        println!(
            "{} | {} | {:.3} | {} | {} | {} | {} | {}",
            part.part,
            probe.heads.n,
            part.readout_r2,
            cell(&probe.heads),
            cell(&part.hidden_readout),
            cell(&part.hidden_folded),
            cell(&part.hidden_refit),
            cell(&part.state_refit)
        );
    }
    Ok(())
}
